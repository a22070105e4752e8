"""hyperowl (visual K/V beside the text) vs a LLaVA-style model (visual tokens spliced into the text).

Both models have the same vision tower (SigLIP, 729 tokens per image) and the same Qwen2 LLM, random
weights. The baseline is transformers' LlavaForConditionalGeneration. For N images and a 32-token question
we measure:
- TTFT: prefill (vision tower + LLM) until the first token;
- decode tokens/s over --decode greedy steps with the KV cache;
- peak memory: on CPU the process's peak RSS (weights included; each point in a fresh process, so the peak
  is that point's own); on CUDA the allocator's peak (reset per point; one process per model, which saves
  building a 7B model per point);
- for ours also the *floor*: the vision tower (+ projection) alone on the N images plus a text-only prefill
  of the same prompt, measured in the same process: everything TTFT cannot avoid. It runs after the first
  request, so TTFT is also measured warm (the same request again) for the TTFT/floor ratio, and the table
  shows the FLOP ratio (our prefill / the floor's): what that ratio would be at equal efficiency;
- analytic FLOPs of the prefill, and the fraction of the GEMM rate measured at the start of the run (in the
  run's dtype, on its device).
The baseline stops at the first N that exceeds --budget-gib (on CPU extrapolated from the previous two
points), runs out of memory, or runs past --point-timeout. `--max-images` then searches the largest N our
model prefills within the budget (the card's memory on CUDA). The dtype defaults to the faster one per
device: float32 on CPU (no native bf16 GEMMs on AVX2), bfloat16 on CUDA. Prints a table, writes JSON and a PNG.

    python bench/bench_vs_llava.py --shape a                       # Qwen2-0.5B + a small 729-token tower
    python bench/bench_vs_llava.py --shape b --ours 1 4 16 64      # SigLIP-400M + Qwen2-0.5B (the 1B shape)
    python bench/bench_vs_llava.py --shape tiny --ours 1 2 --baseline 1 2   # smoke
    python bench/bench_vs_llava.py --shape a --ours 1 4 --baseline --dtype bfloat16   # bf16 vs the fp32 rows
    # on a GPU: SigLIP-400M + Qwen2-7B (mPLUG-Owl3-7B's shape), 400 frames = a 2-hour movie at 1 frame / 18 s
    python bench/bench_vs_llava.py --device cuda --shape 7b --ours 1 16 64 128 256 400 --baseline 1 4 16 32 64 --max-images
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

QUESTION = 32
PAPER_TTFT_400_FRAMES_S = 4.0  # mPLUG-Owl3: a 2-hour movie at 1 frame / 18 s (400 frames) in about 4 seconds
SHAPES = {
    # name: (LLM: hidden, layers, heads, kv heads, intermediate, vocab, hyper layers (1-based), tied embeddings),
    #       (vision: hidden, layers, heads, intermediate)
    "a": (dict(hidden=896, layers=24, heads=14, kv=2, inter=4864, vocab=151936, hyper=(1, 9, 17), tie=True),
          dict(hidden=256, layers=3, heads=4, inter=1024)),
    "b": (dict(hidden=896, layers=24, heads=14, kv=2, inter=4864, vocab=151936, hyper=(1, 9, 17), tie=True),
          dict(hidden=1152, layers=27, heads=16, inter=4304)),
    # mPLUG-Owl3-7B: Qwen2-7B with hyper layers 1, 9, 17, 25 + SigLIP-400M
    "7b": (dict(hidden=3584, layers=28, heads=28, kv=4, inter=18944, vocab=151851, hyper=(1, 9, 17, 25), tie=False),
           dict(hidden=1152, layers=27, heads=16, inter=4304)),
    "tiny": (dict(hidden=128, layers=4, heads=4, kv=2, inter=256, vocab=1024, hyper=(2,), tie=True),
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


# -- device helpers ------------------------------------------------------------------------------------------
def resolve_dtype(device: str, dtype: str) -> str:
    """auto: the faster dtype per device (float32 on CPU, bfloat16 on accelerators)."""
    if dtype != "auto":
        return dtype
    return "float32" if torch.device(device).type == "cpu" else "bfloat16"


class Meter:
    """A clock that waits for the device, and the peak memory since reset(): RSS on CPU, allocator on CUDA."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def reset(self) -> None:
        if self.cuda:  # (CPU RSS cannot be reset: there each point runs in a fresh process)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def capacity(self) -> int | None:
        if not self.cuda:
            return None
        return torch.cuda.get_device_properties(self.device.index or 0).total_memory


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def gemm_rate(device: str = "cpu", dtype: str = "float32") -> float:
    meter = Meter(device)
    size = 2048 if not meter.cuda else 8192
    a = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    a @ b
    t = meter.now()
    reps = 5 if not meter.cuda else 20
    for _ in range(reps):
        a @ b
    return reps * 2 * size ** 3 / (meter.now() - t)


# -- workers -------------------------------------------------------------------------------------------------
def build_ours(m: dict, v: dict, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Our model in the given shape: built on the meta device, then random N(0, 0.02) weights made on `device`
    in `dtype` (a 7B model never exists in float32 on the host)."""
    from hyperowl.config import Owl3Config, SiglipConfig
    from hyperowl.models.owl3 import Owl3Model

    cfg = Owl3Config(vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["inter"], num_layers=m["layers"],
                     num_heads=m["heads"], num_kv_heads=m["kv"], hyper_layers=m["hyper"], tie_word_embeddings=m["tie"],
                     vision=SiglipConfig(hidden_size=v["hidden"], intermediate_size=v["inter"], num_layers=v["layers"],
                                         num_heads=v["heads"], image_size=IMAGE, patch_size=PATCH))
    with torch.device("meta"):
        model = Owl3Model(cfg)
    model = model.to(dtype).to_empty(device=device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def ours_point(model, engine, meter: Meter, m: dict, v: dict, n: int, decode: int, prefill_only: bool = False) -> dict:
    """One N: TTFT, decode tokens/s, peak memory, then the floor and a warm TTFT (unless prefill_only)."""
    from hyperowl.engine import Request, SamplingParams

    meter.reset()
    ids = torch.randint(10, m["vocab"], (n + QUESTION,))
    pixels = torch.randn(n, 3, IMAGE, IMAGE)  # on the host, as a processor hands them over
    pos = torch.arange(n)
    new = 1 if prefill_only else decode + 1
    req = Request(ids, pixel_values=pixels, image_positions=pos, params=SamplingParams(max_new_tokens=new, min_new_tokens=new))
    t0 = meter.now()
    stream = engine.stream([req])
    next(stream)
    ttft_cold = meter.now() - t0
    t1 = meter.now()
    steps = sum(1 for _ in stream)
    tok_s = steps / (meter.now() - t1) if steps else None  # None: prefill only
    mem = meter.peak()
    out = {"images": n, "ttft_s": ttft_cold, "decode_tok_s": tok_s, "peak_bytes": mem, "flops": ours_flops(m, v, n),
           "floor_flops": floor_flops(m, v, n)}
    if prefill_only:
        return out
    # the floor: what any design must do, vision tower + a text-only prefill of the same prompt. It runs
    # after the first request (warm allocator and kernels), so TTFT is measured again, warm, to compare.
    with torch.no_grad():
        t = meter.now()
        model.encode_images(pixels)
        vis = meter.now() - t
        text_req = Request(ids, params=SamplingParams(max_new_tokens=1))
        t = meter.now()
        next(engine.stream([text_req]))
        text = meter.now() - t
    again = Request(ids, pixel_values=pixels, image_positions=pos, params=SamplingParams(max_new_tokens=1))
    t = meter.now()
    next(engine.stream([again]))
    ttft_warm = meter.now() - t
    return dict(out, ttft_warm_s=ttft_warm, floor_s=vis + text, floor_vision_s=vis, floor_text_s=text)


def until_oom(ns: list[int], point: Callable[[int], dict], meter: Meter) -> Iterator[dict]:
    """point(n) for each N; the first N that runs out of memory ends the sweep with a row saying so."""
    for n in ns:
        try:
            row = point(n)
        except Exception as e:  # noqa: BLE001 -- only running out of memory is a result; anything else re-raises
            if not out_of_memory(e):
                raise
            row = None
        if row is None:  # outside the except block, so the failed step's tensors can be freed
            meter.reset()
            yield {"images": n, "oom": True}
            return
        yield row


def worker_ours(m: dict, v: dict, ns: list[int], decode: int, dtype: str, device: str, compile_vision: bool = False,
                prefill_only: bool = False) -> Iterator[dict]:
    """One row per N, in this process; stops at the first N that runs out of memory (reported as such)."""
    from hyperowl.engine import Engine

    meter = Meter(device)
    model = build_ours(m, v, getattr(torch, dtype), device)
    if compile_vision:  # the cold TTFT then includes compiling; compare the warm column
        model.vision.compile()
    engine = Engine(model)
    yield from until_oom(ns, lambda n: ours_point(model, engine, meter, m, v, n, decode, prefill_only), meter)


def worker_llava(m: dict, v: dict, ns: list[int], decode: int, dtype: str, device: str) -> Iterator[dict]:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    image_token = m["vocab"] - 1
    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=v["hidden"], intermediate_size=v["inter"], num_hidden_layers=v["layers"],
                                         num_attention_heads=v["heads"], image_size=IMAGE, patch_size=PATCH),
        text_config=Qwen2Config(vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["inter"],
                                num_hidden_layers=m["layers"], num_attention_heads=m["heads"], num_key_value_heads=m["kv"],
                                tie_word_embeddings=m["tie"]),
        image_token_index=image_token, image_seq_length=(IMAGE // PATCH) ** 2, vision_feature_select_strategy="full",
        vision_feature_layer=-2)
    cfg._attn_implementation = "sdpa"
    meter = Meter(device)
    with torch.device(device):  # weights made where they run, in the run's dtype
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=getattr(torch, dtype)).eval()
    t = (IMAGE // PATCH) ** 2

    @torch.no_grad()
    def point(n: int) -> dict:
        meter.reset()
        ids = torch.cat([torch.full((n * t,), image_token), torch.randint(10, m["vocab"] - 1, (QUESTION,))])[None]
        pixels = torch.randn(n, 3, IMAGE, IMAGE)
        t0 = meter.now()
        out = model(input_ids=ids.to(device), pixel_values=pixels.to(device, getattr(torch, dtype)), use_cache=True,
                    logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ttft = meter.now() - t0
        past = out.past_key_values
        t1 = meter.now()
        for _ in range(decode):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tok_s = decode / (meter.now() - t1)
        return {"images": n, "ttft_s": ttft, "decode_tok_s": tok_s, "peak_bytes": meter.peak(), "flops": llava_flops(m, v, n)}

    yield from until_oom(ns, point, meter)


def run_worker(kind: str, shape: str, ns: list[int], args: argparse.Namespace, dtype: str,
               prefill_only: bool = False) -> tuple[list[dict], str | None]:
    """Run a worker process for these N; its rows and, if it stopped early, why ("timeout" or "error")."""
    cmd = [sys.executable, __file__, "--worker", kind, "--shape", shape, "--n", *map(str, ns), "--decode", str(args.decode),
           "--threads", str(args.threads), "--dtype", dtype, "--device", args.device]
    cmd += (["--compile"] if args.compile and kind == "ours" else []) + (["--prefill-only"] if prefill_only else [])
    why, stdout = None, ""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.point_timeout * len(ns))
        stdout = r.stdout
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-3000:])
            why = "error"
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        why = "timeout"
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return rows, why


def find_max_images(probe: Callable[[int], int | None], known: list[tuple[int, int]], capacity: int,
                    max_probes: int = 6, step: float = 0.05) -> tuple[int, int] | None:
    """The largest N whose prefill fits in `capacity` bytes: (N, its peak bytes), or None if none was seen fit.

    probe(n) -> peak bytes, or None when n does not fit (out of memory / over capacity). `known` holds measured
    (N, peak) points; the peak is close to linear in N (visual K/V, features and the prompt all grow with N),
    so the first probe goes where the line through the two largest reaches 97% of capacity, then N walks up
    (or down) by `step` until the answer flips, within `max_probes` probes."""
    fits = sorted((n, p) for n, p in known if p <= capacity)
    if len(fits) < 2:
        return fits[-1] if fits else None
    (n0, p0), (n1, p1) = fits[-2], fits[-1]
    slope = max((p1 - p0) / (n1 - n0), 1.0)
    guess = max(n1 + 1, int(n1 + (0.97 * capacity - p1) / slope))
    best: tuple[int, int] = (n1, p1)
    n, direction = guess, 0
    for _ in range(max_probes):
        peak = probe(n)
        ok = peak is not None and peak <= capacity
        if ok and n > best[0]:
            best = (n, peak)
        if direction == 0:
            direction = 1 if ok else -1
        elif (direction == 1) != ok:  # the answer flipped: the boundary lies within one step
            break
        n = int(n * (1 + step)) + 1 if direction == 1 else int(n / (1 + step))
        if n <= best[0]:
            break
    return best


def plot(rows: list[dict], path: Path, title: str, mem_label: str) -> None:
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
            pts = [dict(r, ttft_s=r["floor_s"]) for r in rows if r["model"] == "hyperowl" and "floor_s" in r]
        if not pts:
            continue
        xs = [r["images"] for r in pts]
        axes[0].plot(xs, [r["ttft_s"] for r in pts], style, label=kind)
        if kind != "floor":
            axes[1].plot(xs, [r["peak_bytes"] / 2 ** 30 for r in pts], style, label=kind)
            axes[2].plot(xs, [r["decode_tok_s"] for r in pts], style, label=kind)
    for ax, name in zip(axes, ("time to first token (s)", f"{mem_label} (GiB)", "decode tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("images (729 visual tokens each)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def worker_main(a: argparse.Namespace, m: dict, v: dict) -> None:
    """A worker process: one JSON line per row (printed as each finishes, so a timeout keeps the rows done)."""
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.worker == "llava":
        rows = worker_llava(m, v, a.n, a.decode, a.dtype, a.device)
    else:
        rows = worker_ours(m, v, a.n, a.decode, a.dtype, a.device, a.compile, a.prefill_only)
    for r in rows:
        print(json.dumps(r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="a")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    ap.add_argument("--ours", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 400])
    ap.add_argument("--baseline", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                    help="our model's dtype; auto: float32 on CPU (bf16 GEMMs are ~8x slower on AVX2 CPUs), bfloat16 on "
                         "CUDA. The baseline always runs in the device's auto dtype")
    ap.add_argument("--compile", action="store_true", help="torch.compile our vision tower (cold TTFT includes compiling)")
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--budget-gib", type=float, default=None,
                    help="memory budget: the baseline stops before exceeding it, --max-images searches within it "
                         "(default: 16 on CPU, the card's memory on CUDA)")
    ap.add_argument("--max-images", action="store_true",
                    help="after the sweep, search the largest N our model prefills within the budget")
    ap.add_argument("--point-timeout", type=float, default=300.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per point (0: torch's default)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/vs_llava_<shape>.json; PNG beside it)")
    ap.add_argument("--worker", choices=["ours", "llava"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--prefill-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    m, v = SHAPES[a.shape]
    if a.worker:
        return worker_main(a, m, v)

    from tqdm import tqdm

    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        meter = Meter(a.device)
    except RuntimeError:
        sys.exit(f"--device {a.device}: not a device torch knows; use cpu or cuda[:index]")
    if meter.cuda and not torch.cuda.is_available():
        sys.exit(f"--device {a.device}: torch sees no CUDA device here (torch {torch.__version__}); use --device cpu")
    dtype, base_dtype = resolve_dtype(a.device, a.dtype), resolve_dtype(a.device, "auto")
    peak = gemm_rate(a.device, dtype)
    budget = int((a.budget_gib or 0) * 2 ** 30) or meter.capacity() or 16 * 2 ** 30
    mem_label = "peak GPU memory" if meter.cuda else "peak RSS"
    rows: list[dict] = []
    notes: list[str] = []

    def sweep(kind: str, ns: list[int], dt: str, check_budget: bool) -> list[dict]:
        """CPU: one fresh process per N (RSS is per process); CUDA: one process for all N (allocator peaks reset)."""
        done: list[dict] = []
        batches = [[n] for n in ns] if not meter.cuda else [list(ns)]
        for batch in tqdm(batches, desc=kind):
            n = batch[0]
            if check_budget and len(done) >= 2 and not meter.cuda:
                p1, p2 = done[-2], done[-1]  # extrapolate the last two points' growth per image
                per_image = max(0.0, (p2["peak_bytes"] - p1["peak_bytes"]) / (p2["images"] - p1["images"]))
                if p2["peak_bytes"] + per_image * (n - p2["images"]) > budget:
                    notes.append(f"{kind}: {n} images would exceed the {budget / 2 ** 30:.0f} GiB budget; stopped")
                    break
            got, why = run_worker(kind, a.shape, batch, a, dt)
            for r in got:
                if r.get("oom"):
                    notes.append(f"{kind}: {r['images']} images ran out of memory; stopped")
                    return done
                done.append(dict(r, model="hyperowl" if kind == "ours" else "llava"))
            if why:
                nxt = batch[len(got)] if len(got) < len(batch) else n
                notes.append(f"{kind}: {nxt} images {'ran past --point-timeout' if why == 'timeout' else 'failed'}; stopped")
                break
        return done

    base = sweep("llava", a.baseline, base_dtype, check_budget=True) if a.baseline else []
    ours_rows = sweep("ours", a.ours, dtype, check_budget=False)
    rows = base + ours_rows
    for r in rows:
        r["gemm_fraction"] = r["flops"] / r["ttft_s"] / peak

    max_images = None
    if a.max_images and ours_rows:
        probes: list[dict] = []

        def probe(n: int) -> int | None:
            got, _ = run_worker("ours", a.shape, [n], a, dtype, prefill_only=True)
            r = got[0] if got and not got[0].get("oom") else None
            probes.append(r or {"images": n, "fits": False})
            return r["peak_bytes"] if r else None

        known = [(r["images"], r["peak_bytes"]) for r in ours_rows]
        found = find_max_images(probe, known, budget)
        if found:
            max_images = {"images": found[0], "peak_bytes": found[1], "budget_bytes": budget, "probes": probes}

    ours = {r["images"]: r for r in ours_rows}
    base_by_n = {r["images"]: r for r in base}
    print(f"\nshape {a.shape} on {a.device}, ours {dtype}, baseline {base_dtype}; measured {dtype} GEMM rate "
          f"{peak / 1e9:.0f} GFLOP/s; {a.decode} decode steps")
    nan = float("nan")
    print(f"{'N':>4} {'model':>9} {'TTFT s':>8} {'warm s':>7} {'floor s':>8} {'warm/floor':>10} {'FLOP ratio':>10} "
          f"{'GFLOP':>7} {'% peak':>7} {'peak GiB':>9} {'decode tok/s':>12} {'TTFT speedup':>12}")
    for r in sorted(rows, key=lambda r: (r["images"], r["model"])):
        floor, warm = r.get("floor_s"), r.get("ttft_warm_s")
        sp = base_by_n[r["images"]]["ttft_s"] / r["ttft_s"] if r["model"] == "hyperowl" and r["images"] in base_by_n else None
        print(f"{r['images']:>4} {r['model']:>9} {r['ttft_s']:>8.2f} {warm or nan:>7.2f} {floor or nan:>8.2f} "
              f"{warm / floor if floor else nan:>10.2f} {r['flops'] / r['floor_flops'] if floor else nan:>10.2f} "
              f"{r['flops'] / 1e9:>7.0f} {100 * r['gemm_fraction']:>6.0f}% "
              f"{r['peak_bytes'] / 2 ** 30:>9.2f} {r['decode_tok_s']:>12.1f} {sp or nan:>12.1f}")
    print(f"TTFT: first request in a fresh {'process' if not meter.cuda else 'model'} (the speedup compares these, cold vs "
          f"cold); warm: the same request again after the floor was measured; FLOP ratio: our prefill FLOPs / the "
          f"floor's, the warm/floor a run at equal efficiency would get; peak: {mem_label}")
    for note in notes:
        print(note)

    summary: dict = {}
    if base_by_n and ours:
        common = [n for n in base_by_n if n in ours]
        if common:
            top = max(common)
            summary["ttft_speedup_at_largest_baseline_n"] = {"images": top,
                                                             "speedup": base_by_n[top]["ttft_s"] / ours[top]["ttft_s"]}
        cap = max(r["peak_bytes"] for r in base_by_n.values())
        fits = [n for n, r in ours.items() if r["peak_bytes"] <= cap]
        summary["images_in_baseline_peak_memory"] = {"memory_gib": cap / 2 ** 30, "baseline": max(base_by_n),
                                                     "hyperowl": max(fits) if fits else 0}
    if ours:
        summary["max_ttft_over_floor"] = max(r["ttft_s"] / r["floor_s"] for r in ours.values())
        summary["max_warm_ttft_over_floor"] = max(r["ttft_warm_s"] / r["floor_s"] for r in ours.values())
        summary["max_flop_ratio_over_floor"] = max(r["flops"] / r["floor_flops"] for r in ours.values())
        lo, hi = min(ours), max(ours)
        summary["decode_ratio_last_vs_first"] = {"images": [lo, hi], "ratio": ours[hi]["decode_tok_s"] / ours[lo]["decode_tok_s"]}
        if 400 in ours:
            summary["ttft_400_images_s"] = {"cold": ours[400]["ttft_s"], "warm": ours[400]["ttft_warm_s"],
                                            "paper_400_frames_s": PAPER_TTFT_400_FRAMES_S}
    if max_images:
        summary["max_images_in_budget"] = {k: max_images[k] for k in ("images", "peak_bytes", "budget_bytes")}
    print(json.dumps(summary, indent=1))
    tag = ("" if dtype == "float32" else "_" + dtype) + ("_compiled" if a.compile else "") + ("" if not meter.cuda else "_cuda")
    out = Path(a.out or f"bench/results/vs_llava_{a.shape}{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": a.shape, "device": a.device, "dtype": dtype, "baseline_dtype": base_dtype,
                               "compile_vision": a.compile, "memory": mem_label, "llm": m, "vision": v,
                               "gemm_flops_per_s": peak, "decode_steps": a.decode, "rows": rows, "notes": notes,
                               "max_images": max_images, "summary": summary}, indent=1))
    plot(rows, out.with_suffix(".png"), f"hyperowl vs LLaVA-style concatenation, shape {a.shape} ({a.device} {dtype})",
         mem_label)


if __name__ == "__main__":
    main()
