"""mPLUG-Owl2 preprocessing and prompt: bit-exact against the official pipeline's fixture outputs."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hyperowl.errors import InputError
from hyperowl.processing.owl2 import (Owl2Processor, normalize_u8, preprocess, preprocess_u8, render_owl2,
                                      tokenizer_image_token)

from conftest import OWL2_FIXTURE, make_tokenizer, skip_without

PROC = OWL2_FIXTURE / "processor"
pytestmark = skip_without(OWL2_FIXTURE)


@pytest.fixture(scope="module")
def outputs():
    return load_file(str(PROC / "processor_outputs.safetensors")), json.loads((PROC / "processor_outputs.json").read_text())


@pytest.fixture(scope="module")
def images():
    return [Image.open(PROC / f"input_image_{i}.png").convert("RGB") for i in range(2)]


@pytest.mark.parametrize("mode,key", [("resize", "resize_path"), ("pad", "pad_path"), ("crop", "plain_clip")])
def test_pixels_exact(outputs, images, mode, key):
    tensors, meta = outputs
    assert [list(im.size) for im in images] == meta["image_sizes_wh"]
    want = tensors[f"{key}_pixel_values_u8"]
    got = torch.stack([preprocess_u8(im, 448, mode) for im in images])
    assert torch.equal(got, want)
    assert torch.equal(torch.stack([preprocess(im, 448, mode) for im in images]), normalize_u8(want))


def test_prompt_format(outputs):
    _, meta = outputs
    msgs = [{"role": "user", "content": "<|image|>Describe the image."}]
    assert render_owl2(msgs) == meta["prompt"] == "USER: <|image|>Describe the image. ASSISTANT:"
    assert render_owl2(msgs + [{"role": "assistant", "content": ""}]) == meta["prompt"]
    multi = msgs + [{"role": "assistant", "content": "A gradient."}, {"role": "user", "content": "More?"}]
    assert render_owl2(multi) == "USER: <|image|>Describe the image. ASSISTANT: A gradient.</s>USER: More? ASSISTANT:"
    assert render_owl2([{"role": "system", "content": "be brief"}] + msgs) == meta["prompt"]  # TWO_NO_SYS


def test_tokenizer_image_token_matches_stub(outputs):
    tensors, meta = outputs
    stub = lambda text: [1] + [ord(c) for c in text]  # BOS per chunk, chars -> ord
    ids, pos = tokenizer_image_token(meta["prompt"], stub, bos_id=1, image_id=-200)
    assert ids == tensors["stubtok_input_ids"].tolist()
    assert pos == [ids.index(-200)]


def test_processor_call(images, tmp_path):
    tok = make_tokenizer()
    proc = Owl2Processor(tok, image_size=28)
    out = proc([{"role": "user", "content": "<|image|>What colour is the circle?"}], images=[images[0]])
    assert out.prompt == "USER: <|image|>What colour is the circle? ASSISTANT:"
    assert out.pixel_values.shape == (1, 3, 28, 28)
    assert out.image_positions.tolist() == [out.input_ids.tolist().index(proc.image_token_id)]
    assert torch.equal(out.pixel_values[0], preprocess(images[0], 28, "resize"))
    with pytest.raises(InputError, match="placeholder"):
        proc([{"role": "user", "content": "<|image|>hi"}], images=[])
