"""Prometheus metrics of the front end, rendered in the text exposition format (version 0.0.4).

A small registry instead of a dependency: counters, gauges and histograms with labels, updated from
the event loop thread -- except the image store's, which its worker threads update under the
store's lock. Names and meanings are listed in `Metrics`.
"""

from __future__ import annotations

import bisect
import math
from typing import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        return tuple(str(labels.get(n, "")) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        return self.header() + [
            f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in sorted(self.values.items())
        ]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self.values[self._key(labels)] = value

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (), buckets: tuple[float, ...] = LATENCY_BUCKETS):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}  # counts per bucket, [sum]

    def observe(self, value: float, **labels: str) -> None:
        counts, total = self.series.setdefault(self._key(labels), ([0] * (len(self.buckets) + 1), [0.0]))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        total[0] += value

    def render(self) -> list[str]:
        lines = self.header()
        for key, (counts, total) in sorted(self.series.items()):
            running = 0
            for bound, count in zip((*self.buckets, math.inf), counts):
                running += count
                le = 'le="' + _num(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(total[0])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {running}")
        return lines


class Metrics:
    """Everything `/metrics` exposes. One instance per app."""

    def __init__(self) -> None:
        self.requests = Counter(
            "kiln_http_requests_total", "HTTP requests by route template, method and status.", ("route", "method", "status")
        )
        self.latency = Histogram(
            "kiln_http_request_duration_seconds", "Time from request start to the last response byte.", ("route",)
        )
        self.queue_depth = Gauge(
            "kiln_generation_queue_depth", "Generations this front end has sent to workers and not yet received."
        )
        self.generation_seconds = Histogram(
            "kiln_generation_seconds", "Wall time of one generation call to the workers, by model.", ("model",)
        )
        self.images = Counter("kiln_images_generated_total", "Images generated, by model.", ("model",))
        self.rejections = Counter(
            "kiln_rejections_total", "Generations refused, by reason (queue_full, unavailable, timeout, invalid).", ("reason",)
        )
        self.cancellations = Counter(
            "kiln_cancellations_total", "Generations cancelled because the client went away.", ("route",)
        )
        self.stored_images = Gauge("kiln_hosted_images", "PNG files currently hosted under /v1/images/files.")
        self.stored_bytes = Gauge("kiln_images_stored_bytes", "Bytes of the PNG files hosted under /v1/images/files.")
        self.images_evicted = Counter(
            "kiln_images_evicted_total", "Hosted images removed before they expired to keep within images.max_bytes."
        )
        self.workers_ready = Gauge("kiln_workers_ready", "1 when at least one worker is ready, else 0.")
        self.worker_restarts = Counter(
            "kiln_worker_restarts_total", "Local workers restarted after they exited, by worker address.", ("worker",)
        )

    def all(self) -> list[_Metric]:
        return [m for m in vars(self).values() if isinstance(m, _Metric)]

    def render(self, workers: dict[str, dict[str, float]] | None = None) -> str:
        lines = [line for m in self.all() for line in m.render()]
        lines += _worker_lines(workers or {})
        return "\n".join(lines) + "\n"


def _worker_lines(workers: dict[str, dict[str, float]]) -> list[str]:
    """Each worker's own counters and gauges (queue_images, requests_rejected, ...), as reported
    over gRPC, as `kiln_worker_<name>{worker="host:port"}` (untyped: a snapshot of the worker's values)."""
    names = sorted({name for values in workers.values() for name in values})
    lines: list[str] = []
    for name in names:
        metric = "kiln_worker_" + "".join(c if c.isalnum() or c == "_" else "_" for c in name)
        lines += [f"# HELP {metric} The worker's own {name}.", f"# TYPE {metric} untyped"]
        for address, values in sorted(workers.items()):
            if name in values:
                lines.append(f'{metric}{{worker="{_escape(address)}"}} {_num(values[name])}')
    return lines
