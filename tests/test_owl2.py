"""mPLUG-Owl2: parity with the official implementation on the owl2-tiny fixture, batching, cache, GQA,
checkpoint key-map strictness, load dispatch, and text-only parity with transformers' Llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hyperowl
from hyperowl.checkpoint import load_owl2
from hyperowl.config import OWL2_PRESETS
from hyperowl.engine import Engine, Request, SamplingParams
from hyperowl.errors import CheckpointError, InputError
from hyperowl.models.owl2 import Owl2Model, positions_from_placeholders

from conftest import OWL2_FIXTURE as FIX, features, require_fixture

TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return load_file(str(require_fixture(FIX) / "reference_outputs.safetensors"))


@pytest.fixture(scope="module")
def owl2():
    return load_owl2(require_fixture(FIX))


def random_owl2(seed: int = 0, **overrides) -> Owl2Model:
    torch.manual_seed(seed)
    model = Owl2Model(OWL2_PRESETS["owl2-tiny"].replace(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ffn_ln" in name:
                p.copy_((1 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else 0.05 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def native(ids_with_ph: torch.Tensor):
    """Official ids (-200 placeholders) -> our ids (placeholder id 0) + image_positions."""
    pos = positions_from_placeholders(ids_with_ph)
    return ids_with_ph.clamp(min=0), pos


# -- fixture parity ------------------------------------------------------------------------------------------
def test_vit_and_abstractor_parity(owl2, ref):
    with torch.no_grad():
        vit = owl2.vision(ref["images"])
        assert (vit - ref["vision_last_hidden_state"]).abs().max() <= TOL
        feats = owl2.abstractor(vit)
        assert (feats - ref["image_features_after_abstractor"]).abs().max() <= TOL
        assert (owl2.encode_images(ref["images"]) - ref["image_features_after_abstractor"]).abs().max() <= TOL


def test_recomputed_sincos_tables_equal_the_stored_buffers(owl2):
    sd = load_file(str(FIX / "model.safetensors"))
    for i, layer in enumerate(owl2.abstractor.layers):
        a = layer.crossattention.attention
        pre = f"model.visual_abstractor.encoder.layers.{i}.crossattention.attention."
        assert torch.allclose(a.q_pos_embed, sd[pre + "q_pos_embed"], atol=1e-6)
        assert torch.allclose(a.k_pos_embed, sd[pre + "k_pos_embed"], atol=1e-6)


def test_dropin_forward_logits_hidden_states(owl2, ref):
    with torch.no_grad():
        out = owl2(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], images=ref["images"],
                   output_hidden_states=True)
    assert out.logits.shape == ref["logits"].shape
    assert (out.logits - ref["logits"]).abs().max() <= TOL
    assert torch.equal(out.modality_indicators, ref["modality_indicators"].long())
    assert torch.equal(out.attention_mask, ref["expanded_attention_mask"].long())
    assert (out.hidden_states[0] - ref["inputs_embeds"]).abs().max() <= TOL
    for i in range(5):
        assert (out.hidden_states[i] - ref[f"hidden_states_{i}"]).abs().max() <= TOL, i


def test_native_forward_equals_dropin(owl2, ref):
    ids, pos = native(ref["input_ids"])
    with torch.no_grad():
        feats = owl2.encode_images(ref["images"])
        out = owl2(ids, image_embeds=feats, image_positions=pos)
    assert (out.logits - ref["logits"]).abs().max() <= TOL


def test_text_only_logits(owl2, ref):
    with torch.no_grad():
        out = owl2(input_ids=ref["textonly_input_ids"])
    assert (out.logits - ref["textonly_logits"]).abs().max() <= TOL


def test_greedy_tokens_via_engine(owl2, ref):
    ids, pos = native(ref["input_ids"])
    want = ref["generate_output"][0, ids.shape[1]:].tolist()
    out = Engine(owl2).generate([Request(ids[0], image_embeds=features(owl2, ref["images"]), image_positions=pos[0],
                                         params=SamplingParams(max_new_tokens=len(want)))])
    assert out[0] == want


def test_load_dispatch_returns_owl2(ref):
    m = hyperowl.load(FIX, device="cpu")
    assert isinstance(m.model, Owl2Model) and m.family.name == "owl2"
    with torch.no_grad():
        assert (m(input_ids=ref["input_ids"], images=ref["images"]).logits - ref["logits"]).abs().max() <= TOL


# -- batching, cache, GQA ------------------------------------------------------------------------------------
def _prompts(ref):
    """Three rows: the fixture prompt (1 image), a shorter one with 2 images, a text-only one."""
    ids, pos = native(ref["input_ids"])
    g = torch.Generator().manual_seed(1)
    px2 = torch.randn(2, 3, 28, 28, generator=g)
    return [
        (ids[0], ref["images"], pos[0]),
        (torch.tensor([1, 5, 0, 7, 0, 9]), px2, torch.tensor([2, 4])),
        (torch.tensor([1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]), None, None),
    ]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_padded_batch_rows_equal_single_rows(ref, kv_heads, owl2):
    model = owl2 if kv_heads == 4 else random_owl2(num_kv_heads=kv_heads)
    rows = _prompts(ref)
    params = SamplingParams(max_new_tokens=6)
    engine = Engine(model)
    singles = [engine.generate([Request(i, image_embeds=features(model, p), image_positions=q, params=params)])[0]
               for i, p, q in rows]
    batch = engine.generate([Request(i, image_embeds=features(model, p), image_positions=q, params=params)
                             for i, p, q in rows])
    assert batch == singles
    # and the logits of the last prompt token, row by row, through one padded forward
    from hyperowl.processing.processor import ProcessedInputs, collate

    b = collate([ProcessedInputs(i, p, q, "") for i, p, q in rows], pad_id=0)
    with torch.no_grad():
        padded = model(b.input_ids, b.attention_mask, b.pixel_values, b.image_positions).logits[:, -1]
        for r, (i, p, q) in enumerate(rows):
            single = model(i[None], pixel_values=p, image_positions=None if q is None else q[None]).logits[0, -1]
            assert (padded[r] - single).abs().max() <= TOL, r


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_prefill_then_decode_equals_full_forward(ref, kv_heads):
    model = random_owl2(seed=kv_heads, num_kv_heads=kv_heads)
    ids, pos = native(ref["input_ids"])
    extra = torch.tensor([[17, 99, 300]])
    with torch.no_grad():
        full = model(torch.cat([ids, extra], 1), images=ref["images"], image_positions=pos).logits
        cache = model.new_cache(4)  # small on purpose: the cache must grow
        logits = [model(ids, images=ref["images"], image_positions=pos, cache=cache).logits[:, -1]]
        for t in extra[0]:
            logits.append(model(t.view(1, 1), cache=cache).logits[:, -1])
    got = torch.stack(logits, 1)
    want = full[:, -(extra.shape[1] + 1):]
    assert (got - want).abs().max() <= TOL


def test_gqa_differs_from_dense_only_by_weights():
    m = random_owl2(num_kv_heads=2)
    assert m.decoder.layers[0].self_attn.k_proj.multiway[1].weight.shape == (2 * 16, 64)


def test_image_count_mismatch_is_an_input_error(owl2, ref):
    ids, pos = native(ref["input_ids"])
    with pytest.raises(InputError, match="images"):
        owl2(ids, images=torch.cat([ref["images"]] * 2), image_positions=pos)
    with pytest.raises(InputError, match="no images"):
        owl2(ids, image_positions=pos)


# -- checkpoints ---------------------------------------------------------------------------------------------
def _copy_fixture(tmp_path: Path, edit) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(require_fixture(FIX) / "config.json", d / "config.json")
    sd = load_file(str(FIX / "model.safetensors"))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"))
    return d


def test_missing_sincos_buffers_are_recomputed(tmp_path, ref):
    d = _copy_fixture(tmp_path, lambda sd: [sd.pop(k) for k in list(sd) if k.endswith(("pos_embed", "inv_freq"))])
    m = load_owl2(d)
    with torch.no_grad():
        assert (m(input_ids=ref["input_ids"], images=ref["images"]).logits - ref["logits"]).abs().max() <= TOL


def test_unknown_key_is_refused(tmp_path):
    d = _copy_fixture(tmp_path, lambda sd: sd.__setitem__("model.visual_abstractor.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unknown checkpoint keys"):
        load_owl2(d)


def test_missing_key_is_refused(tmp_path):
    d = _copy_fixture(tmp_path, lambda sd: sd.pop("model.layers.1.self_attn.v_proj.multiway.1.weight"))
    with pytest.raises(CheckpointError, match="missing"):
        load_owl2(d)


def test_save_and_reload_round_trip(tmp_path, ref):
    from hyperowl.checkpoint import save_owl2

    m = random_owl2(num_kv_heads=2)
    save_owl2(m, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "mplug_owl2"
    m2 = hyperowl.load(tmp_path / "out", device="cpu")
    ids, pos = native(ref["input_ids"])
    with torch.no_grad():
        assert torch.equal(m(ids, images=ref["images"], image_positions=pos).logits,
                           m2(ids, images=ref["images"], image_positions=pos).logits)


# -- transformers oracle: text-only path == LlamaForCausalLM (GQA included) ---------------------------------
def test_text_only_matches_transformers_llama():
    transformers = pytest.importorskip("transformers")
    cfg = OWL2_PRESETS["owl2-tiny"].replace(num_kv_heads=2)
    hf_cfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                                      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                                      rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                                      max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = random_owl2(num_kv_heads=2)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.08) if not name.endswith("norm.weight") else p.copy_(1 + 0.1 * torch.randn_like(p))
        sd = hf.state_dict()
        own = dict(ours.named_parameters())
        for k, v in sd.items():
            if k == "lm_head.weight":
                own["lm_head.weight"].copy_(v)
                continue
            name = "decoder." + k[len("model."):]
            for part in ("input_layernorm", "post_attention_layernorm", "k_proj", "v_proj"):
                name = name.replace(f".{part}.", f".{part}.multiway.0.")
            own[name].copy_(v)
    ids = torch.tensor([[1, 5, 9, 33, 2, 700, 41, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = ours(ids).logits
        assert (got - want).abs().max() <= TOL
        # a left-padded row: compare the real tokens with the unpadded run
        got_pad = ours(ids, attention_mask=mask).logits[:, 2:]
        assert (got_pad - ours(ids[:, 2:]).logits).abs().max() <= TOL


def test_three_or_more_images_in_a_row():
    """The placeholder check compared [B, N] with [B, N - 1] masks, which broadcast only up to two images per row:
    a prompt with three or more images crashed. Each image still lands where its placeholder is: moving the last
    one changes the logits after it."""
    m = random_owl2(num_kv_heads=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (1, 20), generator=g)
    size = m.config.vision.image_size
    with torch.no_grad():
        emb = m.encode_images(torch.randn(4, 3, size, size, generator=g))
        a = m(ids, image_embeds=emb, image_positions=torch.tensor([[2, 5, 6, 9]])).logits[0, -1]
        b = m(ids, image_embeds=emb, image_positions=torch.tensor([[2, 5, 6, 12]])).logits[0, -1]
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-4
