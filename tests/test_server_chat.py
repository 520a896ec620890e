"""POST /v1/chat/completions against a live server and a real worker: the seed contract, as raw
HTTP and through the official openai client."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests._server import ALIASES, MODEL, shared_server

# The seed's request example, byte for byte (only the URL and the key differ).
SEED_EXAMPLE = """{
    "model": "gpt-4o",
    "messages": [
      {
        "role": "user",
        "content": "Generate an image of a futuristic city with flying cars and neon lights at night"
      }
    ],
    "max_tokens": 4096
  }"""


@pytest.fixture(scope="module")
def live(tiny_package):
    return shared_server(tiny_package("sd1"))


def png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


def max_diff(data_url_1: str, data_url_2: str) -> int:
    a, b = (np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))), dtype=np.int16) for u in (data_url_1, data_url_2))
    return int(np.abs(a - b).max())


def test_seed_curl_example_as_raw_http(live):
    r = httpx.post(
        live.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {live.key}", "Content-Type": "application/json"},
        content=SEED_EXAMPLE,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "gpt-4o"
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    message = choice["message"]
    assert message["role"] == "assistant"
    image_part, text_part = message["content"]
    assert image_part["type"] == "image_url"
    assert text_part["type"] == "text" and "futuristic city" in text_part["text"]
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] == 1  # 64x64 (this server's default size): one 64x64 tile
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # the URL is hosted by the server itself, without the API key
    image = httpx.get(image_part["image_url"]["url"], timeout=10)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert png_size(image.content) == (64, 64)


def test_openai_client_create_with_extension_fields(live):
    client = live.openai()
    completion = client.chat.completions.create(
        model="dall-e-3",
        messages=[{"role": "user", "content": "a red circle"}],
        n=2,
        max_tokens=4,
        # `size` is the seed contract's field, not one of the client's keyword arguments
        extra_body={"size": "128x64", "seed": 1234, "steps": 3, "guidance_scale": 5.0, "sampler": "euler_a", "negative_prompt": "blue"},
    )
    assert completion.model == "dall-e-3"
    content = completion.choices[0].message.content
    assert [part["type"] for part in content] == ["image_url", "image_url", "text"]
    assert completion.usage.completion_tokens == 4  # 2 images x 2 tiles
    assert completion.model_extra["seeds"] == [1234, 1235]
    sizes = {png_size(httpx.get(part["image_url"]["url"], timeout=10).content) for part in content[:2]}
    assert sizes == {(128, 64)}


def test_every_alias_and_the_local_name_generate(live):
    with live.client() as c:
        for name in (MODEL, *ALIASES):
            r = c.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "a dot"}]})
            assert r.status_code == 200, (name, r.text)
            assert r.json()["model"] == name


def test_temperature_zero_gives_the_same_image_for_the_same_request(live):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "a green square"}], "temperature": 0,
               "response_format": "b64_json"}  # fmt: skip
    with live.client() as c:
        first, second = (c.post("/v1/chat/completions", json=request).json() for _ in range(2))
    assert first["seeds"] == second["seeds"]
    url_1, url_2 = (b["choices"][0]["message"]["content"][0]["image_url"]["url"] for b in (first, second))
    assert max_diff(url_1, url_2) <= 2  # the engine's parity tolerance (batching may reorder sums)


def test_temperature_above_zero_draws_a_new_seed(live):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "a green square"}], "temperature": 1}
    with live.client() as c:
        seeds = [c.post("/v1/chat/completions", json=request).json()["seeds"][0] for _ in range(2)]
    assert seeds[0] != seeds[1]


def test_data_url_response_format_returns_the_png_inline(live):
    with live.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "b64_json"}},
        )
    url = r.json()["choices"][0]["message"]["content"][0]["image_url"]["url"]
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    assert png_size(base64.b64decode(url[len(prefix) :])) == (64, 64)


def test_prompt_is_the_last_user_message_and_text_history_is_accepted(live):
    messages = [
        {"role": "system", "content": "You draw pictures."},
        {"role": "user", "content": "a cat"},
        {"role": "assistant", "content": [{"type": "text", "text": "What should I draw next?"}]},
        {"role": "user", "content": [{"type": "text", "text": "a dog"}, {"type": "text", "text": "on grass"}]},
    ]  # fmt: skip
    with live.client() as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 0})
        again = c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "a dog\non grass"}], "temperature": 0},
        )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"][-1]["text"].endswith("a dog\non grass")
    assert r.json()["seeds"] == again.json()["seeds"]  # the same prompt: the history did not change it


def test_a_picture_in_the_history_from_elsewhere_is_not_fetched(live):
    messages = [
        {"role": "user", "content": "a cat"},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]},
        {"role": "user", "content": "now a dog"},
    ]
    with live.client() as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages[1].content[0]" and "data: URL" in error["message"]


def test_max_completion_tokens_is_checked_like_max_tokens(live):
    with live.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "size": "128x128", "max_completion_tokens": 3},
        )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "max_completion_tokens"
    assert "needs 4 completion tokens" in error["message"]


def test_images_api_with_the_openai_client(live):
    client = live.openai()
    result = client.images.generate(model="dall-e-2", prompt="a yellow star", n=2, size="64x64", response_format="url",
                                    quality="hd", style="vivid", user="u1", extra_body={"steps": 2})  # fmt: skip
    assert len(result.data) == 2
    for item in result.data:
        assert png_size(httpx.get(item.url, timeout=10).content) == (64, 64)
    b64 = client.images.generate(model="dall-e-2", prompt="a yellow star", size="64x64", response_format="b64_json")
    assert png_size(base64.b64decode(b64.data[0].b64_json)) == (64, 64)


def test_models_lists_local_names_and_aliases(live):
    client = live.openai()
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL, *ALIASES]
    assert client.models.retrieve("gpt-4o").id == "gpt-4o"
