"""Hyper-attention semantics (both generations) against a naive dense reference written from the spec,
cache consistency (prefill + decode == full forward), padding invariance, and 'visual K/V once'."""

import math

import pytest
import torch

from conftest import features, random_owl3
from hyperowl.engine import Engine, Request, SamplingParams
from hyperowl.models import hyper_attention

VARIANTS = ["240728", "241101"]


def rotate(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = pos.float()[..., None] * inv
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


@torch.no_grad()
def naive_logits(model, ids, embeds, starts):
    """One unpadded row, dense masks, explicit softmax. starts: placeholder token index of each image."""
    cfg = model.config
    L, D, H, KV = len(ids), cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    rep = H // KV
    pos = torch.arange(L)
    x = model.decoder.embed_tokens(ids)
    n = len(starts)
    for layer in model.decoder.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = rotate(a.q_proj(h).view(L, H, D), pos[:, None], cfg.rope_theta)
        k = rotate(a.k_proj(h).view(L, KV, D), pos[:, None], cfg.rope_theta).repeat_interleave(rep, 1)
        v = a.v_proj(h).view(L, KV, D).repeat_interleave(rep, 1)
        s_txt = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
        s_txt = s_txt.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        out = torch.einsum("hqk,khd->hqd", s_txt.softmax(-1), v)  # [H, L, D]
        if hasattr(a, "v_kv_proj") and n:
            t = embeds.shape[1]
            kv = a.v_kv_proj(layer.input_layernorm(embeds)).view(n, t, KV, 2, D)
            shift = 1 if cfg.variant == "240728" else 0
            img_pos = torch.tensor(starts) + shift
            vk = rotate(kv[..., 0, :], img_pos[:, None, None], cfg.rope_theta).reshape(n * t, KV, D).repeat_interleave(rep, 1)
            vv = kv[..., 1, :].reshape(n * t, KV, D).repeat_interleave(rep, 1)
            img_of_key = torch.arange(n).repeat_interleave(t)
            s_vis = torch.einsum("qhd,khd->hqk", q, vk) / math.sqrt(D)
            if cfg.variant == "240728":
                visible = torch.tensor(starts)[img_of_key][None, :] < pos[:, None]  # placeholder strictly before
                cross = torch.einsum("hqk,khd->hqd", s_vis.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(), vv)
                g = torch.sigmoid(a.gate_proj(out))
                out = torch.where(visible.any(-1)[None, :, None], out * (1 - g) + cross * g, out)
            else:
                visible = torch.tensor(starts)[img_of_key][None, :] <= pos[:, None]
                s = torch.cat([s_vis.masked_fill(~visible, float("-inf")), s_txt], -1)
                out = torch.einsum("hqk,khd->hqd", s.softmax(-1), torch.cat([vv, v], 0))
        x = x + a.o_proj(out.transpose(0, 1).reshape(L, H * D))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.output_head(model.decoder.norm(x))


def make_row(seed, length, starts):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (length,), generator=g)
    ids[torch.tensor(starts, dtype=torch.long)] = 7
    return ids


def pixels(n, seed=0):
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("starts", [[3, 7, 8, 12], [0, 1, 2], [5]])
@torch.no_grad()
def test_matches_dense_reference(variant, starts):
    model = random_owl3(variant)
    ids = make_row(1, 16, starts)
    pv = pixels(len(starts))
    ours = model(ids[None], pixel_values=pv, image_positions=torch.tensor([starts])).logits[0]
    ref = naive_logits(model, ids, model.encode_images(pv), starts)
    assert (ours - ref).abs().max() <= 1e-4
    # the images matter (a test that cannot fail is a defect)
    assert (ours - model(ids[None]).logits[0]).abs().max() > 1e-3


def batch_inputs():
    rows = [(make_row(2, 12, [2, 3, 9]), [2, 3, 9]), (make_row(3, 7, [4]), [4]), (make_row(4, 9, []), [])]
    return rows, pixels(4, seed=5)


def pad_batch(rows, pv):
    L = max(len(r) for r, _ in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pos = torch.full((len(rows), 3), -1)
    for i, (r, s) in enumerate(rows):
        ids[i, L - len(r):] = r
        mask[i, L - len(r):] = 1
        pos[i, : len(s)] = torch.tensor(s, dtype=torch.long) + L - len(r)
    return ids, mask, pos


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_padded_rows_equal_rows_alone(variant):
    model = random_owl3(variant)
    rows, pv = batch_inputs()
    ids, mask, pos = pad_batch(rows, pv)
    out = model(ids, attention_mask=mask, pixel_values=pv, image_positions=pos).logits
    first = 0
    for i, (r, s) in enumerate(rows):
        alone = model(r[None], pixel_values=pv[first : first + len(s)] if s else None,
                      image_positions=torch.tensor([s]) if s else None).logits[0]
        first += len(s)
        assert (out[i, ids.shape[1] - len(r):] - alone).abs().max() <= 1e-4, f"row {i}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_batch_gradients_equal_rows_alone(variant):
    """Training: rows with 3, 1 and 0 images in one padded batch give the parameters (tower, visual K/V,
    gates, LM) the same gradients as the rows run alone. Padding image slots are projected by no layer
    and must leak nothing (not even through the discarded outputs of queries that see no image)."""
    model = random_owl3(variant)
    rows, pv = batch_inputs()
    ids, mask, pos = pad_batch(rows, pv)
    w = torch.randn(ids.shape[1], model.config.vocab_size, generator=torch.Generator().manual_seed(9))
    out = model(ids, attention_mask=mask, pixel_values=pv, image_positions=pos).logits
    (out * w * mask[..., None]).sum().backward()
    batched = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    first = 0
    for r, s in rows:
        alone = model(r[None], pixel_values=pv[first : first + len(s)] if s else None,
                      image_positions=torch.tensor([s]) if s else None).logits[0]
        first += len(s)
        (alone * w[ids.shape[1] - len(r):]).sum().backward()
    assert batched.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(".v_kv_proj." in n for n in batched) and any(n.startswith("vision.") for n in batched)
    for n, p in model.named_parameters():
        if n in batched:
            assert torch.allclose(batched[n], p.grad, rtol=1e-4, atol=1e-4), n


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(variant):
    model = random_owl3(variant)
    rows, pv = batch_inputs()
    ids, mask, pos = pad_batch(rows, pv)
    cont = torch.randint(10, 1000, (3, 5), generator=torch.Generator().manual_seed(9))
    full = model(torch.cat([ids, cont], 1), attention_mask=torch.cat([mask, torch.ones_like(cont)], 1),
                 pixel_values=pv, image_positions=pos).logits
    cache = model.new_cache(4)  # small on purpose: the cache must grow
    step = model(ids, attention_mask=mask, pixel_values=pv, image_positions=pos, cache=cache).logits
    got = [step]
    for j in range(cont.shape[1]):
        got.append(model(cont[:, j : j + 1], cache=cache).logits)
    got = torch.cat(got, 1)
    real = torch.cat([mask, torch.ones_like(cont)], 1).bool()
    assert (got - full)[real].abs().max() <= 1e-4
    assert cache.visual_writes == len(model.config.hyper_layers)


@pytest.mark.parametrize("variant", VARIANTS)
def test_visual_projection_runs_once_per_request(variant):
    model = random_owl3(variant)
    calls = []
    hooks = [l.self_attn.v_kv_proj.register_forward_hook(lambda *a: calls.append(1))
             for l in model.decoder.layers if hasattr(l.self_attn, "v_kv_proj")]
    rows, pv = batch_inputs()
    r, s = rows[0]
    req = Request(r, image_embeds=features(model, pv[:3]), image_positions=torch.tensor(s), params=SamplingParams(max_new_tokens=6))
    tokens = Engine(model).generate([req])[0]
    assert len(tokens) == 6
    assert len(calls) == len(hooks) == 2
    for h in hooks:
        h.remove()


@torch.no_grad()
def test_no_dense_visual_mask_in_240728(monkeypatch):
    """Without grouping, cross-attention calls get no mask: each segment attends exactly its visible prefix.
    With grouping (the default), small segments merge and only their few queries carry a mask."""
    from hyperowl.models import attention

    model = random_owl3("240728")
    seen = []
    real = hyper_attention.attend

    def spy(q, k, v, mask=None, causal=False):
        seen.append((q.shape[2], k.shape[2], mask))
        return real(q, k, v, mask, causal)

    monkeypatch.setattr(hyper_attention, "attend", spy)
    ids = make_row(1, 16, [3, 7, 8, 12])
    run = lambda: model(ids[None], pixel_values=pixels(4), image_positions=torch.tensor([[3, 7, 8, 12]])).logits
    monkeypatch.setattr(attention, "GROUP_QUERIES", 0)
    ungrouped = run()
    # per hyper layer: text self-attention (16 keys), then one call per visible-count segment 1..4 (T = 4)
    assert [n for _, n, _ in seen] == [16, 4, 8, 12, 16] * 2
    assert all(m is None for _, _, m in seen)
    seen.clear()
    monkeypatch.setattr(attention, "GROUP_QUERIES", 8)
    grouped = run()
    # queries per count: 4 (count 1), 1 (2), 4 (3), 3 (4) -> groups {1, 2} (5 queries) and {3, 4} (7)
    assert [n for _, n, _ in seen] == [16, 8, 16] * 2
    cross = [(nq, m) for nq, n, m in seen if n != 16 or m is not None][: 2]
    assert [tuple(m.shape) for _, m in cross] == [(1, 1, 5, 8), (1, 1, 7, 16)]
    assert cross[0][1][0, 0].sum(-1).tolist() == [4, 4, 4, 4, 8]  # four queries see image 1 only, one sees both
    torch.testing.assert_close(grouped, ungrouped, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_grouped_segments_equal_ungrouped_in_padded_batches(monkeypatch, variant):
    """Merging small segments (masked) gives the same logits as one call per count, row by row and padded."""
    from hyperowl.models import attention

    model = random_owl3(variant)
    rows, pv = batch_inputs()
    ids, mask, pos = pad_batch(rows, pv)
    out = {}
    for g in (0, 2, 8, 64):
        monkeypatch.setattr(attention, "GROUP_QUERIES", g)
        out[g] = model(ids, attention_mask=mask, pixel_values=pv, image_positions=pos).logits
    for g in (2, 8, 64):
        valid = mask.bool()
        torch.testing.assert_close(out[g][valid], out[0][valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_segments_run_only_their_rows(monkeypatch, variant):
    """Rows without a query in a segment are left out of its attention call (the range of rows that have one):
    in a batch of rows with 0, 3, 1, 0 images, the segments of queries that see 2-3 images run on row 1 alone.
    Logits and gradients still equal the rows run alone."""
    from hyperowl.models import attention

    monkeypatch.setattr(attention, "GROUP_QUERIES", 0)  # one segment per visible count
    model = random_owl3(variant)
    rows = [(make_row(4, 9, []), []), (make_row(2, 12, [2, 3, 9]), [2, 3, 9]), (make_row(3, 7, [4]), [4]),
            (make_row(5, 6, []), [])]
    pv = pixels(4, seed=5)
    ids, mask, pos = pad_batch(rows, pv)
    seen = []
    real = hyper_attention.attend

    def spy(q, k, v, mask=None, causal=False):
        seen.append((k.shape[2], q.shape[0]))
        return real(q, k, v, mask, causal)

    monkeypatch.setattr(hyper_attention, "attend", spy)
    out = model(ids, attention_mask=mask, pixel_values=pv, image_positions=pos).logits
    t = model.config.vision.tokens_per_image
    lt = ids.shape[1]  # 241101 attends [visual ; text] keys in one call
    extra = 0 if variant == "240728" else lt
    batch_of = {n - extra: b for n, b in seen if n - extra in (t, 2 * t, 3 * t)}
    # count 1: rows 1 and 2; counts 2 and 3: row 1 only
    assert batch_of == {t: 2, 2 * t: 1, 3 * t: 1}
    out.sum().backward()
    first = 0
    for i, (r, s) in enumerate(rows):
        alone = model(r[None], pixel_values=pv[first : first + len(s)] if s else None,
                      image_positions=torch.tensor([s]) if s else None).logits[0]
        first += len(s)
        torch.testing.assert_close(out[i, ids.shape[1] - len(r):], alone, atol=1e-4, rtol=1e-4)


def test_fusion_parameters_are_listable():
    for variant, per_layer in (("240728", 4), ("241101", 2)):
        model = random_owl3(variant)
        names = set(model.fusion_parameters())
        hyper = [n for n in names if n.startswith("decoder.")]
        assert len(hyper) == per_layer * len(model.config.hyper_layers)
        assert any(n.startswith("projector.") for n in names)
