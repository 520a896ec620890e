"""One `kiln serve` for the tests that leave it as they found it (fault, hostile inputs, soak);
the kill and drain tests start their own."""

from __future__ import annotations

import pytest

from tests.reliability._live import serve

FAULT = "this prompt trips the injected fault"  # KILN_FAULT_PROMPT of the shared server's worker


@pytest.fixture(scope="package")
def server(tiny_package, tmp_path_factory):
    live = serve(tiny_package("sd1"), tmp_path_factory.mktemp("reliability"), env={"KILN_FAULT_PROMPT": FAULT})
    yield live
    live.stop()
