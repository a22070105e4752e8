"""A batch whose rows hold different numbers of images, two costs of the padding measured side by side.

1. Visual K/V: packed (only the images given are projected, what the model does) vs padded (every row's
   N_max slots, the layout before).
2. Cross-attention: each query segment (queries seeing the same images) attends on its own rows (the range
   of rows that have one of its queries, what the model does) vs on every row of the batch (the layout
   before: rows without a query ran a dummy one over the segment's k*T visual keys). One hyper layer's whole
   forward + backward; outputs checked equal.

One hyper layer's `visual_kv` (shared LayerNorm, visual K/V projection, MI-Rope, written into [B, Hkv,
N_max*T, D]) forward + backward, on a batch of --rows rows: row 0 with --big images, the others with one.
The padded row runs the same function on the zero-padded [B*N_max, T, H] features with every slot marked
used, which is the work the model did before it kept features packed. Outputs on the real slots are checked
equal; timings are medians of alternating repeats in one process.

    python bench/bench_visual_slots.py                        # owl3-synthetic shape, 16 rows, 16 images in row 0
    python bench/bench_visual_slots.py --preset owl3-synthetic --rows 8 --big 4 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hyperowl.config import PRESETS  # noqa: E402
from hyperowl.models.attention import Segment, make_context  # noqa: E402
from hyperowl.models.hyper_attention import HyperAttention  # noqa: E402
from hyperowl.models.owl3 import Owl3Model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="owl3-synthetic", choices=sorted(k for k in PRESETS if k.startswith("owl3")))
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--big", type=int, default=16, help="images in row 0 (the other rows have one)")
    ap.add_argument("--text", type=int, default=32, help="text tokens after the image placeholders (the question)")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/visual_slots.json"))
    a = ap.parse_args()
    if a.rows < 2 or a.big < 2 or a.repeats < 1 or a.text < 1:
        sys.exit(f"--rows {a.rows} --big {a.big} --repeats {a.repeats} --text {a.text}: expected rows >= 2, big >= 2, "
                 "repeats >= 1, text >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = PRESETS[a.preset]
    torch.manual_seed(0)
    model = Owl3Model(cfg)
    i = next(j for j, layer in enumerate(model.decoder.layers) if isinstance(layer.self_attn, HyperAttention))
    attn, norm = model.decoder.layers[i].self_attn, model.decoder.layers[i].input_layernorm
    b, n_max, t, h = a.rows, a.big, cfg.vision.tokens_per_image, cfg.hidden_size
    present = torch.zeros(b, n_max, dtype=torch.bool)
    present[0] = True
    present[1:, 0] = True
    n = int(present.sum())
    feats = torch.randn(n, t, h)
    image_pos = torch.where(present, torch.arange(n_max)[None] + 1, torch.full((b, n_max), 1 << 40))
    lq = n_max + a.text  # row 0: its n_max placeholders, then the question; the other rows: one image, then text
    positions = torch.arange(lq)[None].expand(b, -1)
    key_valid = torch.ones(b, lq, dtype=torch.bool)
    padded = feats.new_zeros(b, n_max, t, h)
    padded[present] = feats
    slots = present.flatten().nonzero().squeeze(1)
    ctx = {"packed": make_context(cfg, positions, key_valid, 0, None, image_pos, feats, slots),
           "padded": make_context(cfg, positions, key_valid, 0, None, image_pos, padded.flatten(0, 1), None)}
    w = torch.randn(b, cfg.num_kv_heads, n_max * t, cfg.head_dim)
    real = present.repeat_interleave(t, 1)[:, None, :, None]  # [B, 1, N_max*T, 1] real visual tokens

    def step(mode: str) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        k, v = attn.visual_kv(ctx[mode], norm)
        ((k + v) * w * real).sum().backward()
        return time.perf_counter() - t0, torch.where(real, k, 0).detach()

    (_, kp), (_, kd) = step("packed"), step("padded")
    assert torch.allclose(kp, kd, atol=1e-5), "packed and padded visual keys differ on real slots"
    times: dict[str, list[float]] = {"packed": [], "padded": []}
    for r in range(a.repeats):
        for mode in (("packed", "padded") if r % 2 == 0 else ("padded", "packed")):
            times[mode].append(step(mode)[0])
    seg_rows = segment_rows(attn, norm, ctx["packed"], b, lq, h, a.repeats)
    rows = []
    for mode, projected in (("padded", b * n_max), ("packed", n)):
        ms = 1000 * statistics.median(times[mode])
        rows.append({"mode": mode, "images_projected": projected, "visual_tokens_projected": projected * t, "ms": ms})
    speedup = rows[0]["ms"] / rows[1]["ms"]
    print(f"\n{a.preset}, one hyper layer's visual K/V, forward + backward; {b} rows: one with {n_max} images, "
          f"{b - 1} with one ({torch.get_num_threads()} threads, median of {a.repeats})")
    print(f"{'mode':>7} {'images projected':>17} {'visual tokens':>14} {'ms':>8}")
    for row in rows:
        print(f"{row['mode']:>7} {row['images_projected']:>17} {row['visual_tokens_projected']:>14} {row['ms']:>8.2f}")
    print(f"packed is {speedup:.2f}x faster")
    print("\none hyper layer, forward + backward, same batch: cross-attention segments on")
    print(f"{'rows':>9} {'rows x segments':>21} {'ms':>8}")
    for row in seg_rows["results"]:
        print(f"{row['mode']:>9} {row['row_segments']:>21} {row['ms']:>8.2f}")
    print(f"own rows is {seg_rows['speedup']:.2f}x faster")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"preset": a.preset, "rows": b, "big": n_max, "threads": torch.get_num_threads(),
                                       "text": a.text, "repeats": a.repeats, "results": rows, "speedup": speedup,
                                       "segment_rows": seg_rows}, indent=1))
    print(f"wrote {a.out}")


def every_row(seg: Segment, b: int, lq: int) -> Segment:
    """The segment as it ran before: on all b rows, rows without one of its queries pointing at the dummy slot."""
    if seg.rows is None:
        return seg
    idx = seg.idx.new_full((b, seg.idx.shape[1]), lq)
    idx[seg.rows] = seg.idx
    return Segment(seg.k, idx, seg.lo, None)


def segment_rows(attn: HyperAttention, norm: torch.nn.Module, ctx, b: int, lq: int, h: int, repeats: int) -> dict:
    """One hyper layer's forward + backward with each segment on its own rows vs on every row."""
    ctxs = {"own": ctx, "every": dataclasses.replace(ctx, segments=[every_row(s, b, lq) for s in ctx.segments])}
    x = torch.randn(b, lq, h)
    w = torch.randn(b, lq, h)

    def step(mode: str) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        out = attn(norm(x), ctxs[mode], norm)
        (out * w).sum().backward()
        return time.perf_counter() - t0, out.detach()

    (_, own), (_, every) = step("own"), step("every")
    assert torch.allclose(own, every, atol=1e-5), "segments on their own rows and on every row differ"
    times: dict[str, list[float]] = {"own": [], "every": []}
    for r in range(repeats):
        for mode in (("own", "every") if r % 2 == 0 else ("every", "own")):
            times[mode].append(step(mode)[0])
    results = []
    for mode in ("every", "own"):
        segs = ctxs[mode].segments
        results.append({"mode": mode, "row_segments": sum(s.idx.shape[0] if s.idx is not None else b for s in segs),
                        "ms": 1000 * statistics.median(times[mode])})
    return {"results": results, "speedup": results[0]["ms"] / results[1]["ms"]}


if __name__ == "__main__":
    main()
