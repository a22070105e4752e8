"""Visual K/V of a batch whose rows hold different numbers of images: packed (only the images given are
projected, what the model does) vs padded (every row's N_max slots, the layout before), side by side.

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
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hyperowl.config import PRESETS  # noqa: E402
from hyperowl.models.attention import make_context  # noqa: E402
from hyperowl.models.hyper_attention import HyperAttention  # noqa: E402
from hyperowl.models.owl3 import Owl3Model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="owl3-synthetic", choices=sorted(k for k in PRESETS if k.startswith("owl3")))
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--big", type=int, default=16, help="images in row 0 (the other rows have one)")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/visual_slots.json"))
    a = ap.parse_args()
    if a.rows < 2 or a.big < 2 or a.repeats < 1:
        sys.exit(f"--rows {a.rows} --big {a.big} --repeats {a.repeats}: expected rows >= 2, big >= 2, repeats >= 1")
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
    positions = torch.arange(n_max + 2)[None].expand(b, -1)
    key_valid = torch.ones(b, n_max + 2, dtype=torch.bool)
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
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"preset": a.preset, "rows": b, "big": n_max, "threads": torch.get_num_threads(),
                                       "repeats": a.repeats, "results": rows, "speedup": speedup}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
