"""The continuous engine over the paged KV cache vs the padded offline engine, on one mixed batch (no server).

One batch of requests, all present at once, cycling through the issue's kinds: text only, 1 image, 8 images,
a 32-frame video; each generates --new tokens (greedy, no stop). Both engines run it to the end:
- padded: `Engine.stream` (one left-padded prefill, every row holding K/V for the longest prompt and the
  largest image count);
- paged: `ContinuousEngine` (chunked prefill one request at a time, one decode forward for all rows over
  their own blocks, gathered per layer).
Reported: prefill time (to every row's first token), median decode step, total, peak K/V bytes (paged: the
pool's blocks in use; the decode groups' kept gathered copies, bounded by keep_bytes, apart), and the K/V
bytes per request (paged: its own blocks; padded: the cache / rows). Outputs are checked equal (greedy).
Image features are random (the engines take features; the tower is not measured here).

    python bench/bench_paged_step.py                        # the embedded model, 8 requests, 16 new tokens
    python bench/bench_paged_step.py --requests 16 --new 32 --out bench/results/paged_step.json
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

KINDS = [("text", 0), ("1 image", 1), ("8 images", 8), ("32-frame video", 32)]


def requests(model, n: int, new: int, seed: int):
    from hyperowl.engine import Request, SamplingParams

    g = torch.Generator().manual_seed(seed)
    t, h = model.config.vision.tokens_per_image, model.config.hidden_size
    out = []
    for i in range(n):
        kind, images = KINDS[i % len(KINDS)]
        length = int(torch.randint(48, 160, (1,), generator=g)) + images
        ids = torch.randint(10, model.config.vocab_size, (length,), generator=g)
        pos = torch.arange(4, 4 + images)
        kw = {}
        if images:
            kw = dict(image_embeds=0.5 * torch.randn(images, t, h, generator=g), image_positions=pos)
        out.append((kind, images, Request(ids, params=SamplingParams(max_new_tokens=new), **kw)))
    return out


def run_padded(model, reqs):
    from hyperowl.engine import Engine

    caches = []
    new_cache = model.new_cache

    def keep(capacity):  # the engine's cache, to read its bytes
        caches.append(new_cache(capacity))
        return caches[-1]

    model.new_cache = keep
    try:
        out = [[] for _ in reqs]
        t0 = time.perf_counter()
        steps, prefill, peak = [], None, 0
        last = t0
        for events in Engine(model).stream(reqs):
            now = time.perf_counter()
            if prefill is None:
                prefill = now - t0
            else:
                steps.append(now - last)
            last = now
            peak = max(peak, caches[-1].nbytes())
            for r, tok in events:
                out[r].append(tok)
        total = time.perf_counter() - t0
    finally:
        model.new_cache = new_cache
    return out, dict(prefill_s=prefill, decode_step_ms=1e3 * statistics.median(steps), total_s=total,
                     peak_kv_mb=peak / 2**20, per_request_kv_mb=[peak / len(reqs) / 2**20] * len(reqs))


def run_paged(model, reqs, chunk: int):
    from hyperowl.batching import ContinuousEngine

    eng = ContinuousEngine(model, kv_cache_bytes=2 << 30, prefill_chunk=chunk)
    for i, r in enumerate(reqs):
        eng.add(i, r)
    out = [[] for _ in reqs]
    t0 = time.perf_counter()
    decode_steps, prefill, peak, kept = [], None, 0, 0
    while eng.has_work():
        s = time.perf_counter()
        prefilling = any(x.state == "prefill" for x in eng.running) or bool(eng.waiting)
        events = eng.step()
        if not prefilling:
            decode_steps.append(time.perf_counter() - s)
        st = eng.stats()
        peak = max(peak, st["blocks_used"] * eng.blocks.unit_bytes)
        kept = max(kept, sum(k.nbytes() for k in eng._kept))  # decode groups' kept gathered K/V (not in the pool)
        for e in events:
            out[e.request_id].append(e.token)
        if prefill is None and all(out):
            prefill = time.perf_counter() - t0
    total = time.perf_counter() - t0
    per = [eng.request_info(i)["kv_bytes"] / 2**20 for i in range(len(reqs))]
    return out, dict(prefill_s=prefill, decode_step_ms=1e3 * statistics.median(decode_steps), total_s=total,
                     peak_kv_mb=peak / 2**20, peak_kept_mb=kept / 2**20, per_request_kv_mb=per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--new", type=int, default=16, help="new tokens per request")
    ap.add_argument("--chunk", type=int, default=512, help="prefill_chunk of the paged engine")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each engine (alternated; best reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/paged_step.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import hyperowl

    model = hyperowl.load(device="cpu", feature_cache_mb=0).model
    work = requests(model, a.requests, a.new, a.seed)
    reqs = [r for _, _, r in work]
    with torch.no_grad():
        run_paged(model, reqs[:2], a.chunk)  # warm-up
        runs = {"padded": [], "paged": []}
        for _ in range(a.repeat):  # alternated, best of each: a shared machine's load moves between runs
            padded_out, r = run_padded(model, reqs)
            runs["padded"].append(r)
            paged_out, r = run_paged(model, reqs, a.chunk)
            runs["paged"].append(r)
    padded, paged = ({k: (min(r[k] for r in rs) if k != "per_request_kv_mb" else rs[0][k]) for k in rs[0]}
                     for rs in (runs["padded"], runs["paged"]))
    same = padded_out == paged_out
    print(f"embedded model, {a.requests} requests ({', '.join(k for k, _ in KINDS)}), {a.new} new tokens each, "
          f"cpu fp32, {torch.get_num_threads()} threads, best of {a.repeat}; outputs equal: {same}")
    print(f"{'engine':8} {'prefill s':>10} {'decode step ms':>15} {'total s':>8} {'peak K/V MB':>12} "
          f"{'kept copies MB':>15}")
    for name, r in (("padded", padded), ("paged", paged)):
        print(f"{name:8} {r['prefill_s']:10.2f} {r['decode_step_ms']:15.1f} {r['total_s']:8.2f} {r['peak_kv_mb']:12.1f} "
              f"{r.get('peak_kept_mb', 0):15.1f}")
    print(f"\n{'request':16} {'prompt':>6} {'images':>6} {'paged K/V MB':>13} {'padded K/V MB/row':>18}")
    for i, (kind, images, r) in enumerate(work):
        print(f"{kind:16} {len(r.input_ids):6d} {images:6d} {paged['per_request_kv_mb'][i]:13.2f} "
              f"{padded['per_request_kv_mb'][i]:18.2f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(requests=[dict(kind=k, prompt=len(r.input_ids), images=n) for k, n, r in work],
                                   new_tokens=a.new, threads=torch.get_num_threads(), repeat=a.repeat,
                                   outputs_equal=same,
                                   padded=padded, paged=paged), indent=1))
    print(f"\nwrote {out}")
    if not same:
        sys.exit("the engines' outputs differ")


if __name__ == "__main__":
    main()
