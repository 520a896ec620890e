"""Start-up, readiness, bad settings, and draining on SIGTERM, with real worker processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import grpc
import pytest

from engine.worker import inference_pb2 as pb
from tests._workers import V2, infer_request, output, pixels, wait_for


def spawn(package, *options: str, ready_file=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kiln.cli", "worker", "--package", str(package), "--threads", "1", *options]
    if ready_file:
        cmd += ["--ready-file", str(ready_file)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_bad_setting_exits_2_naming_it(tiny_package):
    proc = spawn(tiny_package("sd1"), "--max-batch", "0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--max-batch" in out


def test_a_failed_warm_up_is_a_start_up_error_naming_the_setting(tiny_package):
    proc = spawn(tiny_package("sd1"), "--listen", "127.0.0.1:0", "--warmup-size", "4096x4096")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--warmup-size" in out


def test_live_at_once_ready_only_after_warm_up(tiny_package, tmp_path):
    port = free_port()
    ready_file = tmp_path / "ready"
    # Four warm-up sizes up to 512x512 take several seconds: long enough to watch, even when a
    # loaded machine is slow to connect the channel.
    proc = spawn(tiny_package("sd1"), "--listen", f"127.0.0.1:{port}", "--max-batch", "2",
                 "--warmup-size", "256x256,384x384,448x448,512x512", ready_file=ready_file)  # fmt: skip
    v2 = V2(f"127.0.0.1:{port}")
    seen = []
    try:
        end = time.monotonic() + 60
        while not ready_file.exists() and time.monotonic() < end and proc.poll() is None:
            try:
                live = v2.ServerLive(pb.ServerLiveRequest(), timeout=1).live
                ready = v2.ServerReady(pb.ServerReadyRequest(), timeout=1).ready
                seen.append((live, ready))
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.02)
        assert ready_file.exists(), proc.stdout.read() if proc.poll() is not None else "not ready in 60 s"
        assert (True, False) in seen, "live and not ready while loading and warming up"
        assert (True, True) not in seen[: seen.index((True, False))]
        assert v2.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    finally:
        v2.close()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_sigterm_stops_admitting_finishes_in_flight_work_and_exits_0(tiny_package, tmp_path):
    ready_file = tmp_path / "ready"
    proc = spawn(tiny_package("sd1"), "--listen", "127.0.0.1:0", "--max-batch", "2", "--warmup-size", "64x64",
                 ready_file=ready_file)  # fmt: skip
    assert wait_for(lambda: ready_file.exists() or proc.poll() is not None, 60)
    address = ready_file.read_text().strip()
    v2 = V2(address)
    try:
        stream = v2.ModelInferStream(infer_request(prompt="a cat", width=128, height=128, seed=3, steps=120), timeout=60)
        next(stream)  # running
        proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: not v2.ServerReady(pb.ServerReadyRequest(), timeout=2).ready, 10), "not ready while draining"

        with pytest.raises(grpc.RpcError) as refused:
            v2.ModelInfer(infer_request(prompt="a dog", width=64, height=64, steps=2), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.details()

        last = list(stream)[-1].infer_response  # the accepted request still gets its image
        assert last.parameters["kiln_event"].string_param == "result"
        assert pixels(output(last, "images").contents.bytes_contents[0]).shape == (128, 128, 3)
    finally:
        v2.close()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "draining" in out


def test_work_left_at_the_drain_timeout_fails_with_unavailable_so_clients_retry(tiny_package, tmp_path):
    ready_file = tmp_path / "ready"
    proc = spawn(tiny_package("sd1"), "--listen", "127.0.0.1:0", "--warmup-size", "64x64", "--drain-timeout", "0.3",
                 ready_file=ready_file)  # fmt: skip
    assert wait_for(lambda: ready_file.exists() or proc.poll() is not None, 60)
    v2 = V2(ready_file.read_text().strip())
    try:
        stream = v2.ModelInferStream(infer_request(prompt="a cat", width=192, height=192, seed=3, steps=150), timeout=60)
        next(stream)
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as cut:
            list(stream)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ("kiln-error", "WorkerUnavailableError") in cut.value.trailing_metadata()
    finally:
        v2.close()
    proc.communicate(timeout=30)
    assert proc.returncode == 0
