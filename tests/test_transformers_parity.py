"""Our text backbone vs transformers' Qwen2, our vision tower vs transformers' SigLIP (tiny random configs)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import random_owl3
from hyperowl.checkpoint import QWEN2_KEYS, SIGLIP_KEYS, map_keys


def load_into(model, state, key_map):
    mapping = map_keys(state, key_map)
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for k, name in mapping.items():
            ours[name].copy_(state[k])
    return set(mapping.values())


@pytest.fixture(scope="module")
def qwen2_pair():
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = random_owl3("240728")
    filled = load_into(ours, hf.state_dict(), QWEN2_KEYS)
    text_params = {n for n, _ in ours.named_parameters() if not n.startswith(("vision.", "projector."))}
    assert filled == text_params - set(ours.fusion_parameters())  # every text weight came from Qwen2
    return hf, ours


@torch.no_grad()
def test_text_logits_match_qwen2(qwen2_pair):
    hf, ours = qwen2_pair
    ids = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(1))
    assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_left_padded_batch_and_cached_decode_match_qwen2(qwen2_pair):
    hf, ours = qwen2_pair
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    ref = hf(ids, attention_mask=mask, position_ids=pos).logits
    cache = ours.new_cache(16)
    got = ours(ids, attention_mask=mask, cache=cache).logits
    real = mask.bool()
    assert (got - ref)[real].abs().max() <= 1e-4
    nxt = torch.tensor([[5], [6]])
    full = hf(torch.cat([ids, nxt], 1), attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
              position_ids=torch.cat([pos, pos[:, -1:] + 1], 1)).logits[:, -1]
    assert (ours(nxt, cache=cache).logits[:, -1] - full).abs().max() <= 1e-4


@torch.no_grad()
def test_vision_tower_matches_siglip_penultimate_layer():
    torch.manual_seed(0)
    cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                          image_size=28, patch_size=14, attn_implementation="eager")
    hf = transformers.SiglipVisionModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    from hyperowl.config import SiglipConfig
    from hyperowl.models.siglip import SiglipTower

    tower = SiglipTower(SiglipConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, image_size=28, patch_size=14))
    state = {k: v for k, v in hf.state_dict().items() if ".layers.2." not in k and "post_layernorm" not in k and not k.split(".")[0] == "head" and ".head." not in k}
    mapping = map_keys(state, SIGLIP_KEYS)
    params = dict(tower.named_parameters())
    for k, name in mapping.items():
        params[name.removeprefix("vision.")].copy_(state[k])
    assert set(params) == {n.removeprefix("vision.") for n in mapping.values()}
    px = torch.randn(3, 3, 28, 28)
    ref = hf(pixel_values=px, output_hidden_states=True).hidden_states[-2]
    assert (tower(px) - ref).abs().max() <= 1e-4
    assert (tower(px, chunk=2) - ref).abs().max() <= 1e-4
