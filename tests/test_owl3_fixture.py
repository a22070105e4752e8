"""Parity with the official mPLUG-Owl3 240728 implementation on the tiny reference checkpoint."""

import pytest
import torch

from conftest import features
from hyperowl.engine import Engine, Request, SamplingParams
from hyperowl.models.owl3 import placeholders_from_media_offset

TOL = 1e-4


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def b1_kwargs(ref):
    return dict(attention_mask=ref["b1_attention_mask"], pixel_values=ref["b1_pixel_values"], media_offset=ref["b1_media_offset"])


@torch.no_grad()
def test_vision_tower_and_projection(owl3_tiny, owl3_ref):
    pv = owl3_ref["b1_pixel_values"]
    assert maxdiff(owl3_tiny.vision(pv), owl3_ref["b1_vision_hidden_state_minus2"]) <= TOL
    assert maxdiff(owl3_tiny.encode_images(pv), owl3_ref["b1_image_embeds"]) <= TOL


@torch.no_grad()
def test_logits_and_every_hidden_state(owl3_tiny, owl3_ref):
    out = owl3_tiny(owl3_ref["b1_input_ids"], **b1_kwargs(owl3_ref), output_hidden_states=True)
    assert maxdiff(out.logits, owl3_ref["b1_logits"]) <= TOL
    assert len(out.hidden_states) == 5
    for i, h in enumerate(out.hidden_states):
        assert maxdiff(h, owl3_ref[f"b1_hidden_states_{i}"]) <= TOL, f"hidden state {i}"


@torch.no_grad()
def test_text_only_is_plain_qwen2(owl3_tiny, owl3_ref):
    assert maxdiff(owl3_tiny(owl3_ref["b1_input_ids"]).logits, owl3_ref["textonly_logits"]) <= TOL


@torch.no_grad()
def test_cached_decode_step(owl3_tiny, owl3_ref):
    cache = owl3_tiny.new_cache(32)
    out = owl3_tiny(owl3_ref["b1_input_ids"], **b1_kwargs(owl3_ref), cache=cache)
    assert maxdiff(out.logits, owl3_ref["b1_logits"]) <= TOL
    tok = owl3_ref["b1_decode_step1_input_token"]
    assert out.logits[0, -1].argmax().item() == tok.item()
    step = owl3_tiny(tok, cache=cache)
    assert maxdiff(step.logits, owl3_ref["b1_decode_step1_logits"]) <= TOL


def test_greedy_tokens_single_and_batch_row0(owl3_tiny, owl3_ref):
    params = SamplingParams(max_new_tokens=8, min_new_tokens=8, stop_token_ids=(2, 3))
    pos = placeholders_from_media_offset(owl3_ref["b1_media_offset"], 3, 15)[0]
    a = Request(owl3_ref["b1_input_ids"][0], image_embeds=features(owl3_tiny, owl3_ref["b1_pixel_values"]),
                image_positions=pos, params=params)
    b = Request(owl3_ref["b2_input_ids"][1, 8:], image_embeds=features(owl3_tiny, owl3_ref["b2_pixel_values"][3:]),
                image_positions=torch.tensor([2]), params=params)
    expected = owl3_ref["b1_generated_new_tokens"][0].tolist()
    engine = Engine(owl3_tiny)
    assert engine.generate([a]) == [expected]
    batch = engine.generate([a, b])
    assert batch[0] == owl3_ref["b2_generated_new_tokens"][0].tolist() == expected
    assert batch[1] == engine.generate([b])[0]  # padded row == same row alone
    # code written for earlier versions passes pixels: still the same tokens, with a deprecation warning
    old = Request(owl3_ref["b1_input_ids"][0], pixel_values=owl3_ref["b1_pixel_values"], image_positions=pos,
                  params=params)
    with pytest.warns(DeprecationWarning, match="image_embeds"):
        assert engine.generate([old]) == [expected]


@torch.no_grad()
def test_batch_row0_matches_and_padded_row_is_padding_invariant(owl3_tiny, owl3_ref):
    out = owl3_tiny(owl3_ref["b2_input_ids"], attention_mask=owl3_ref["b2_attention_mask"],
                    pixel_values=owl3_ref["b2_pixel_values"], media_offset=owl3_ref["b2_media_offset"])
    assert maxdiff(out.logits[0], owl3_ref["b2_logits"][0]) <= TOL
    # Row 1 alone (no padding): prompt B = text(2) IMG text(4); its image is the 4th of the batch.
    alone = owl3_tiny(owl3_ref["b2_input_ids"][1:, 8:], pixel_values=owl3_ref["b2_pixel_values"][3:],
                      image_positions=torch.tensor([[2]]))
    assert maxdiff(out.logits[1, 8:], alone.logits[0]) <= TOL
    # ... and differs from the official left-padding quirk, which this test must be able to see.
    assert maxdiff(out.logits[1, 8:], owl3_ref["b2_logits"][1, 8:]) > 1e-2


@torch.no_grad()
def test_drop_in_forward_with_raw_positions_reproduces_official_padded_row(owl3_tiny, owl3_ref):
    # With position_ids = arange the official MI-Rope (raw indices) and text RoPE agree, so the
    # official output is reproducible exactly at every real token.
    ids = owl3_ref["b2_input_ids"]
    out = owl3_tiny(input_ids=ids, attention_mask=owl3_ref["b2_attention_mask"], pixel_values=owl3_ref["b2_pixel_values"],
                    media_offset=owl3_ref["b2_media_offset"], position_ids=torch.arange(15)[None].expand(2, 15))
    real = owl3_ref["b2_attention_mask"].bool()
    assert maxdiff(out.logits[real], owl3_ref["b2_logits_default_position_ids"][real]) <= TOL


def test_media_offset_conversion(owl3_ref):
    pos = placeholders_from_media_offset(owl3_ref["b2_media_offset"], 4, 15)
    assert pos.tolist() == [[4, 8, 9], [10, -1, -1]]
    assert placeholders_from_media_offset([torch.tensor([4, 8]), torch.tensor([1])], 3, 15).tolist() == [[4, 8], [1, -1]]
