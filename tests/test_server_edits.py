"""Editing pictures against a live server and a real worker: POST /v1/images/edits and
/v1/images/variations (multipart, as the official openai client sends them), chat completions
whose conversation holds a picture, and the 400s that name the field at fault.

The tiny model's weights are random, so its pictures are noise: these tests pin the contract
(sizes, counts, seeds, steps run, error bodies), and of the picture only what the engine
guarantees whatever the weights: an inpainting edit keeps the input far outside its mask.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from engine.errors import InvalidRequestError
from engine.request import ImageRequest, ModelLimits, validate_request
from tests._server import MODEL, shared_server

EDITS = "/v1/images/edits"
VARIATIONS = "/v1/images/variations"
CHAT = "/v1/chat/completions"
RED = (200, 30, 30)


@pytest.fixture(scope="module")
def live(tiny_package):
    return shared_server(tiny_package("sd1"))


# ---- pictures ---------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def png(width: int = 64, height: int = 64, colour=RED, mode: str = "RGB") -> bytes:
    return encode(Image.new(mode, (width, height), colour))


def hole_mask(width: int = 64, height: int = 64, box=(24, 24, 40, 40)) -> bytes:
    """OpenAI's mask: opaque everywhere except a fully transparent box (the part to repaint)."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return encode(mask)


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode("ascii")


def decoded(b64_or_data_url: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64_or_data_url.split(",", 1)[-1])))
    assert image.format == "PNG"
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ---- requests ---------------------------------------------------------------------------------


def edit(live, image: bytes | None = None, mask: bytes | None = None, **fields) -> httpx.Response:
    """A multipart edit as raw HTTP (the openai client would refuse some of these before sending)."""
    files = {}
    if image is not None:
        files["image"] = ("in.png", image, "application/octet-stream")
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    form = {"model": MODEL, "prompt": "a boat", "response_format": "b64_json", **{k: str(v) for k, v in fields.items()}}
    with live.client() as c:
        return c.post(EDITS, files=files or {"nothing": ("x.txt", b"x", "text/plain")}, data=form)


def chat_edit(picture_url: str, text: str = "make it blue", **fields) -> dict:
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": picture_url}}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "response_format": "b64_json", **fields}


def post_chat(live, body: dict) -> httpx.Response:
    with live.client() as c:
        return c.post(CHAT, json=body)


def assert_error(r: httpx.Response, status: int, param: str | None) -> dict:
    """An OpenAI error object with this status, naming `param`."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert r.headers["x-should-retry"] == "false"
    return error


def openai_error(excinfo: pytest.ExceptionInfo) -> dict:
    return excinfo.value.response.json()["error"]


# ---- /v1/images/edits with the official openai client ------------------------------------------


def test_openai_client_edit_returns_one_png_of_the_requested_size(live):
    result = live.openai().images.edit(
        model=MODEL, image=("in.png", png(), "image/png"), prompt="a boat", response_format="b64_json", size="64x64"
    )
    [item] = result.data
    assert decoded(item.b64_json).size == (64, 64)


def test_openai_client_edit_with_a_mask_keeps_the_picture_far_outside_the_mask(live):
    result = live.openai().images.edit(
        model=MODEL,
        image=("in.png", png(), "image/png"),
        mask=("mask.png", hole_mask(box=(24, 24, 40, 40)), "image/png"),
        prompt="a boat",
        response_format="b64_json",
        size="64x64",
    )
    out = pixels(decoded(result.data[0].b64_json))
    assert out.shape == (64, 64, 3)
    # feathered_paste (engine/image_input.py, feather 4 px): beyond 8 px of the mask, exactly the input
    far = np.ones((64, 64), bool)
    far[24 - 9 : 40 + 9, 24 - 9 : 40 + 9] = False
    assert (out[far] == RED).all()
    assert (out[28:36, 28:36] != RED).any()  # the masked part was redrawn (noise, with these weights)


def test_openai_client_edit_accepts_a_list_of_one_image(live):
    # a list is sent as the form field `image[]`
    result = live.openai().images.edit(
        model=MODEL, image=[("in.png", png(), "image/png")], prompt="a boat", response_format="b64_json", size="64x64"
    )
    assert decoded(result.data[0].b64_json).size == (64, 64)


def test_openai_client_edit_of_two_images_is_refused_naming_the_second(live):
    with pytest.raises(openai.BadRequestError) as excinfo:
        live.openai().images.edit(
            model=MODEL,
            image=[("a.png", png(), "image/png"), ("b.png", png(colour=(0, 0, 255)), "image/png")],
            prompt="a boat",
            response_format="b64_json",
        )
    error = openai_error(excinfo)
    assert error["param"] == "image[1]"
    assert "one picture at a time" in error["message"]


def test_openai_client_edit_extension_fields_reach_the_engine(live):
    def run():
        return live.openai().images.edit(
            model=MODEL, image=("in.png", png(), "image/png"), prompt="a boat", response_format="b64_json",
            size="64x64", extra_body={"strength": 0.5, "seed": 7, "steps": 4},
        )  # fmt: skip

    first, second = run(), run()
    assert first.data[0].model_extra["seed"] == 7
    a, b = (pixels(decoded(r.data[0].b64_json)) for r in (first, second))
    assert int(np.abs(a - b).max()) <= 2  # the engine's parity tolerance


def test_edit_strength_and_steps_are_read_as_numbers_from_the_form(live):
    # 1 step at strength 0.5 runs int(0.5) = 0 steps: refused, which only happens if both were read
    r = edit(live, png(), size="64x64", steps=1, strength=0.5)
    error = assert_error(r, 400, "strength")
    assert "runs no step" in error["message"]


def test_openai_client_edit_n_2_gives_two_images_with_consecutive_seeds(live):
    result = live.openai().images.edit(
        model=MODEL, image=("in.png", png(), "image/png"), prompt="a boat", response_format="b64_json",
        size="64x64", n=2, extra_body={"seed": 100},
    )  # fmt: skip
    assert len(result.data) == 2
    assert [item.model_extra["seed"] for item in result.data] == [100, 101]
    assert {decoded(item.b64_json).size for item in result.data} == {(64, 64)}


def test_openai_client_edit_defaults_to_the_input_size(live):
    result = live.openai().images.edit(
        model=MODEL, image=("in.png", png(96, 64), "image/png"), prompt="a boat", response_format="b64_json"
    )
    assert decoded(result.data[0].b64_json).size == (96, 64)


def test_openai_client_edit_accepts_the_gpt_image_fields_and_answers_a_png(live):
    result = live.openai().images.edit(
        model=MODEL, image=("in.png", png(), "image/png"), prompt="a boat", response_format="b64_json", size="64x64",
        background="auto", quality="high", input_fidelity="high", output_format="webp", user="u1",
    )  # fmt: skip
    assert decoded(result.data[0].b64_json).size == (64, 64)


def test_openai_client_edit_url_response_is_a_hosted_png(live):
    result = live.openai().images.edit(model=MODEL, image=("in.png", png(), "image/png"), prompt="a boat", size="64x64")
    r = httpx.get(result.data[0].url, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the client marks create_variation so
def test_openai_client_variation_returns_a_picture_of_the_input_size(live):
    result = live.openai().images.create_variation(
        model=MODEL, image=("in.png", png(64, 96), "image/png"), response_format="b64_json"
    )
    [item] = result.data
    assert decoded(item.b64_json).size == (64, 96)


# ---- /v1/images/edits: bad input --------------------------------------------------------------


def test_edit_of_text_bytes_is_refused_as_not_an_image(live):
    error = assert_error(edit(live, b"hello, this is a text file\n" * 10), 400, "image")
    assert "not an image" in error["message"]


def test_edit_of_a_truncated_png_is_refused(live):
    whole = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    error = assert_error(edit(live, whole[: len(whole) // 2]), 400, "image")
    assert "truncated or corrupt" in error["message"]


def test_edit_of_a_gif_is_refused_naming_the_format(live):
    error = assert_error(edit(live, encode(Image.new("P", (64, 64)), "GIF")), 400, "image")
    assert "GIF" in error["message"] and "PNG, JPEG or WebP" in error["message"]


def test_edit_of_a_decompression_bomb_is_refused_before_decoding(live):
    bomb = encode(Image.new("1", (5000, 5000)))  # 25 megapixels of one colour in 3 KB
    assert len(bomb) < 10_000
    error = assert_error(edit(live, bomb), 400, "image")
    assert "5000x5000" in error["message"] and "over the limit" in error["message"]


def test_edit_with_a_mask_of_another_size_is_refused_naming_both_sizes(live):
    error = assert_error(edit(live, png(64, 64), mask=hole_mask(96, 64), size="64x64"), 400, "mask")
    assert "96x64" in error["message"] and "64x64" in error["message"]


def test_edit_with_an_all_opaque_mask_is_refused_as_repainting_nothing(live):
    # OpenAI's rule: a mask with an alpha channel repaints its fully transparent pixels, so an
    # opaque one -- even a white one -- repaints nothing, which is refused rather than guessed
    for colour in ((0, 0, 0, 255), (255, 255, 255, 255)):
        error = assert_error(edit(live, png(), mask=png(colour=colour, mode="RGBA"), size="64x64"), 400, "mask")
        assert "repaints nothing" in error["message"]


def test_edit_with_a_half_transparent_mask_is_refused_as_repainting_nothing(live):
    # OpenAI's rule repaints fully transparent pixels only
    error = assert_error(edit(live, png(), mask=png(colour=(0, 0, 0, 128), mode="RGBA"), size="64x64"), 400, "mask")
    assert "no fully transparent pixel" in error["message"]


@pytest.mark.parametrize("strength", ["0", "1.5"])
def test_edit_strength_outside_zero_to_one_is_refused(live, strength):
    assert_error(edit(live, png(), size="64x64", strength=strength), 400, "strength")


def test_edit_of_one_step_at_the_default_strength_is_refused_naming_strength(live):
    # the default strength (0.6) of 1 step runs int(0.6) = 0 steps
    error = assert_error(edit(live, png(), size="64x64", steps=1), 400, "strength")
    assert "runs no step" in error["message"]


def test_edit_over_the_body_limit_is_a_413_error_object(live):
    noise = np.random.default_rng(1).integers(0, 256, 1_500_000, dtype=np.uint8).tobytes()
    r = edit(live, b"\x89PNG\r\n\x1a\n" + noise)
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "request_too_large" and "max_body_bytes" in error["message"]


def test_edit_of_a_picture_no_model_size_resembles_is_refused(live):
    error = assert_error(edit(live, png(2000, 20)), 400, "image")
    assert "2000x20" in error["message"] and "pass a size" in error["message"]


def test_edit_of_a_picture_too_small_to_edit_is_refused(live):
    error = assert_error(edit(live, png(8, 8)), 400, "image")
    assert "too small" in error["message"]


@pytest.mark.parametrize(
    "kind",
    ["palette", "palette with transparency", "16-bit grey", "cmyk jpeg", "rgba half transparent", "rgba with a hole", "webp"],
)
def test_edit_accepts_every_common_pixel_format(live, kind):
    if kind == "palette":
        data = encode(Image.new("RGB", (64, 64), RED).convert("P"))
    elif kind == "palette with transparency":
        image = Image.new("P", (64, 64), 1)
        image.putpalette([0, 0, 0, *RED] + [0] * 762)
        image.paste(0, (16, 16, 48, 48))
        image.info["transparency"] = 0
        data = encode(image)
    elif kind == "16-bit grey":
        data = encode(Image.fromarray(np.full((64, 64), 40000, np.uint16)))
    elif kind == "cmyk jpeg":
        data = encode(Image.new("CMYK", (64, 64), (0, 200, 200, 0)), "JPEG")
    elif kind == "rgba half transparent":
        data = png(colour=(*RED, 128), mode="RGBA")
    elif kind == "rgba with a hole":  # its own mask, by OpenAI's rule
        data = hole_mask()
    else:
        data = encode(Image.new("RGB", (64, 64), RED), "WEBP")
    r = edit(live, data)
    assert r.status_code == 200, r.text
    assert decoded(r.json()["data"][0]["b64_json"]).size == (64, 64)


def test_edit_sent_as_json_is_refused_asking_for_multipart(live):
    with live.client() as c:
        r = c.post(EDITS, json={"model": MODEL, "prompt": "a boat", "image": data_url(png())})
    error = assert_error(r, 400, "image")
    assert "multipart/form-data" in error["message"]


def test_edit_without_an_image_is_refused_naming_image(live):
    error = assert_error(edit(live, None), 400, "image")
    assert "missing required parameter" in error["message"]


def test_edit_with_an_image_as_a_text_field_is_refused(live):
    with live.client() as c:
        r = c.post(EDITS, files={"prompt": (None, "a boat"), "image": (None, "not a file")})
    error = assert_error(r, 400, "image")
    assert "must be a file" in error["message"]


def test_edit_with_two_masks_is_refused_naming_mask(live):
    with live.client() as c:
        r = c.post(EDITS, data={"model": MODEL, "prompt": "a boat"}, files=[
            ("image", ("in.png", png(), "image/png")),
            ("mask", ("a.png", hole_mask(), "image/png")),
            ("mask[]", ("b.png", png(colour=(255, 255, 255)), "image/png")),
        ])  # fmt: skip
    assert_error(r, 400, "mask")


def test_edit_with_stream_true_is_refused_naming_stream(live):
    error = assert_error(edit(live, png(), stream="true"), 400, "stream")
    assert "/v1/chat/completions" in error["message"]


def test_variation_of_text_bytes_is_refused_naming_image(live):
    with live.client() as c:
        r = c.post(VARIATIONS, files={"image": ("in.png", b"not a picture", "image/png")}, data={"model": MODEL})
    assert_error(r, 400, "image")


# ---- chat completions: editing the picture in the conversation ---------------------------------


def test_chat_edits_a_data_url_picture_attached_to_the_last_user_message(live):
    r = post_chat(live, chat_edit(data_url(png())))
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert [part["type"] for part in content] == ["image_url", "text"]
    assert decoded(content[0]["image_url"]["url"]).size == (64, 64)
    assert "edited" in content[1]["text"] and "make it blue" in content[1]["text"]


def test_chat_edit_through_the_openai_client(live):
    completion = live.openai().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "make it blue"},
                                                {"type": "image_url", "image_url": {"url": data_url(png())}}]}],
        extra_body={"response_format": "b64_json", "strength": 0.5, "steps": 4, "seed": 3},
    )  # fmt: skip
    content = completion.choices[0].message.content
    assert [part["type"] for part in content] == ["image_url", "text"]
    assert completion.model_extra["seeds"] == [3]


def test_the_readme_two_turn_chat_with_the_openai_client_edits_the_first_picture(live):
    """The README's example: the assistant's content is sent back as it came, then a new turn."""
    client = live.openai()
    history = [{"role": "user", "content": "a red circle on a blue background"}]
    first = client.chat.completions.create(model=MODEL, messages=history, extra_body={"size": "96x64"})
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "a red circle on a green background"},
    ]
    second = client.chat.completions.create(model=MODEL, messages=history)
    content = second.choices[0].message.content
    assert content[-1]["text"].startswith("Here is the edited image")
    picture = httpx.get(content[0]["image_url"]["url"]).content
    assert Image.open(io.BytesIO(picture)).size == (96, 64)  # the first picture's size, not the default


def test_chat_edit_counts_the_input_picture_as_prompt_tokens(live):
    with_picture = post_chat(live, chat_edit(data_url(png(128, 128)))).json()
    text_only = post_chat(live, {"model": MODEL, "size": "128x128",
                                 "messages": [{"role": "user", "content": "make it blue"}]}).json()  # fmt: skip
    # one token per 64x64 tile of the edited size: 128x128 is 4 tiles, as the image made
    assert with_picture["usage"]["prompt_tokens"] == text_only["usage"]["prompt_tokens"] + 4
    assert with_picture["usage"]["completion_tokens"] == text_only["usage"]["completion_tokens"] == 4


def test_chat_follow_up_edits_the_hosted_picture_of_the_previous_answer(live):
    first = post_chat(live, {"model": MODEL, "size": "96x64", "response_format": "url",
                             "messages": [{"role": "user", "content": "a boat"}]}).json()  # fmt: skip
    answer = first["choices"][0]["message"]["content"]
    follow_up = {
        "model": MODEL,
        "response_format": "b64_json",
        "messages": [
            {"role": "user", "content": "a boat"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "now at night"},
        ],
    }
    r = post_chat(live, follow_up)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert decoded(content[0]["image_url"]["url"]).size == (96, 64)  # the input's size: that picture was edited
    assert content[1]["text"] == "Here is the edited image of: now at night"


def test_chat_refuses_a_remote_picture_url_naming_the_part(live):
    r = post_chat(live, chat_edit("https://example.com/x.png"))
    error = assert_error(r, 400, "messages[0].content[1]")
    assert "data: URL" in error["message"]


@pytest.mark.parametrize("name", ["A" * 32 + ".png", "nonesuch.png"])
def test_chat_refuses_a_hosted_url_of_an_unknown_picture_naming_the_part(live, name):
    r = post_chat(live, chat_edit(f"{live.url}/v1/images/files/{name}"))
    error = assert_error(r, 400, "messages[0].content[1]")
    assert "hosted image cannot be read" in error["message"]


def test_chat_refuses_two_pictures_in_the_last_user_message_naming_the_second(live):
    body = chat_edit(data_url(png()))
    body["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": data_url(png())}})
    error = assert_error(post_chat(live, body), 400, "messages[0].content[2]")
    assert "one picture at a time" in error["message"]


def test_chat_refuses_a_data_url_with_invalid_base64(live):
    error = assert_error(post_chat(live, chat_edit("data:image/png;base64,abc")), 400, "messages[0].content[1]")
    assert "base64" in error["message"]


def test_chat_refuses_a_data_url_that_is_not_an_image(live):
    url = data_url(b"plain words", kind="text/plain")
    error = assert_error(post_chat(live, chat_edit(url)), 400, "messages[0].content[1]")
    assert "text/plain" in error["message"]


def test_chat_refuses_a_bad_picture_in_the_history_naming_its_message(live):
    body = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(b"GIF89a...")}}]},
            {"role": "user", "content": "make it blue"},
        ],
    }
    error = assert_error(post_chat(live, body), 400, "messages[0].content[0]")
    assert "GIF" in error["message"]


def test_chat_edit_stream_reports_the_steps_actually_run(live):
    body = chat_edit(data_url(png()), steps=4, strength=0.5, stream=True)
    events = []
    with live.client() as c, c.stream("POST", CHAT, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    progress = [c["progress"] for c in chunks if "progress" in c]
    assert progress and {p["total_steps"] for p in progress} == {2}  # int(4 * 0.5) of a 4-step schedule
    assert progress[-1]["step"] == 2
    parts = [part for c in chunks if c["choices"] for part in c["choices"][0]["delta"].get("content", [])]
    assert [p["type"] for p in parts] == ["image_url", "text"]
    assert decoded(parts[0]["image_url"]["url"]).size == (64, 64)
    last_progress = max(i for i, c in enumerate(chunks) if "progress" in c)
    first_part = min(i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["delta"].get("content"))
    assert last_progress < first_part


def test_chat_edit_stream_usage_counts_the_input_picture(live):
    body = chat_edit(data_url(png(128, 64)), stream=True, stream_options={"include_usage": True})
    with live.client() as c, c.stream("POST", CHAT, json=body) as r:
        data = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    usage = json.loads(data[-2])["usage"]
    text_only = post_chat(live, {"model": MODEL, "size": "128x64",
                                 "messages": [{"role": "user", "content": "make it blue"}]})  # fmt: skip
    assert usage["prompt_tokens"] == text_only.json()["usage"]["prompt_tokens"] + 2  # 128x64: two 64x64 tiles
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_edit_stream_of_a_bad_picture_is_a_400_before_the_stream(live):
    r = post_chat(live, chat_edit("data:image/png;base64," + base64.b64encode(b"not a png").decode(), stream=True))
    assert_error(r, 400, "messages[0].content[1]")


def test_chat_strength_without_a_picture_is_ignored(live):
    r = post_chat(live, {"model": MODEL, "strength": 0.5, "messages": [{"role": "user", "content": "a boat"}]})
    assert r.status_code == 200, r.text
    assert "generated" in r.json()["choices"][0]["message"]["content"][-1]["text"]


def test_chat_temperature_zero_gives_the_same_seed_for_the_same_picture(live):
    body = chat_edit(data_url(png()), temperature=0)
    first, second = (post_chat(live, body).json() for _ in range(2))
    assert first["seeds"] == second["seeds"]


def test_chat_temperature_zero_gives_another_seed_for_another_picture(live):
    red, blue = (post_chat(live, chat_edit(data_url(png(colour=c)), temperature=0)).json() for c in (RED, (0, 0, 255)))
    assert red["seeds"] != blue["seeds"]


# ---- the engine's own rules (the same validate_request the workers run) ------------------------

EDIT_LIMITS = ModelLimits(name="m", edits=True)


def test_engine_refuses_strength_without_an_image():
    with pytest.raises(InvalidRequestError) as excinfo:
        validate_request(ImageRequest(prompt="a boat", strength=0.5), EDIT_LIMITS)
    assert excinfo.value.param == "strength"


def test_engine_refuses_a_mask_without_an_image():
    with pytest.raises(InvalidRequestError) as excinfo:
        validate_request(ImageRequest(prompt="a boat", mask=png()), EDIT_LIMITS)
    assert excinfo.value.param == "mask"


def test_engine_refuses_an_edit_whose_strength_runs_no_step():
    with pytest.raises(InvalidRequestError) as excinfo:
        validate_request(ImageRequest(prompt="a boat", image=png(), steps=3, strength=0.3), EDIT_LIMITS)
    assert excinfo.value.param == "strength"


def test_engine_accepts_an_edit_with_an_empty_prompt():
    validate_request(ImageRequest(prompt="", image=png(), steps=2, strength=0.5), EDIT_LIMITS)
