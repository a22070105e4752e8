"""hyperowl (visual K/V beside the text) vs a LLaVA-style model (visual tokens spliced into the text).

Both models have the same vision tower (SigLIP, 729 tokens per image) and the same Qwen2 LLM, random
weights, float32 on CPU. The baseline is transformers' LlavaForConditionalGeneration. For N images and a
32-token question we measure, each point in a fresh process (so peak RSS is that point's own):
- TTFT: prefill (vision tower + LLM) until the first token;
- decode tokens/s over --decode greedy steps with the KV cache;
- peak RSS of the process (weights included);
- for ours also the *floor*: the vision tower (+ projection) alone on the N images plus a text-only prefill
  of the same prompt, measured in the same process: everything TTFT cannot avoid. It runs after the first
  request, so TTFT is also measured warm (the same request again) for the TTFT/floor ratio, and the table
  shows the FLOP ratio (our prefill / the floor's): what that ratio would be at equal efficiency;
- analytic FLOPs of the prefill, and the fraction of the GEMM rate measured at the start of the run.
The baseline stops at the first N that exceeds --budget-gib (extrapolated from the previous two points) or
--point-timeout. Prints a table, writes JSON and a PNG.

    python bench/bench_vs_llava.py --shape a                       # Qwen2-0.5B + a small 729-token tower
    python bench/bench_vs_llava.py --shape b --ours 1 4 16 64      # SigLIP-400M + Qwen2-0.5B (the 1B shape)
    python bench/bench_vs_llava.py --shape tiny --ours 1 2 --baseline 1 2   # smoke
    python bench/bench_vs_llava.py --shape a --ours 1 4 --baseline --dtype bfloat16   # bf16 vs the fp32 rows
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

QUESTION = 32
SHAPES = {
    # name: (LLM: hidden, layers, heads, kv heads, intermediate, vocab, hyper layers), (vision: hidden, layers, heads, intermediate)
    "a": (dict(hidden=896, layers=24, heads=14, kv=2, inter=4864, vocab=151936, hyper=(1, 9, 17)),
          dict(hidden=256, layers=3, heads=4, inter=1024)),
    "b": (dict(hidden=896, layers=24, heads=14, kv=2, inter=4864, vocab=151936, hyper=(1, 9, 17)),
          dict(hidden=1152, layers=27, heads=16, inter=4304)),
    "tiny": (dict(hidden=128, layers=4, heads=4, kv=2, inter=256, vocab=1024, hyper=(2,)),
             dict(hidden=64, layers=2, heads=2, inter=128)),
}
IMAGE, PATCH = 378, 14  # 27 x 27 = 729 tokens per image


# -- FLOP counts (multiply-adds x 2) ------------------------------------------------------------------------
def vision_flops(v: dict, n: int) -> float:
    t = (IMAGE // PATCH) ** 2
    per_layer = 2 * t * (4 * v["hidden"] ** 2 + 2 * v["hidden"] * v["inter"]) + 4 * t * t * v["hidden"]
    return n * ((v["layers"] - 1) * per_layer + 2 * t * 3 * PATCH * PATCH * v["hidden"])


def llm_linear_flops(m: dict, tokens: int) -> float:
    d, hd = m["hidden"], m["hidden"] // m["heads"]
    per_tok = 2 * (2 * d * d + 2 * d * m["kv"] * hd + 3 * d * m["inter"])
    return tokens * m["layers"] * per_tok


def ours_flops(m: dict, v: dict, n: int) -> float:
    d, hd = m["hidden"], m["hidden"] // m["heads"]
    t = (IMAGE // PATCH) ** 2
    text = n + QUESTION
    f = vision_flops(v, n) + 2 * n * t * v["hidden"] * d + llm_linear_flops(m, text) + 2 * d * m["vocab"]
    f += m["layers"] * 4 * d * text * text / 2  # causal text attention
    hyper = len(m["hyper"])
    f += hyper * 2 * n * t * d * 2 * m["kv"] * hd  # v_kv_proj, once per image token
    # cross-attention: placeholder i sees i images (240728: strictly before), the question sees all N
    visible = sum(range(n)) + QUESTION * n
    f += hyper * 4 * d * visible * t
    return f


def floor_flops(m: dict, v: dict, n: int) -> float:
    """The floor's work: vision tower + projection on the N images, and a text-only prefill of the prompt."""
    d = m["hidden"]
    t = (IMAGE // PATCH) ** 2
    text = n + QUESTION
    return (vision_flops(v, n) + 2 * n * t * v["hidden"] * d + llm_linear_flops(m, text) + 2 * d * m["vocab"]
            + m["layers"] * 4 * d * text * text / 2)


def llava_flops(m: dict, v: dict, n: int) -> float:
    d = m["hidden"]
    t = (IMAGE // PATCH) ** 2
    seq = n * t + QUESTION
    f = vision_flops(v, n) + 2 * n * t * (v["hidden"] * d + d * d) + llm_linear_flops(m, seq) + 2 * d * m["vocab"]
    return f + m["layers"] * 4 * d * seq * seq / 2


def gemm_rate() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048 ** 3 / (time.perf_counter() - t)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- workers (one point each, in a fresh process) ------------------------------------------------------------
def build_ours(m: dict, v: dict, dtype: torch.dtype = torch.float32):
    """Our model in the given shape: built on the meta device, then random N(0, 0.02) weights on CPU."""
    from hyperowl.config import Owl3Config, SiglipConfig
    from hyperowl.models.owl3 import Owl3Model

    cfg = Owl3Config(vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["inter"], num_layers=m["layers"],
                     num_heads=m["heads"], num_kv_heads=m["kv"], hyper_layers=m["hyper"], tie_word_embeddings=True,
                     vision=SiglipConfig(hidden_size=v["hidden"], intermediate_size=v["inter"], num_layers=v["layers"],
                                         num_heads=v["heads"], image_size=IMAGE, patch_size=PATCH))
    with torch.device("meta"):
        model = Owl3Model(cfg)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(dtype)


def worker_ours(m: dict, v: dict, n: int, decode: int, dtype: str = "float32", compile_vision: bool = False) -> dict:
    from hyperowl.engine import Engine, Request, SamplingParams

    model = build_ours(m, v, getattr(torch, dtype))
    if compile_vision:  # the cold TTFT then includes compiling; compare the warm column
        model.vision.compile()
    engine = Engine(model)
    ids = torch.randint(10, m["vocab"], (n + QUESTION,))
    pixels = torch.randn(n, 3, IMAGE, IMAGE)
    pos = torch.arange(n)
    req = Request(ids, pixel_values=pixels, image_positions=pos,
                  params=SamplingParams(max_new_tokens=decode + 1, min_new_tokens=decode + 1))
    t0 = time.perf_counter()
    stream = engine.stream([req])
    next(stream)
    ttft_cold = time.perf_counter() - t0
    t1 = time.perf_counter()
    steps = sum(1 for _ in stream)
    tok_s = steps / (time.perf_counter() - t1)
    mem = peak_rss()
    # the floor: what any design must do, vision tower + a text-only prefill of the same prompt. It runs
    # after the first request (warm allocator and kernels), so TTFT is measured again, warm, to compare.
    with torch.no_grad():
        t = time.perf_counter()
        model.encode_images(pixels)
        vis = time.perf_counter() - t
        text_req = Request(ids, params=SamplingParams(max_new_tokens=1))
        t = time.perf_counter()
        next(engine.stream([text_req]))
        text = time.perf_counter() - t
    again = Request(ids, pixel_values=pixels, image_positions=pos, params=SamplingParams(max_new_tokens=1))
    t = time.perf_counter()
    next(engine.stream([again]))
    ttft_warm = time.perf_counter() - t
    return {"ttft_s": ttft_cold, "ttft_warm_s": ttft_warm, "decode_tok_s": tok_s, "peak_rss_bytes": mem,
            "floor_s": vis + text, "floor_vision_s": vis, "floor_text_s": text, "flops": ours_flops(m, v, n),
            "floor_flops": floor_flops(m, v, n)}


def worker_llava(m: dict, v: dict, n: int, decode: int) -> dict:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    image_token = m["vocab"] - 1
    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=v["hidden"], intermediate_size=v["inter"], num_hidden_layers=v["layers"],
                                         num_attention_heads=v["heads"], image_size=IMAGE, patch_size=PATCH),
        text_config=Qwen2Config(vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["inter"],
                                num_hidden_layers=m["layers"], num_attention_heads=m["heads"], num_key_value_heads=m["kv"],
                                tie_word_embeddings=True),
        image_token_index=image_token, image_seq_length=(IMAGE // PATCH) ** 2, vision_feature_select_strategy="full",
        vision_feature_layer=-2)
    cfg._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(cfg).eval()
    t = (IMAGE // PATCH) ** 2
    ids = torch.cat([torch.full((n * t,), image_token), torch.randint(10, m["vocab"] - 1, (QUESTION,))])[None]
    pixels = torch.randn(n, 3, IMAGE, IMAGE)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ttft = time.perf_counter() - t0
        past = out.past_key_values
        t1 = time.perf_counter()
        for _ in range(decode):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tok_s = decode / (time.perf_counter() - t1)
    return {"ttft_s": ttft, "decode_tok_s": tok_s, "peak_rss_bytes": peak_rss(), "flops": llava_flops(m, v, n)}


def run_point(kind: str, shape: str, n: int, decode: int, timeout: float, threads: int, dtype: str = "float32",
              compile_vision: bool = False) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", kind, "--shape", shape, "--n", str(n), "--decode", str(decode),
           "--threads", str(threads), "--dtype", dtype] + (["--compile"] if compile_vision else [])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-3000:])
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for kind, style in (("hyperowl", "o-"), ("llava", "s--"), ("floor", ":")):
        pts = [r for r in rows if r["model"] == kind]
        if kind == "floor":
            pts = [dict(r, ttft_s=r["floor_s"]) for r in rows if r["model"] == "hyperowl"]
        if not pts:
            continue
        xs = [r["images"] for r in pts]
        axes[0].plot(xs, [r["ttft_s"] for r in pts], style, label=kind)
        if kind != "floor":
            axes[1].plot(xs, [r["peak_rss_bytes"] / 2 ** 30 for r in pts], style, label=kind)
            axes[2].plot(xs, [r["decode_tok_s"] for r in pts], style, label=kind)
    for ax, name in zip(axes, ("time to first token (s)", "peak RSS (GiB)", "decode tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("images (729 visual tokens each)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="a")
    ap.add_argument("--ours", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 400])
    ap.add_argument("--baseline", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="our model's dtype (the baseline always runs float32); bf16 GEMMs are ~8x slower on AVX2 CPUs")
    ap.add_argument("--compile", action="store_true", help="torch.compile our vision tower (cold TTFT includes compiling)")
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--budget-gib", type=float, default=16.0)
    ap.add_argument("--point-timeout", type=float, default=300.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per point (0: torch's default)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/vs_llava_<shape>.json; PNG beside it)")
    ap.add_argument("--worker", choices=["ours", "llava"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    m, v = SHAPES[a.shape]
    if a.worker:
        if a.threads:
            torch.set_num_threads(a.threads)
        torch.manual_seed(0)
        out = worker_ours(m, v, a.n, a.decode, a.dtype, a.compile) if a.worker == "ours" else worker_llava(m, v, a.n, a.decode)
        print(json.dumps(out))
        return

    from tqdm import tqdm

    if a.threads:
        torch.set_num_threads(a.threads)
    peak = gemm_rate()
    rows: list[dict] = []
    budget = a.budget_gib * 2 ** 30
    done: list[dict] = []
    for n in tqdm(a.baseline, desc="llava baseline"):
        if len(done) >= 2:  # do not start a point that cannot fit: extrapolate the last two points' growth per image
            p1, p2 = done[-2], done[-1]
            per_image = max(0.0, (p2["peak_rss_bytes"] - p1["peak_rss_bytes"]) / (p2["images"] - p1["images"]))
            if p2["peak_rss_bytes"] + per_image * (n - p2["images"]) > budget:
                print(f"llava baseline: {n} images would exceed --budget-gib {a.budget_gib}; stopping", file=sys.stderr)
                break
        r = run_point("llava", a.shape, n, a.decode, a.point_timeout, a.threads)
        if r is None:
            print(f"llava baseline: {n} images failed or ran past --point-timeout {a.point_timeout:.0f} s; stopping",
                  file=sys.stderr)
            break
        done.append(dict(r, model="llava", images=n))
        rows.append(done[-1])
    for n in tqdm(a.ours, desc="hyperowl"):
        r = run_point("ours", a.shape, n, a.decode, a.point_timeout, a.threads, a.dtype, a.compile)
        if r is None:
            print(f"hyperowl: {n} images failed or ran past --point-timeout {a.point_timeout:.0f} s; stopping", file=sys.stderr)
            break
        rows.append(dict(r, model="hyperowl", images=n))
    for r in rows:
        r["gemm_fraction"] = r["flops"] / r["ttft_s"] / peak

    ours = {r["images"]: r for r in rows if r["model"] == "hyperowl"}
    base = {r["images"]: r for r in rows if r["model"] == "llava"}
    print(f"\nshape {a.shape}; measured fp32 GEMM rate {peak / 1e9:.0f} GFLOP/s; {a.decode} decode steps")
    nan = float("nan")
    print(f"{'N':>4} {'model':>9} {'TTFT s':>8} {'warm s':>7} {'floor s':>8} {'warm/floor':>10} {'FLOP ratio':>10} "
          f"{'GFLOP':>7} {'% peak':>7} {'peak GiB':>9} {'decode tok/s':>12} {'TTFT speedup':>12}")
    for r in sorted(rows, key=lambda r: (r["images"], r["model"])):
        floor, warm = r.get("floor_s"), r.get("ttft_warm_s")
        sp = base[r["images"]]["ttft_s"] / r["ttft_s"] if r["model"] == "hyperowl" and r["images"] in base else None
        print(f"{r['images']:>4} {r['model']:>9} {r['ttft_s']:>8.2f} {warm or nan:>7.2f} {floor or nan:>8.2f} "
              f"{warm / floor if floor else nan:>10.2f} {r['flops'] / r['floor_flops'] if floor else nan:>10.2f} "
              f"{r['flops'] / 1e9:>7.0f} {100 * r['gemm_fraction']:>6.0f}% "
              f"{r['peak_rss_bytes'] / 2 ** 30:>9.2f} {r['decode_tok_s']:>12.1f} {sp or nan:>12.1f}")
    print("TTFT: first request in a fresh process (the speedup compares these, cold vs cold); warm: the same request "
          "again after the floor was measured; FLOP ratio: our prefill FLOPs / the floor's, the warm/floor a run at "
          "equal efficiency would get")

    summary = {}
    if base and ours:
        top = max(n for n in base if n in ours)
        summary["ttft_speedup_at_largest_baseline_n"] = {"images": top, "speedup": base[top]["ttft_s"] / ours[top]["ttft_s"]}
        cap = max(base[n]["peak_rss_bytes"] for n in base)
        fits = [n for n, r in ours.items() if r["peak_rss_bytes"] <= cap]
        summary["images_in_baseline_peak_memory"] = {"memory_gib": cap / 2 ** 30, "baseline": max(base),
                                                     "hyperowl": max(fits) if fits else 0}
    if ours:
        summary["max_ttft_over_floor"] = max(r["ttft_s"] / r["floor_s"] for r in ours.values())
        summary["max_warm_ttft_over_floor"] = max(r["ttft_warm_s"] / r["floor_s"] for r in ours.values())
        summary["max_flop_ratio_over_floor"] = max(r["flops"] / r["floor_flops"] for r in ours.values())
        lo, hi = min(ours), max(ours)
        summary["decode_ratio_last_vs_first"] = {"images": [lo, hi], "ratio": ours[hi]["decode_tok_s"] / ours[lo]["decode_tok_s"]}
    print(json.dumps(summary, indent=1))
    tag = ("" if a.dtype == "float32" else "_" + a.dtype) + ("_compiled" if a.compile else "")
    out = Path(a.out or f"bench/results/vs_llava_{a.shape}{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": a.shape, "dtype": a.dtype, "compile_vision": a.compile, "llm": m, "vision": v, "gemm_flops_per_s": peak, "decode_steps": a.decode,
                               "rows": rows, "summary": summary}, indent=1))
    plot(rows, out.with_suffix(".png"), f"hyperowl vs LLaVA-style concatenation, shape {a.shape} (CPU fp32)")


if __name__ == "__main__":
    main()
