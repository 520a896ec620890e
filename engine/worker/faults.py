"""Fault injection, for the tests that prove one bug fails one request and nothing else.

A worker started with KILN_FAULT_PROMPT=<text> raises an unexpected exception (not a KilnError:
a stand-in for a bug) while admitting any request whose prompt is exactly <text>. Unset -- as in
every deployment -- it does nothing.
"""

from __future__ import annotations

import os

from engine.request import ImageRequest

FAULT_PROMPT = os.environ.get("KILN_FAULT_PROMPT") or None


class InjectedFault(RuntimeError):
    """The bug KILN_FAULT_PROMPT asked for."""


def check(request: ImageRequest) -> None:
    if FAULT_PROMPT is not None and request.prompt == FAULT_PROMPT:
        raise InjectedFault(f"injected fault for prompt {FAULT_PROMPT!r}")
