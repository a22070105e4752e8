"""Live video sessions vs the naive path: a 1-fps stream, questions after 10 s, 1 min, 10 min (1 h with --hour).

For each model (the embedded model; shape a of bench_vs_llava.py: Qwen2-0.5B-sized LLM with 3 hyper layers
and a small 729-token tower, random weights) a stream of synthetic-world frames (an object crossing the
image) is fed frame by frame, faster than real time, into one `LiveSession`; at each question time:
- live TTFT: `ask(question, max_new_tokens=1)` once every frame before it is in (the session prefills the
  question only);
- naive TTFT: what a system without live sessions does, a fresh chat over the whole history (the same
  conversation: every earlier question and answer, each turn's frames as a `<|video|>`): plan, encode every
  frame through the tower (no feature cache), one prefill, first token;
- memory: the live session's K/V bytes (`LiveSession.memory_bytes`, the ceiling's measure) vs the naive
  prefill's K/V bytes + its frame features (both measured, not estimated);
- ingest: frames per second of wall time between questions (tower + appending), and the tower's share;
- the tokens the question prefilled and the text slots the cache holds (both bounded under a ceiling).
The live answers' first tokens equal the naive ones (checked; greedy). Prints a table, writes JSON and a PNG.

    python bench/bench_live.py                         # embedded + shape a, 10 s, 1 min, 10 min
    python bench/bench_live.py --models embedded --times 10 60 600 3600     # or --hour
    python bench/bench_live.py --models a --memory-gb 2 --hour --no-naive   # the ceiling over an hour
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

QUESTION = "What happens in the video?"


def world_frames(n: int, size: int = 64):
    """n frames of a red square crossing the field every 20 s, with a blue circle present half the time."""
    from hyperowl.data.synthetic.world import Obj, Scene

    cache = {}
    for k in range(n):
        x = 8 + (k % 20) * 48 // 19
        circle = (k // 20) % 2 == 1
        key = (x, circle)
        if key not in cache:
            objs = [Obj("square", "red", "large", x, 32)] + ([Obj("circle", "blue", "small", 32, 8)] if circle else [])
            cache[key] = Scene(tuple(objs), "white", 64).render()
        yield cache[key]


def load_model(name: str):
    import hyperowl
    from hyperowl.pipeline import Pipeline

    owl = hyperowl.load(device="cpu", feature_cache_mb=0)  # the naive path gets no feature-cache help
    if name == "embedded":
        return owl
    from bench_vs_llava import IMAGE, SHAPES, build_ours

    from hyperowl.processing.processor import Owl3Processor

    m, v = SHAPES[name]
    model = build_ours(m, v)
    proc = Owl3Processor(owl.processor.tokenizer, variant="240728", image_size=IMAGE, cut=False)
    return Pipeline(model, proc, feature_cache_mb=0)


def naive(pipe, messages, videos) -> tuple[float, int, int]:
    """A fresh chat over the whole history: (TTFT s, first token, bytes of features + K/V)."""
    t = time.perf_counter()
    plan = pipe.processor.plan(messages, videos=videos)
    feats = pipe.encoder.encode(plan)
    cache = pipe.model.new_cache(plan.input_ids.numel() + 1)
    with torch.no_grad():
        logits = pipe.model(plan.input_ids[None], image_embeds=feats, image_positions=plan.image_positions[None],
                            cache=cache, last_logits_only=True).logits[0, -1]
    token = int(logits.argmax())
    ttft = time.perf_counter() - t
    mem = cache.nbytes() + feats.numel() * feats.element_size()
    del feats, cache
    return ttft, token, mem


def run(name: str, times: list[int], fps: float, memory_gb, do_naive: bool, repeat: int = 1) -> list[dict]:
    pipe = load_model(name)
    tower_s = [0.0]
    tower = pipe.encoder.encode_frames

    def timed(px):
        t = time.perf_counter()
        out = tower(px)
        tower_s[0] += time.perf_counter() - t
        return out

    pipe.encoder.encode_frames = timed
    warm = pipe.live()  # one-time costs (first forward, allocator) are not the 10-s question's
    warm.add_frames(next(world_frames(1)))
    warm.ask(QUESTION, max_new_tokens=1)
    warm.close()
    live = pipe.live(memory_gb=memory_gb)
    frames = world_frames(int(max(times) * fps))
    videos, messages, rows = [], [], []
    seen = 0
    for at in times:
        n = int(at * fps) - seen
        batch = [next(frames) for _ in range(n)]
        tower_s[0] = 0.0
        t = time.perf_counter()
        for f in batch:  # frame by frame, as a stream delivers them
            live.add_frames(f)
        live.flush()
        ingest = time.perf_counter() - t
        seen += n
        before = live.cache.length
        t = time.perf_counter()
        answer = live.ask(QUESTION, stream=True, max_new_tokens=1)
        first = next(answer, "")
        ttft = time.perf_counter() - t
        question_tokens = live.cache.length - before  # what the question prefilled (the memory policy runs later)
        rest = "".join(answer)
        live_token = int(live.last_logits.argmax())
        for _ in range(repeat - 1):  # the same question again (a text-only turn): the least of them is reported
            t = time.perf_counter()
            again = live.ask(QUESTION, stream=True, max_new_tokens=1)
            next(again, "")
            ttft = min(ttft, time.perf_counter() - t)
            "".join(again)
        row = {"model": name, "stream_s": at, "frames": seen, "frames_kept": live.status()["frames_kept"],
               "live_ttft_s": ttft, "live_bytes": live.memory_bytes(), "ingest_fps": n / ingest,
               "tower_share": tower_s[0] / ingest, "question_tokens": question_tokens, "text_slots": live.cache.length}
        videos.append(batch)
        messages.append({"role": "user", "content": "<|video|>" + QUESTION})
        if do_naive:
            naive_ttft, naive_token, naive_bytes = naive(pipe, messages, videos)
            row.update(naive_ttft_s=naive_ttft, naive_bytes=naive_bytes, speedup=naive_ttft / ttft,
                       same_first_token=naive_token == live_token)
        messages.append({"role": "assistant", "content": first + rest})
        rows.append(row)
        print(fmt_row(row), flush=True)
    live.close()
    return rows


HEAD = (f"{'model':>9} {'stream':>7} {'frames':>6} {'kept':>5} {'live TTFT':>10} {'naive TTFT':>11} {'speedup':>8} "
        f"{'live MiB':>9} {'naive MiB':>10} {'ingest fps':>10} {'tower':>6} {'q tok':>5} {'text':>6} same")


def fmt_row(r: dict) -> str:
    nv = r.get("naive_ttft_s")
    return (f"{r['model']:>9} {r['stream_s']:>6}s {r['frames']:>6} {r['frames_kept']:>5} {r['live_ttft_s']:>9.3f}s "
            + (f"{nv:>10.3f}s {r['speedup']:>7.1f}x" if nv is not None else f"{'-':>11} {'-':>8}")
            + f" {r['live_bytes'] / 2**20:>9.1f} "
            + (f"{r['naive_bytes'] / 2**20:>10.1f}" if nv is not None else f"{'-':>10}")
            + f" {r['ingest_fps']:>10.1f} {r['tower_share']:>5.0%} {r['question_tokens']:>5} {r['text_slots']:>6}"
            + f" {r.get('same_first_token', '-')}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for model in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == model]
        x = [r["stream_s"] for r in rs]
        a1.plot(x, [r["live_ttft_s"] for r in rs], "o-", label=f"{model}: live session")
        if "naive_ttft_s" in rs[0]:
            a1.plot(x, [r["naive_ttft_s"] for r in rs], "s--", label=f"{model}: fresh chat over the history")
        a2.plot(x, [r["live_bytes"] / 2**20 for r in rs], "o-", label=f"{model}: live K/V")
        if "naive_bytes" in rs[0]:
            a2.plot(x, [r["naive_bytes"] / 2**20 for r in rs], "s--", label=f"{model}: naive features + K/V")
    for ax, what in ((a1, "time to first token (s)"), (a2, "memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("stream time at the question (s), 1 frame/s")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Live video: questions on a 1-fps stream (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["embedded", "a"], help="embedded and/or shapes of bench_vs_llava")
    ap.add_argument("--times", nargs="+", type=int, default=[10, 60, 600], help="question times (stream seconds)")
    ap.add_argument("--hour", action="store_true", help="also ask at 1 h (3600 s)")
    ap.add_argument("--fps", type=float, default=1.0)
    ap.add_argument("--memory-gb", type=float, default=None, help="the live session's K/V ceiling")
    ap.add_argument("--no-naive", action="store_true", help="live session only")
    ap.add_argument("--repeat", type=int, default=1, help="ask each time this often, report the least TTFT "
                    "(a loaded machine's noise; live only: needs --no-naive)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default="bench/results/live.json", help="JSON path (the PNG beside it)")
    a = ap.parse_args()
    if a.repeat > 1 and not a.no_naive:
        ap.error("--repeat > 1 adds turns the naive path does not follow: use it with --no-naive")
    torch.set_num_threads(a.threads)
    times = sorted(set(a.times + ([3600] if a.hour else [])))
    print(HEAD)
    rows = []
    for name in a.models:
        rows += run(name, times, a.fps, a.memory_gb, not a.no_naive, a.repeat)
    summary = {}
    for name in a.models:
        rs = [r for r in rows if r["model"] == name]
        summary[name] = {"ttft_last_over_first": rs[-1]["live_ttft_s"] / rs[0]["live_ttft_s"],
                         "min_ingest_fps": min(r["ingest_fps"] for r in rs)}
        if "speedup" in rs[-1]:
            summary[name]["speedup_at_last"] = rs[-1]["speedup"]
            summary[name]["same_first_tokens"] = all(r["same_first_token"] for r in rs)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": "cpu", "threads": a.threads, "fps": a.fps, "memory_gb": a.memory_gb,
                               "rows": rows, "summary": summary}, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
