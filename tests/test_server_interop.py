"""Clients that read `message.content` as a string: OpenRouter's answer shape (`modalities`,
`message.images`) beside the seed's content parts, proven with LiteLLM and the openai SDK's
typed models against a live server and a real worker."""

from __future__ import annotations

import base64
import io
import json
import os
import warnings

import httpx
import openai
import pytest
from PIL import Image

from tests._server import MODEL, shared_server, thread_server

# LiteLLM otherwise downloads its model price list at import; these machines are offline.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ASK = {"role": "user", "content": "a red circle on a blue background"}
BOTH = ["image", "text"]


@pytest.fixture(scope="module")
def live(tiny_package):
    return shared_server(tiny_package("sd1"))


def chat(live, **body) -> httpx.Response:
    with live.client() as c:
        return c.post("/v1/chat/completions", json={"model": MODEL, "messages": [ASK], **body})


def sse_events(live, body: dict) -> list:
    events = []
    with live.client() as c, c.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": [ASK], **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def png_size(data_url: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).size


# ---- the shape ------------------------------------------------------------------------------


def test_modalities_with_image_answer_text_in_content_and_pictures_in_images(live):
    r = chat(live, modalities=BOTH, n=2, response_format="b64_json", seed=11)
    assert r.status_code == 200, r.text
    body = r.json()
    message = body["choices"][0]["message"]
    assert isinstance(message["content"], str) and message["content"].startswith("Here are the 2 generated images")
    assert [p["type"] for p in message["images"]] == ["image_url", "image_url"]
    assert all(png_size(p["image_url"]["url"]) == (64, 64) for p in message["images"])
    assert body["seeds"] == [11, 12] and body["usage"]["completion_tokens"] == 2


def test_without_modalities_the_seed_shape_is_unchanged(live):
    message = chat(live).json()["choices"][0]["message"]
    assert [p["type"] for p in message["content"]] == ["image_url", "text"]
    assert "images" not in message


@pytest.mark.parametrize("modalities", [["text"], ["audio", "image"], []])
def test_modalities_without_image_are_refused_saying_the_model_makes_images(live, modalities):
    r = chat(live, modalities=modalities)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "modalities" and "only makes images" in error["message"]


def test_the_openai_sdk_typed_model_accepts_the_openrouter_shape(live):
    from openai.types.chat import ChatCompletion

    typed = ChatCompletion.model_validate(chat(live, modalities=BOTH).json())
    assert typed.choices[0].message.content.startswith("Here is the generated image")
    assert typed.choices[0].message.model_extra["images"][0]["type"] == "image_url"
    with pytest.raises(ValueError):  # the seed's shape is what typed clients reject
        ChatCompletion.model_validate(chat(live).json())


def test_stream_with_modalities_sends_pictures_as_delta_images_then_the_text(live):
    events = sse_events(live, {"modalities": BOTH, "n": 2, "steps": 3, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    progress = [e for e in chunks if "progress" in e]
    assert progress and all(e["choices"][0]["delta"] == {} for e in progress)
    images = [e["choices"][0]["delta"]["images"] for e in chunks if "images" in e["choices"][0]["delta"]]
    assert [part[0]["index"] for part in images] == [0, 1]
    texts = [e["choices"][0]["delta"]["content"] for e in chunks if "content" in e["choices"][0]["delta"]]
    assert texts == ["Here are the 2 generated images of: a red circle on a blue background"]
    assert chunks.index(next(e for e in chunks if "progress" in e)) < chunks.index(
        next(e for e in chunks if "images" in e["choices"][0]["delta"])
    )


def test_an_edit_is_answered_in_the_shape_asked_for(live):
    first = chat(live, response_format="b64_json").json()["choices"][0]["message"]["content"][0]
    follow_up = [ASK, {"role": "assistant", "content": [first]}, {"role": "user", "content": "now on green"}]
    with live.client() as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": follow_up, "modalities": BOTH})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["content"].startswith("Here is the edited image") and len(message["images"]) == 1


def test_a_picture_in_an_assistants_images_is_edited_in_the_next_turn(live):
    answer = chat(live, modalities=BOTH, response_format="b64_json", size="96x64").json()["choices"][0]["message"]
    history = [ASK, {"role": "assistant", "content": answer["content"], "images": answer["images"]},
               {"role": "user", "content": "now on green"}]  # fmt: skip
    with live.client() as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": history, "modalities": BOTH,
                                                 "response_format": "b64_json"})  # fmt: skip
    message = r.json()["choices"][0]["message"]
    assert message["content"].startswith("Here is the edited image")
    assert png_size(message["images"][0]["image_url"]["url"]) == (96, 64)  # the picture's size: it was edited


def test_a_server_default_gives_the_openrouter_shape_to_clients_that_cannot_ask(live, tiny_package, tmp_path):
    server = thread_server(tiny_package("sd1"), live.worker, tmp_path, images_options={"chat_answer": "message_images"})
    try:
        with server.client() as c:
            message = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [ASK]}).json()["choices"][0]["message"]
        assert isinstance(message["content"], str) and len(message["images"]) == 1
    finally:
        server.stop()


# ---- LiteLLM, as teams put it in front of model servers -------------------------------------


def litellm_completion(live, **kwargs):
    litellm = pytest.importorskip("litellm")
    with warnings.catch_warnings():
        # LiteLLM's own pydantic models warn about fields they do not declare; not our code.
        warnings.simplefilter("ignore")
        return litellm.completion(
            model=f"openai/{MODEL}", api_base=live.url + "/v1", api_key=live.key, messages=[ASK], **kwargs
        )


def test_litellm_reads_the_picture_from_message_images(live):
    response = litellm_completion(live, modalities=BOTH)
    message = response.choices[0].message
    assert message.content.startswith("Here is the generated image")
    url = message.images[0]["image_url"]["url"]
    assert url.startswith(live.url + "/v1/images/files/")
    assert httpx.get(url).status_code == 200


def test_litellm_streams_the_picture_and_the_text(live):
    chunks = list(litellm_completion(live, modalities=BOTH, stream=True, extra_body={"steps": 3}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    images = [img for c in chunks if c.choices for img in (getattr(c.choices[0].delta, "images", None) or [])]
    assert text.startswith("Here is the generated image")
    assert len(images) == 1 and images[0]["image_url"]["url"].startswith(live.url)


def test_the_seed_shape_still_fails_litellms_typed_parsing(live):
    """Why the OpenRouter shape exists: without modalities, LiteLLM rejects the content parts."""
    with pytest.raises(Exception, match="content|Invalid response"):
        litellm_completion(live)


def test_openai_sdk_stream_helper_accepts_the_openrouter_shape(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=live.key)
    with client.chat.completions.stream(model=MODEL, messages=[ASK], extra_body={"modalities": BOTH, "steps": 3}) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content.startswith("Here is the generated image")
