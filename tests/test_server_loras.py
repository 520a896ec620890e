"""LoRAs over the API, on a live `kiln serve` with a real worker: listed by /v1/models, chosen
with the `loras` field or `<lora:NAME:SCALE>` in the prompt (openai client and raw HTTP), refused
by name when unknown."""

from __future__ import annotations

import base64
import io
import json
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

from engine.lora import add_lora, remove_lora
from tests._server import ALIASES, MODEL, serve_process

torch = pytest.importorskip("torch")

from tests.test_lora_files import _random_pairs, write_kohya  # noqa: E402


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_package, tiny_checkpoint):
    from diffusers import DiffusionPipeline

    base = tmp_path_factory.mktemp("lora-server")
    package = base / "sd1"
    shutil.copytree(tiny_package("sd1"), package)
    pipe = DiffusionPipeline.from_pretrained(str(tiny_checkpoint("sd1")))
    for name, seed in (("style", 21), ("ink", 22)):
        pairs = [(c, n, d * 4, u * 4, a) for c, n, d, u, a in _random_pairs(pipe, seed=seed)]
        add_lora(package, write_kohya(pairs, base / f"{name}.safetensors", "sd1"), name)
    (base / "run").mkdir()
    server = serve_process(package, base / "run")
    server.extra["package"] = package
    yield server
    server.stop()


def pixels(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))), dtype=np.int16)


def chat(live, prompt: str, **extra) -> httpx.Response:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}], "seed": 3, "response_format": "b64_json", **extra}
    return httpx.post(live.url + "/v1/chat/completions", headers=live.headers, json=body, timeout=60)


def image_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    parts = response.json()["choices"][0]["message"]["content"]
    return pixels(next(p["image_url"]["url"] for p in parts if p["type"] == "image_url"))


def test_models_list_the_loras(live):
    listed = httpx.get(live.url + "/v1/models", headers=live.headers, timeout=10).json()["data"]
    for name in (MODEL, *ALIASES):
        assert next(m for m in listed if m["id"] == name)["loras"] == ["ink", "style"]
    model = live.openai().models.retrieve("gpt-4o")
    assert model.model_extra["loras"] == ["ink", "style"]


def test_openai_client_chooses_a_lora_by_field_or_prompt_tag(live):
    client = live.openai()

    def draw(prompt: str, **extra) -> np.ndarray:
        answer = client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": prompt}],
            extra_body={"seed": 3, "response_format": "b64_json", **extra},
        )
        content = answer.choices[0].message.content
        if isinstance(content, str):  # the client types content as a string; Kiln's is a list of parts
            content = json.loads(content)
        return pixels(next(p["image_url"]["url"] for p in content if p["type"] == "image_url"))

    base = image_of(chat(live, "a lighthouse"))
    styled = draw("a lighthouse", loras=[{"name": "style", "scale": 1.0}])
    assert np.abs(styled - base).mean() > 2, "the LoRA did not change the image"
    assert np.array_equal(image_of(chat(live, "a lighthouse <lora:style:1>")), styled)
    assert np.array_equal(image_of(chat(live, "a lighthouse", loras=[{"name": "style", "scale": 0}])), base)
    both = image_of(chat(live, "a lighthouse <lora:ink:0.5>", loras=[{"name": "style", "scale": 1.0}]))
    assert not np.array_equal(both, styled)


@pytest.mark.parametrize(
    "prompt, extra, param, code, says",
    [
        ("a cat", {"loras": [{"name": "nope", "scale": 1}]}, "loras", "lora_not_found", "no LoRA named 'nope' (its LoRAs: ink, style)"),
        ("a cat <lora:ghost:0.4>", {}, "loras", "lora_not_found", "no LoRA named 'ghost'"),
        ("a cat", {"loras": [{"name": "style", "scale": 3}]}, "loras[0].scale", "invalid_type", "<= 2.0"),
        ("a cat", {"loras": [{"name": "style", "weight": 1}]}, "loras[0]", "invalid_type", "unknown field weight"),
        ("a cat <lora:style:loud>", {}, "prompt", "invalid_value", "'loud' is not a number"),
        ("a cat <lora:style:1>", {"loras": [{"name": "style"}]}, "loras", "invalid_value", "asked for twice"),
        ("a cat <lora:<lora:style>ink>", {}, "prompt", "invalid_value", "holds another tag"),
    ],
)
def test_bad_loras_are_openai_errors_naming_them(live, prompt, extra, param, code, says):
    r = chat(live, prompt, **extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert says in error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_images_generations_and_edits_take_loras(live):
    body = {"model": "dall-e-2", "prompt": "a lighthouse", "seed": 3, "response_format": "b64_json"}
    r = httpx.post(live.url + "/v1/images/generations", headers=live.headers, json=body, timeout=60)
    base = r.json()["data"][0]["b64_json"]
    r = httpx.post(
        live.url + "/v1/images/generations",
        headers=live.headers,
        json={**body, "loras": [{"name": "style", "scale": 1.0}]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["b64_json"] != base
    picture = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture, "PNG")
    form = {"prompt": "a lighthouse", "seed": "3", "response_format": "b64_json", "model": "dall-e-2"}
    edits = [
        httpx.post(
            live.url + "/v1/images/edits",
            headers=live.headers,
            data={**form, **extra},
            files={"image": ("in.png", picture.getvalue(), "image/png")},
            timeout=60,
        )
        for extra in ({}, {"loras": json.dumps([{"name": "ink", "scale": 1.0}])}, {"loras": "ink"})
    ]
    assert edits[0].status_code == 200 and edits[1].status_code == 200, (edits[0].text, edits[1].text)
    assert edits[0].json()["data"][0]["b64_json"] != edits[1].json()["data"][0]["b64_json"]
    assert edits[2].status_code == 400 and edits[2].json()["error"]["param"] == "loras"
    # the openai client's extra_body sends the list as loras[][name] / loras[][scale] form fields
    answer = live.openai().images.edit(
        image=("in.png", picture.getvalue(), "image/png"),
        prompt="a lighthouse",
        model="dall-e-2",
        response_format="b64_json",
        extra_body={"seed": 3, "loras": [{"name": "ink", "scale": 1.0}]},
    )
    assert answer.data[0].b64_json == edits[1].json()["data"][0]["b64_json"]


def test_temperature_zero_seeds_do_not_depend_on_how_loras_are_asked(live):
    def seed(prompt: str, **extra) -> int:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}], "temperature": 0, **extra}
        r = httpx.post(live.url + "/v1/chat/completions", headers=live.headers, json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["seeds"][0]

    both = [{"name": "style", "scale": 0.5}, {"name": "ink", "scale": 1.0}]
    tagged = seed("a lighthouse <lora:ink:1> <lora:style:0.5>")
    assert seed("a lighthouse", loras=both) == tagged == seed("a lighthouse", loras=both[::-1])
    assert seed("a lighthouse") != tagged


def test_workers_that_store_different_loras_offer_only_the_shared_ones(live, tmp_path):
    """The pool may send a request to any worker of its model: a LoRA only some have is not offered."""
    import asyncio

    from engine.client.pool import WorkerPool
    from tests._server import WORKER_TOKEN
    from tests._workers import start_workers

    package = live.extra["package"]
    other = tmp_path / "sd1"
    shutil.copytree(package, other)
    remove_lora(other, "ink")
    workers = [start_workers(package, token=WORKER_TOKEN), start_workers(other, token=WORKER_TOKEN)]
    try:
        async def listed():
            async with WorkerPool([w.addresses[0] for w in workers], token=WORKER_TOKEN) as pool:
                return {m.name: m.loras for m in await pool.models()}

        assert asyncio.run(listed()) == {"sd1": ("style",)}
    finally:
        for w in workers:
            w.stop()


def test_a_mixed_lora_stream_with_one_session_slot_loses_nothing(live):
    """Four variants at two sizes through a worker that keeps one unpinned session per component:
    every request evicts and rebuilds others' sessions (in the background, while requests hold
    theirs), and every answer is the image that variant draws alone."""
    import asyncio

    from engine.client.pool import WorkerPool
    from engine.pipeline import Pipeline
    from engine.request import ImageRequest, LoraChoice
    from engine.sessions import RuntimeOptions
    from tests._server import WORKER_TOKEN
    from tests._workers import TOLERANCE, metrics, pixels as png_pixels, start_workers

    package = live.extra["package"]
    variants = [(), (LoraChoice(name="style", scale=1.0),), (LoraChoice(name="ink", scale=0.7),),
                (LoraChoice(name="ink", scale=0.5), LoraChoice(name="style", scale=0.5))]
    asks = [(loras, size) for size in ((64, 64), (96, 64)) for loras in variants]

    def request(loras, size) -> ImageRequest:
        return ImageRequest(model="sd1", prompt="a lighthouse", width=size[0], height=size[1], seed=5, steps=2, loras=loras)

    alone = Pipeline(package, RuntimeOptions(threads=1))
    expected = {i: alone.generate([request(*ask)])[0] for i, ask in enumerate(asks)}
    workers = start_workers(package, token=WORKER_TOKEN, session_cache=1, max_batch=4)
    try:
        async def stream():
            async with WorkerPool(workers.addresses, token=WORKER_TOKEN) as pool:
                return await asyncio.gather(*(pool.generate(request(*asks[k % len(asks)]), timeout=120) for k in range(24)))

        results = asyncio.run(stream())
        counters = metrics(workers.addresses[0], WORKER_TOKEN)
    finally:
        workers.stop()
    for k, result in enumerate(results):
        got = png_pixels(result.images_png[0])
        assert np.abs(got.astype(int) - expected[k % len(asks)]).max() <= TOLERANCE, f"request {k}: {asks[k % len(asks)]}"
    assert counters["session_evictions"] > 0, "the stream never evicted a session: the test lost its point"
    assert counters["requests_completed"] == 24 and counters["requests_failed"] == 0
