"""The CUDA runtime's IOBinding logic, run on the CPU execution provider (no GPU needed).

`BoundPipeline` drives a cpu package through exactly the binding code `CudaPipeline` uses on a
GPU: device buffers per shape, uploads skipped for unchanged embeddings, output buffers learnt
on the first run, CUDA graph ids per shape. What only a GPU shows is in benchmarks/gpu_check.py.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from engine.cuda.binding import BoundComponent
from engine.cuda.pipeline import BoundPipeline, cuda_provider_options
from engine.pipeline import ImageRequest, Pipeline
from engine.sessions import GpuOptions, RuntimeOptions

OPTIONS = RuntimeOptions(threads=1)


def _request(prompt="a red circle", seed=3, steps=3, **kw) -> ImageRequest:
    return ImageRequest(prompt=prompt, width=64, height=64, seed=seed, steps=steps, **kw)


@pytest.mark.parametrize("family,sampler", [("sd1", "euler"), ("sd1", "euler_a"), ("sdxl", "euler"), ("sd2v", "ddim")])
def test_bound_pipeline_makes_the_same_image(tiny_package, family, sampler):
    package = tiny_package(family)
    req = _request(sampler=sampler)
    plain = Pipeline(package, OPTIONS).generate([req])[0]
    bound = BoundPipeline(package, OPTIONS).generate([req])[0]
    np.testing.assert_array_equal(bound, plain)


def test_embeddings_are_uploaded_once_per_batch_not_per_step(tiny_package):
    pipe = BoundPipeline(tiny_package("sd1"), OPTIONS)
    pipe.generate([_request(steps=4)])
    stats = pipe.unet.stats
    assert stats.runs == 4
    # every step: sample and timestep; the embeddings only on the first
    assert stats.uploads == 4 * 2 + 1
    assert stats.uploads_skipped == 3


def test_a_changed_batch_uploads_its_own_embeddings(tiny_package):
    """Two batches of one shape in turn: each step must see its own prompt's embeddings."""
    package = tiny_package("sd1")
    reqs = [_request("a red circle", seed=1), _request("a blue square", seed=2)]
    expected = Pipeline(package, OPTIONS).generate(reqs[:1]) + Pipeline(package, OPTIONS).generate(reqs[1:])
    pipe = BoundPipeline(package, OPTIONS)
    a, b = pipe.prepare(reqs[:1]), pipe.prepare(reqs[1:])
    while not (a[0].done and b[0].done):  # interleaved, as the scheduler does with two batches
        pipe.denoise_step(a) if not a[0].done else None
        pipe.denoise_step(b) if not b[0].done else None
    images = [pipe.decode(a)[0], pipe.decode(b)[0]]
    for got, want in zip(images, expected):
        np.testing.assert_array_equal(got, want)


def test_samples_leaving_a_batch_are_handled(tiny_package):
    """Different step counts and guidance in one batch: rows change as samples finish."""
    package = tiny_package("sd1")
    reqs = [_request(seed=1, steps=2), _request(seed=2, steps=4, guidance_scale=1.0), _request(seed=3, steps=3)]
    expected = Pipeline(package, OPTIONS).generate(reqs)
    got = BoundPipeline(package, OPTIONS).generate(reqs)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


def test_outputs_belong_to_the_caller(tiny_package):
    """A later run must not overwrite arrays an earlier run returned (CPU numpy() is a view)."""
    pipe = BoundPipeline(tiny_package("sd1"), OPTIONS)
    ids = np.full((2, 77), 49407, dtype=np.int64)
    first = pipe.text_encoders[0].run({"input_ids": ids}, {"batch_size": 2})[0]
    kept = first.copy()
    ids2 = ids.copy()
    ids2[:, 1] = 320
    pipe.text_encoders[0].run({"input_ids": ids2}, {"batch_size": 2})
    pipe.text_encoders[0].run({"input_ids": ids2}, {"batch_size": 2})  # fixed output buffers now
    np.testing.assert_array_equal(first, kept)


def test_a_writeable_array_is_uploaded_again_even_if_it_is_the_same_object(tiny_package):
    pipe = BoundPipeline(tiny_package("sd1"), OPTIONS)
    enc = pipe.text_encoders[0]
    ids = np.full((1, 77), 49407, dtype=np.int64)
    a = enc.run({"input_ids": ids}, {"batch_size": 1})[0]
    ids[0, 1] = 320  # changed in place
    b = enc.run({"input_ids": ids}, {"batch_size": 1})[0]
    assert not np.array_equal(a, b)
    assert enc.stats.uploads_skipped == 0


class _RecordingSession:
    """A CPU session that records which CUDA graph id each run asked for."""

    def __init__(self, session: ort.InferenceSession):
        self.session, self.graph_ids = session, []

    def io_binding(self):
        return self.session.io_binding()

    def run_with_iobinding(self, io, options):
        self.graph_ids.append(options.get_run_config_entry("gpu_graph_id"))
        self.session.run_with_iobinding(io, options)


def test_cuda_graph_ids_go_to_the_first_shapes_and_never_to_a_first_run(tiny_package):
    package = tiny_package("sd1")
    session = _RecordingSession(ort.InferenceSession(str(package / "vae_decoder" / "model.onnx")))
    vae = BoundComponent("vae_decoder", lambda _d: session, ["latent_sample"], ["sample"], device="cpu", graph_slots=2)
    for side in (8, 8, 8, 10, 10, 12, 12):
        vae.run({"latent_sample": np.zeros((1, 4, side, side), np.float32)})
    # first run of each shape learns its output buffers (no graph); shapes 3+ get no graph
    assert session.graph_ids == ["-1", "0", "0", "-1", "1", "-1", "-1"]
    assert [k[1][1] for k in vae.graph_keys] == [(1, 4, 8, 8), (1, 4, 10, 10)]


def test_bindings_without_a_graph_are_bounded_least_recently_used_first(tiny_package):
    package = tiny_package("sd1")
    session = ort.InferenceSession(str(package / "vae_decoder" / "model.onnx"))
    vae = BoundComponent("vae_decoder", lambda _d: session, ["latent_sample"], ["sample"], device="cpu", graph_slots=1, max_bound=2)
    for side in (8, 10, 12, 10, 14):  # 8 takes the graph slot (kept for good); 12 is the least recent when 14 comes
        out = vae.run({"latent_sample": np.ones((1, 4, side, side), np.float32)})
        assert out[0].shape[-1] == side * 8
    sides = [k[1][1][-1] for k in vae.loaded_shapes]
    assert sorted(sides) == [8, 10, 14] and vae.stats.evictions == 1
    again = vae.run({"latent_sample": np.ones((1, 4, 12, 12), np.float32)})  # rebound on demand
    assert again[0].shape[-1] == 96 and vae.stats.evictions == 2


def test_cuda_provider_options():
    options = cuda_provider_options(GpuOptions(device_id=1, gpu_mem_limit_gib=2), cuda_graph=True)
    assert options["device_id"] == "1"
    assert options["enable_cuda_graph"] == "1"
    assert options["gpu_mem_limit"] == str(2 * 2**30)
    assert cuda_provider_options(GpuOptions(), cuda_graph=False)["enable_cuda_graph"] == "0"
    assert "gpu_mem_limit" not in cuda_provider_options(GpuOptions(), cuda_graph=False)
