"""Time-to-first-token and decode speed vs number of images (visual K/V cached once at prefill).

A small Owl3-shaped model (random weights, 729 visual tokens per image) gets a prompt with N images
followed by a question; we time the prefill (vision tower + text prefill) and 16 greedy decode steps.
Decode speed should barely depend on N: visual K/V are read from the cache, never re-projected.
Prints a table and writes bench/results/long_context.json.

    python bench/bench_long_context.py [--images 1 4 16 64] [--hidden 256]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hyperowl.config import Owl3Config, SiglipConfig
from hyperowl.engine import Engine, Request, SamplingParams
from hyperowl.models.owl3 import Owl3Model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--out", default="bench/results/long_context.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = Owl3Config(vocab_size=4096, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_layers=8,
                     num_heads=a.hidden // 64, num_kv_heads=2, hyper_layers=(2, 6),
                     vision=SiglipConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, image_size=378, patch_size=14))
    model = Owl3Model(cfg).eval()
    engine = Engine(model)
    rows = []
    for n in tqdm(a.images, desc="images"):
        ids = torch.randint(10, 4096, (n + 32,))
        pos = torch.arange(n) + 8  # 8 text tokens, N image placeholders, then the question
        req = Request(ids, pixel_values=torch.randn(n, 3, 378, 378), image_positions=pos,
                      params=SamplingParams(max_new_tokens=a.decode + 1, min_new_tokens=a.decode + 1))
        t0 = time.perf_counter()
        stream = engine.stream([req])
        next(stream)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        steps = sum(1 for _ in stream)
        decode = steps / (time.perf_counter() - t1)
        rows.append({"images": n, "visual_tokens": n * cfg.vision.tokens_per_image, "ttft_s": ttft, "decode_tok_s": decode})
    base = rows[0]["decode_tok_s"]
    print(f"{'images':>6} {'visual tokens':>13} {'TTFT s':>8} {'decode tok/s':>13} {'vs first':>9}")
    for r in rows:
        r["decode_vs_first"] = r["decode_tok_s"] / base
        print(f"{r['images']:>6} {r['visual_tokens']:>13} {r['ttft_s']:>8.2f} {r['decode_tok_s']:>13.1f} {r['decode_vs_first']:>9.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"config": {"hidden": a.hidden, "layers": 8, "hyper_layers": [2, 6]}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
