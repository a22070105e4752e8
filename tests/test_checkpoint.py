"""Checkpoint loading: variant detection, sharded layouts, strict key mapping, clear errors, save -> load."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import hyperowl
from conftest import random_owl3
from hyperowl.checkpoint import load_owl3, official_state_dict, save_owl3
from hyperowl.errors import CheckpointError


def copy_fixture(src, dst, edit=None):
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_file(str(src / "model.safetensors"))
    if edit:
        state = edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_loads_in_requested_dtype_with_no_meta_left(owl3_fixture_dir):
    m = load_owl3(owl3_fixture_dir, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in m.parameters())
    assert m.config.variant == "240728"
    assert load_owl3(owl3_fixture_dir).dtype == torch.float32  # CPU default


@torch.no_grad()
def test_bfloat16_forward_close_to_float32(owl3_fixture_dir, owl3_ref):
    m = load_owl3(owl3_fixture_dir, dtype=torch.bfloat16)
    out = m(owl3_ref["b1_input_ids"], pixel_values=owl3_ref["b1_pixel_values"], media_offset=owl3_ref["b1_media_offset"])
    assert out.logits.dtype == torch.bfloat16
    assert (out.logits.float() - owl3_ref["b1_logits"]).abs().max() < 0.1


def test_sharded_checkpoint_with_index(owl3_fixture_dir, owl3_ref, tmp_path):
    state = load_file(str(owl3_fixture_dir / "model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / f))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    shutil.copy(owl3_fixture_dir / "config.json", tmp_path / "config.json")
    m = hyperowl.load(tmp_path, device="cpu")
    with torch.no_grad():
        logits = m(owl3_ref["b1_input_ids"], pixel_values=owl3_ref["b1_pixel_values"], media_offset=owl3_ref["b1_media_offset"]).logits
    assert (logits - owl3_ref["b1_logits"]).abs().max() <= 1e-4


def test_optional_siglip_extras_may_be_absent(owl3_fixture_dir, tmp_path):
    drop = lambda s: {k: v for k, v in s.items() if not k.startswith(("vision_model.head.", "vision_model.post_layernorm."))}
    load_owl3(copy_fixture(owl3_fixture_dir, tmp_path / "m", drop))


def test_unknown_key_fails_clearly(owl3_fixture_dir, tmp_path):
    add = lambda s: {**s, "language_model.model.layers.0.self_attn.mystery.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="mystery"):
        load_owl3(copy_fixture(owl3_fixture_dir, tmp_path / "m", add))


def test_missing_key_fails_clearly(owl3_fixture_dir, tmp_path):
    drop = lambda s: {k: v for k, v in s.items() if k != "language_model.model.layers.2.self_attn.v_kv_proj.weight"}
    with pytest.raises(CheckpointError, match="missing .*v_kv_proj"):
        load_owl3(copy_fixture(owl3_fixture_dir, tmp_path / "m", drop))


def test_shape_mismatch_fails_clearly(owl3_fixture_dir, tmp_path):
    d = copy_fixture(owl3_fixture_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_owl3(d)


def test_unknown_layout_and_wrong_model_type(owl3_fixture_dir, tmp_path):
    no_proj = lambda s: {k: v for k, v in s.items() if not k.startswith("vision2text_model")}
    with pytest.raises(CheckpointError, match="generation"):
        load_owl3(copy_fixture(owl3_fixture_dir, tmp_path / "a", no_proj))
    d = copy_fixture(owl3_fixture_dir, tmp_path / "b")
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type"):
        load_owl3(d)


def test_pickle_only_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mplugowl3"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        load_owl3(tmp_path)


@pytest.mark.parametrize("variant", ["240728", "241101"])
@torch.no_grad()
def test_save_then_load_roundtrip_detects_variant(variant, tmp_path):
    model = random_owl3(variant)
    names = set(official_state_dict(model))
    if variant == "241101":
        assert {"vision2text_model.0.weight", "vision2text_model.2.weight"} <= names
        assert not any("gate_proj.0" in n for n in names)
    else:
        assert "vision2text_model.weight" in names and any("gate_proj.0" in n for n in names)
    save_owl3(model, tmp_path)
    loaded = load_owl3(tmp_path)
    assert loaded.config.variant == variant
    ids = torch.randint(10, 1000, (1, 9))
    pv = torch.randn(2, 3, 28, 28)
    pos = torch.tensor([[2, 5]])
    a = model(ids, pixel_values=pv, image_positions=pos).logits
    b = loaded(ids, pixel_values=pv, image_positions=pos).logits
    assert torch.equal(a, b)


@torch.no_grad()
def test_241101_list_media_offset_drop_in():
    model = random_owl3("241101")
    ids = torch.randint(10, 1000, (2, 10))
    pv = torch.randn(3, 3, 28, 28)
    a = model(input_ids=ids, pixel_values=pv, media_offset=[torch.tensor([1, 4]), torch.tensor([6])]).logits
    b = model(ids, pixel_values=pv, image_positions=torch.tensor([[1, 4], [6, -1]])).logits
    assert torch.equal(a, b)


def test_tied_embeddings_have_no_lm_head(tmp_path):
    model = random_owl3("241101", tie_word_embeddings=True)
    assert model.lm_head is None
    save_owl3(model, tmp_path)
    assert "language_model.lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    assert load_owl3(tmp_path).lm_head is None


@torch.no_grad()
def test_load_with_compiled_vision_tower_gives_the_same_features():
    import hyperowl

    eager = hyperowl.load()
    compiled = hyperowl.load(compile_vision=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # compiled in place: names unchanged
    px = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(compiled.encode_images(px), eager.encode_images(px), atol=1e-4, rtol=1e-4)
    assert compiled.vision._compiled_call_impl is not None  # really compiled
