"""Tests for image loading/cutting, ChatML rendering and Owl3Processor against the official fixtures."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from hyperowl.errors import InputError
from hyperowl.processing.chat import IMAGE_TOKEN, render_chatml
from hyperowl.processing.images import (
    GRID_SQU_6,
    cut_image,
    cut_prompt,
    image_to_tensor,
    load_image,
    select_grid,
)
from hyperowl.processing.processor import Owl3Processor, ProcessedInputs, collate

from conftest import OWL3_FIXTURE, skip_without

S = 384
STUB_IMAGE_ID = 151646


FIX = OWL3_FIXTURE / "processor"
needs_fixture = skip_without(OWL3_FIXTURE)


@pytest.fixture(scope="module")
def fx() -> dict:
    from safetensors import safe_open

    out: dict = {"json": json.loads((FIX / "processor_outputs.json").read_text())}
    with safe_open(str(FIX / "processor_outputs.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            out[k] = (t.float() / 255 - 0.5) / 0.5 if k.endswith("_u8") else t
    out["images"] = [load_image(FIX / f"input_image_{i}.png") for i in (0, 1)]
    out["paths"] = [str(FIX / f"input_image_{i}.png") for i in (0, 1)]
    return out


def stub_tokenizer() -> Tokenizer:
    """The fixture's stub tokenizer: one id per character (its code point), <|image|> -> 151646."""
    vocab = {chr(i): i for i in range(128)}
    vocab[IMAGE_TOKEN] = STUB_IMAGE_ID
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=chr(0)))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens([IMAGE_TOKEN])
    return tok


SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image|>",
    "<|start_cut|>", "<|end_cut|>", "<|start_video_frame|>", "<|end_video_frame|>",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A small byte-level BPE tokenizer with the Owl3 special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["Describe this image. Compare them. Cut to 2 rows 3 columns with a global view subimg global_view",
              "user assistant system first picture what is in the video"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok


def frames_like_fixture() -> list[Image.Image]:
    """The three synthetic gradient frames behind the fixture's video_pixel_values (found by search)."""
    out = []
    for w, h in [(320, 240), (240, 320), (100, 100)]:
        xs, ys = np.linspace(0, 255, w), np.linspace(0, 255, h)
        x, y = np.broadcast_to(xs[None, :], (h, w)), np.broadcast_to(ys[:, None], (h, w))
        out.append(Image.fromarray(np.floor(np.stack([x, y, (x + y) / 2], -1)).astype(np.uint8)))
    return out


def media_offset_col1(positions: torch.Tensor, length: int) -> torch.Tensor:
    """240728 media_offset column 1 for one row: images whose placeholder index is < t."""
    t = torch.arange(length)[:, None]
    return (t > positions[None, :]).sum(1)


# ---------------------------------------------------------------- images


def test_load_image_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError, match="nope.png.*file not found"):
        load_image(missing)
    text = tmp_path / "notes.png"
    text.write_text("hello, not an image")
    with pytest.raises(InputError, match="notes.png.*not a recognised image") as ei:
        load_image(text)
    assert "\n" not in str(ei.value)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="PNG")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InputError, match="trunc.png"):
        load_image(trunc)
    with Image.open(trunc) as lazy:  # PIL opens lazily; the decode error must still become InputError
        with pytest.raises(InputError, match=r"images\[0\]"):
            load_image(lazy, name="images[0]")
    with pytest.raises(InputError, match="images\\[3\\]"):
        load_image(b"garbage", name="images[3]")
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(InputError, match="unsupported type"):
        load_image(123)  # type: ignore[arg-type]


def test_load_image_modes_and_bytes() -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (5, 7), (1, 2, 3, 4)).save(buf, format="PNG")
    img = load_image(buf.getvalue())
    assert img.mode == "RGB" and img.size == (5, 7) and img.getpixel((0, 0)) == (1, 2, 3)
    assert load_image(Image.new("L", (3, 3), 9)).getpixel((1, 1)) == (9, 9, 9)


@needs_fixture
def test_select_grid_fixture_and_shapes(fx: dict) -> None:
    assert [tuple(s) for s in fx["json"]["cut_shape"]] == [(2, 3), (1, 1), (4, 1), (1, 1)]
    assert select_grid(500, 300, S) == (2, 3)
    assert select_grid(200, 700, S) == (4, 1)
    # Shape match dominates: very wide / tall images take the 1x4 / 4x1 grid, square ones 2x2.
    assert select_grid(2000, 100, S) == (1, 4)
    assert select_grid(100, 2000, S) == (4, 1)
    assert select_grid(100, 100, S) == (2, 2)
    assert select_grid(1152, 384, S) == (1, 3)
    for w in range(10, 3000, 37):
        assert select_grid(w, 777, S) in GRID_SQU_6


@needs_fixture
def test_image_to_tensor_and_cut_exact(fx: dict) -> None:
    nocut = torch.stack([image_to_tensor(im, S) for im in fx["images"]])
    assert nocut.dtype == torch.float32
    assert (nocut - fx["nocut_pixel_values_u8"]).abs().max().item() == 0.0
    parts = [cut_image(im, S) for im in fx["images"]]
    assert [g for _, g in parts] == [(2, 3), (4, 1)]
    cut = torch.cat([p for p, _ in parts])
    assert cut.shape == (12, 3, S, S)
    assert (cut - fx["cut_pixel_values_u8"]).abs().max().item() == 0.0
    # Global view is the last entry of each image.
    assert torch.equal(parts[0][0][-1], nocut[0]) and torch.equal(parts[1][0][-1], nocut[1])
    video = torch.stack([image_to_tensor(f, S) for f in frames_like_fixture()])
    assert (video - fx["video_pixel_values_u8"]).abs().max().item() == 0.0


@needs_fixture
def test_cut_prompt_templates(fx: dict) -> None:
    v2 = cut_prompt(2, 3, "v2_global")
    assert fx["json"]["cut_expanded_user_content"].startswith(v2 + "\nFirst picture. ")
    assert v2.count(IMAGE_TOKEN) == 7
    assert cut_prompt(4, 1, "v2_global") == (
        "Cut to 4 rows 1 columns with a global view\nsubimg(0,0)<|image|>\nsubimg(1,0)<|image|>\n"
        "subimg(2,0)<|image|>\nsubimg(3,0)<|image|>\nglobal_view<|image|>"
    )
    assert cut_prompt(2, 3, "v3_global") == (
        "<|start_cut|>2*3\n<|image|> <|image|> <|image|>\n<|image|> <|image|> <|image|>\n<|image|><|end_cut|>"
    )
    with pytest.raises(ValueError):
        cut_prompt(1, 1, "v9")


# ---------------------------------------------------------------- chat


@needs_fixture
def test_render_chatml_matches_fixture(fx: dict) -> None:
    j = fx["json"]
    msgs = [{"role": "user", "content": j["nocut_expanded_user_content"]}]
    assert render_chatml(msgs) == j["nocut_full_prompt"]
    # The official README idiom: a trailing empty assistant message is the generation prompt.
    msgs2 = msgs + [{"role": "assistant", "content": ""}]
    assert render_chatml(msgs2) == j["nocut_full_prompt"]
    assert render_chatml(msgs2, add_generation_prompt=False) == j["nocut_full_prompt"]
    assert render_chatml([{"role": "user", "content": j["cut_expanded_user_content"]}]) == j["cut_full_prompt"]


def test_render_chatml_roles_and_errors() -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ]
    assert render_chatml(msgs, system="ignored") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>"
        "\n<|im_start|>assistant\nHello.<|im_end|><|endoftext|>\n<|im_start|>user\nAgain<|im_end|>"
        "\n<|im_start|>assistant\n"
    )
    assert render_chatml([{"role": "user", "content": "x"}], system="S", add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nx<|im_end|>"
    )
    with pytest.raises(InputError, match=r"messages\[1\].*role 'bot'"):
        render_chatml([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    with pytest.raises(InputError, match=r"messages\[0\].*content must be a string"):
        render_chatml([{"role": "user", "content": 5}])
    with pytest.raises(InputError, match=r"messages\[0\]: missing 'content'"):
        render_chatml([{"role": "user"}])
    with pytest.raises(InputError, match=r"messages\[1\].*only allowed as the first"):
        render_chatml([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(InputError, match=r"messages\[0\].content\[0\]"):
        render_chatml([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])
    with pytest.raises(InputError, match="messages"):
        render_chatml("hello")  # type: ignore[arg-type]


# ---------------------------------------------------------------- processor vs fixture (stub tokenizer)


@needs_fixture
def test_processor_nocut_matches_fixture_ids(fx: dict) -> None:
    proc = Owl3Processor(stub_tokenizer(), "240728", S)
    msgs = [{"role": "user", "content": "<|image|>\nFirst picture. <|image|>\nCompare them."}]
    out = proc(msgs, images=fx["paths"], cut=False)
    assert out.prompt == fx["json"]["nocut_full_prompt"]
    assert torch.equal(out.input_ids, fx["nocut_input_ids_stubtok"][0])
    assert torch.equal(media_offset_col1(out.image_positions, len(out.input_ids)), fx["nocut_media_offset_stubtok"][0, :, 1])
    assert (out.pixel_values - fx["nocut_pixel_values_u8"]).abs().max().item() == 0.0


@needs_fixture
def test_processor_video_frames_match_fixture(fx: dict) -> None:
    proc = Owl3Processor(stub_tokenizer(), "240728", S)
    msgs = [{"role": "user", "content": "<|video|>\nDescribe this video."}]
    out = proc(msgs, videos=[frames_like_fixture()])
    assert out.prompt == fx["json"]["video_full_prompt"]
    assert (out.pixel_values - fx["video_pixel_values_u8"]).abs().max().item() == 0.0
    col1 = media_offset_col1(out.image_positions, len(out.input_ids))
    assert torch.equal(col1, fx["video_media_offset_stubtok"][0, :, 1])


@needs_fixture
def test_processor_cut_per_image_templates(fx: dict) -> None:
    """Each image gets its own cut template (the official multi-image bug is NOT reproduced)."""
    proc = Owl3Processor(stub_tokenizer(), "240728", S)
    msgs = [{"role": "user", "content": "<|image|>\nFirst picture. <|image|>\nCompare them."}]
    out = proc(msgs, images=fx["images"])
    j = fx["json"]
    # Pixels: 6 crops + global, 4 crops + global, exactly the official pixels.
    assert out.pixel_values.shape == (12, 3, S, S)
    assert (out.pixel_values - fx["cut_pixel_values_u8"]).abs().max().item() == 0.0
    # Token count equals pixel count (official: 9 vs 12).
    assert out.prompt.count(IMAGE_TOKEN) == 12 == out.num_images
    assert j["cut_num_image_tokens"] == 9
    # The first image's part is identical to the official text and ids.
    first = "Cut to 2 rows 3 columns with a global view"
    prefix = j["cut_full_prompt"].split("\nFirst picture. ")[0] + "\nFirst picture. "
    assert out.prompt.startswith(prefix)
    assert prefix.count(first) == 1
    n = len(prefix) - 7 * (len(IMAGE_TOKEN) - 1)
    assert torch.equal(out.input_ids[:n], fx["cut_input_ids_stubtok"][0, :n])
    official_col1 = fx["cut_media_offset_stubtok"][0, :, 1]
    assert torch.equal(media_offset_col1(out.image_positions, len(out.input_ids))[:n], official_col1[:n])
    # The second image uses its own 4x1 template.
    assert out.prompt[len(prefix):].startswith(cut_prompt(4, 1, "v2_global") + "\nCompare them.<|im_end|>")
    assert (out.input_ids[out.image_positions] == STUB_IMAGE_ID).all()


# ---------------------------------------------------------------- processor with a real BPE tokenizer


def test_processor_positions_and_structure(bpe: Tokenizer) -> None:
    proc = Owl3Processor(bpe, "240728", 28)
    img_id = bpe.token_to_id(IMAGE_TOKEN)
    wide = Image.new("RGB", (90, 30), (200, 10, 10))
    msgs = [{"role": "user", "content": "Describe this image. <|image|> and <|image|>"}]
    out = proc(msgs, images=[wide, Image.new("RGB", (20, 20), (0, 0, 255))])
    assert isinstance(out, ProcessedInputs)
    assert out.input_ids.dtype == torch.long and out.image_positions.dtype == torch.long
    # 90x30 -> 1x3 grid + global = 4; 20x20 -> 2x2 + global = 5.
    assert out.pixel_values.shape == (9, 3, 28, 28) and out.pixel_values.dtype == torch.float32
    assert out.image_positions.tolist() == torch.nonzero(out.input_ids == img_id).flatten().tolist()
    assert len(out.image_positions) == 9
    text = bpe.decode(out.input_ids.tolist(), skip_special_tokens=False)
    assert "Cut to 1 rows 3 columns" in text and "Cut to 2 rows 2 columns" in text
    assert out.input_ids[0].item() == bpe.token_to_id("<|im_start|>")
    last_start = torch.nonzero(out.input_ids == bpe.token_to_id("<|im_start|>")).flatten()[-1].item()
    assert bpe.decode(out.input_ids[last_start + 1 :].tolist()) == "assistant\n"
    # Without cutting: one token per image.
    out2 = proc(msgs, images=[wide, wide], cut=False)
    assert out2.pixel_values.shape == (2, 3, 28, 28) and len(out2.image_positions) == 2
    # Text only.
    out3 = proc([{"role": "user", "content": "hi"}], system="sys")
    assert out3.pixel_values is None and out3.image_positions.shape == (0,)
    assert out3.prompt.startswith("<|im_start|>system\nsys<|im_end|>")


def test_processor_241101_templates(bpe: Tokenizer) -> None:
    proc = Owl3Processor(bpe, "241101", 28)
    frames = [Image.new("RGB", (40, 30), (i * 40, 0, 0)) for i in range(3)]
    msgs = [{"role": "user", "content": "<|image|>what<|video|>"}]
    out = proc(msgs, images=[Image.new("RGB", (90, 30))], videos=[frames])
    assert "<|start_cut|>1*3\n<|image|> <|image|> <|image|>\n<|image|><|end_cut|>what" in out.prompt
    assert out.prompt.count("<|start_video_frame|><|image|><|image|><|image|><|end_video_frame|>") == 1
    assert out.pixel_values.shape == (7, 3, 28, 28)
    assert len(out.image_positions) == 7
    ids = out.input_ids.tolist()
    for tok in ("<|start_cut|>", "<|end_cut|>", "<|start_video_frame|>", "<|end_video_frame|>"):
        assert ids.count(bpe.token_to_id(tok)) == 1
    # Video frames are never cut and come in text order after the image's crops.
    assert torch.equal(out.pixel_values[4:], torch.stack([image_to_tensor(f, 28) for f in frames]))


def test_processor_mismatch_errors(bpe: Tokenizer) -> None:
    proc = Owl3Processor(bpe, "240728", 28)
    img = Image.new("RGB", (30, 30))
    one = [{"role": "user", "content": "<|image|> look"}]
    with pytest.raises(InputError, match=r"1 <\|image\|> placeholder\(s\) but 2 image\(s\)") as ei:
        proc(one, images=[img, img])
    assert "put one <|image|> per image" in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(InputError, match="0 <.image.> placeholder"):
        proc([{"role": "user", "content": "no image"}], images=img)
    with pytest.raises(InputError, match="1 <.image.> placeholder.*but 0"):
        proc(one)
    with pytest.raises(InputError, match=r"1 <\|video\|> placeholder\(s\) but 0 video"):
        proc([{"role": "user", "content": "<|video|>"}])
    with pytest.raises(InputError, match="flat list of PIL frames"):
        proc([{"role": "user", "content": "<|video|>"}], videos=[img, img])
    with pytest.raises(InputError, match=r"videos\[0\]: empty frame list"):
        proc([{"role": "user", "content": "<|video|>"}], videos=[[]])
    with pytest.raises(InputError, match=r"videos\[0\]\[1\]"):
        proc([{"role": "user", "content": "<|video|>"}], videos=[[img, "x"]])
    with pytest.raises(InputError, match="system"):
        proc([{"role": "user", "content": "hi"}], system="<|image|>")
    with pytest.raises(InputError, match=r"images\[0\]"):
        proc(one, images=[b"not an image"])
    with pytest.raises(InputError, match="variant"):
        Owl3Processor(bpe, "2023", 28)


def test_processor_does_not_mutate_inputs(bpe: Tokenizer) -> None:
    proc = Owl3Processor(bpe, "240728", 28)
    frames = [Image.new("RGB", (16, 16), (i, i, i)) for i in range(2)]
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "<|image|> then <|video|>", "extra": [1, 2]},
        {"role": "assistant", "content": ""},
    ]
    images = [Image.new("RGB", (50, 20))]
    videos = [frames]
    snapshot = copy.deepcopy(msgs)
    out = proc(msgs, images=images, videos=videos)
    assert msgs == snapshot
    assert len(images) == 1 and len(videos) == 1 and len(videos[0]) == 2
    assert out.prompt.endswith("<|im_start|>assistant\n") and out.prompt.count("assistant") == 1


def test_tokenizer_checks_and_from_dir(tmp_path: Path, bpe: Tokenizer) -> None:
    bare = Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(InputError, match=r"tokenizer: has no <\|image\|> token"):
        Owl3Processor(bare, "240728", 28)
    with pytest.raises(InputError, match="tokenizer.json not found"):
        Owl3Processor.from_dir(tmp_path, "240728", 28)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot be loaded"):
        Owl3Processor.from_dir(tmp_path, "240728", 28)
    bpe.save(str(tmp_path / "tokenizer.json"))
    proc = Owl3Processor.from_dir(tmp_path, "241101", 28)
    assert proc.image_token_id == bpe.token_to_id(IMAGE_TOKEN) and proc.variant == "241101"


def test_collate_left_padding(bpe: Tokenizer) -> None:
    proc = Owl3Processor(bpe, "240728", 28, cut=False)
    a = proc([{"role": "user", "content": "Describe this image in great detail please <|image|> now <|image|>"}],
             images=[Image.new("RGB", (30, 30), (255, 0, 0)), Image.new("RGB", (30, 30), (0, 255, 0))])
    b = proc([{"role": "user", "content": "<|image|>"}], images=[Image.new("RGB", (30, 30), (0, 0, 255))])
    c = proc([{"role": "user", "content": "hi"}])
    batch = collate([a, b, c], pad_id=0)
    L = max(len(a.input_ids), len(b.input_ids), len(c.input_ids))
    assert batch.input_ids.shape == (3, L) and batch.attention_mask.shape == (3, L)
    for r, row in enumerate([a, b, c]):
        pad = L - len(row.input_ids)
        assert batch.attention_mask[r, :pad].sum() == 0 and batch.attention_mask[r, pad:].all()
        assert (batch.input_ids[r, :pad] == 0).all() and torch.equal(batch.input_ids[r, pad:], row.input_ids)
    assert batch.image_positions.shape == (3, 2)
    assert batch.image_positions[1, 1] == -1 and (batch.image_positions[2] == -1).all()
    img_id = bpe.token_to_id(IMAGE_TOKEN)
    valid = batch.image_positions >= 0
    rows = torch.arange(3)[:, None].expand_as(batch.image_positions)
    assert (batch.input_ids[rows[valid], batch.image_positions[valid]] == img_id).all()
    assert batch.image_counts.tolist() == [2, 1, 0]
    assert torch.equal(batch.pixel_values, torch.cat([a.pixel_values, b.pixel_values]))
    empty = collate([c, c], pad_id=7)
    assert empty.pixel_values is None and empty.image_positions.shape == (2, 0)
    with pytest.raises(InputError):
        collate([], pad_id=0)
