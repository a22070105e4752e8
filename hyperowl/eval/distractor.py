"""The distractor-robustness protocol (the mPLUG-Owl3 paper's anti-interference evaluation).

Design note: every single-image multiple-choice question is asked among N irrelevant images. For each
question we build `variants` (4) versions; version v has the options rotated by v (so the right answer
moves) and its own random set of N distractor images from the pool, with the question's image inserted at
a random position K (seeded by (seed, sample id, N, v): re-running gives the same prompts):

    Image 1: <|image|>
    Image 2: <|image|>
    ...
    Look at image K. <question>
    A. ..
    B. ..
    Answer with the option's letter from the given choices directly.

(N = 0 is the plain single-image question, with the same option rotations.) A question counts only if all
versions are answered right. The sweep over N runs `run_samples` per N into `out/N<n>/` (predictions,
summary, resume) and writes `out/distractor.json`, a table, and `out/distractor.png` (accuracy vs N; only
when matplotlib is installed). Per N it also records the mean latency per question (all its versions) and
the peak resident memory (RSS, reset before each N where Linux allows it; else the process peak so far) and,
on CUDA, the peak allocated GPU memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import resource
from pathlib import Path
from typing import Any, Sequence

from ..data.tables import read_rows
from ..errors import InputError
from .runner import Sample, dist_info, run_samples
from .tasks import IMAGE_TOKEN, LETTERS, MCItem, mc_prompt, mc_score, media_path, rotate

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VARIANTS = 4


def parse_counts(text: str) -> list[int]:
    """'0,5,10' -> [0, 5, 10]."""
    try:
        ns = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--distractors '{text}': give comma-separated whole numbers, e.g. 0,5,10") from None
    if not ns or any(n < 0 for n in ns):
        raise InputError(f"--distractors '{text}': give comma-separated numbers >= 0, e.g. 0,5,10")
    return sorted(set(ns))


def load_pool(pool: str | Path) -> list[str]:
    """Distractor images: every image file under a folder (sorted), or the 'image'/'images' fields of a
    JSON/JSONL file (paths relative to it)."""
    p = Path(pool)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    elif p.is_file():
        files = []
        for where, rec in read_rows(p, "eval data"):
            ims = rec.get("images") if rec.get("image") is None else [rec["image"]]
            if not isinstance(ims, list) or not ims:
                raise InputError(f"{where}: a pool record needs an 'image' path (or an 'images' list)")
            files += [media_path(p.parent, x, where) for x in ims]
    else:
        raise InputError(f"--pool '{pool}': no such folder or file; give a folder of images or a JSONL of {{\"image\": path}}")
    if not files:
        raise InputError(f"--pool '{pool}': no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, ("hyperowl-distractor",) + parts)).encode()).digest()[:8], "big")


STYLES = ("mc", "open")


def variant_prompt(item: MCItem, options: Sequence[str], n: int, target: int, style: str = "mc") -> str:
    """The prompt of one version: N+1 labelled images, the target (0-based) referenced by its number.
    style "open" leaves the options out (for models never taught lettered choices); the free answer is
    then matched to an option's text by `parse_choice`."""
    q = item.question if n == 0 else f"Look at image {target + 1}. {item.question}"
    body = mc_prompt(q, options, item.hint) if style == "mc" else "\n".join(x for x in (item.hint, q) if x)
    if n == 0:
        return IMAGE_TOKEN + body
    return "".join(f"Image {i + 1}: {IMAGE_TOKEN}\n" for i in range(n + 1)) + body


def distractor_samples(items: Sequence[MCItem], pool: Sequence[str], n: int, seed: int = 0,
                       variants: int = VARIANTS, style: str = "mc") -> list[Sample]:
    if style not in STYLES:
        raise InputError(f"distractor prompt style '{style}': choose {' or '.join(STYLES)}")
    out = []
    for it in items:
        own = str(Path(it.image).resolve()) if isinstance(it.image, str) else None
        candidates = [p for p in pool if own is None or str(Path(p).resolve()) != own]
        if n > len(candidates):
            raise InputError(f"--pool: {len(candidates)} usable images, fewer than {n} distractors for sample "
                             f"'{it.id}'; add images to the pool or lower --distractors")
        plan = []
        for v in range(variants):
            rng = random.Random(_seed(seed, it.id, n, v))
            opts, ans = rotate(it.options, it.answer, v)
            others = rng.sample(candidates, n)
            k = rng.randrange(n + 1)
            plan.append((opts, ans, others[:k] + [it.image] + others[k:], k))

        def build(it=it, plan=plan) -> list[dict]:
            return [{"messages": [{"role": "user", "content": variant_prompt(it, o, n, k, style)}], "images": ims}
                    for o, _, ims, k in plan]

        out.append(Sample(it.id, it.category, LETTERS[it.answer], build,
                          mc_score([p[0] for p in plan], [p[1] for p in plan]),
                          extra={"distractors": n, "target_image": [p[3] + 1 for p in plan]},
                          choices=[p[0] for p in plan]))
    return out


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM (the peak RSS)
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def run_distractor(model, items: Sequence[MCItem], pool: Sequence[str], counts: Sequence[int], out_dir: str | Path, *,
                   seed: int = 0, variants: int = VARIANTS, style: str = "mc", batch_size: int = 8,
                   max_new_tokens: int = 16,
                   data: str = "", plot: bool = True, scoring: str = "generation") -> dict[str, Any]:
    """The sweep over N (see the module note); returns what `out/distractor.json` holds."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if variants < 1:
        raise InputError(f"variants={variants}: must be at least 1")
    all_samples = {n: distractor_samples(items, pool, n, seed, variants, style) for n in counts}  # validate all N first
    param = next(model.parameters(), None) if hasattr(model, "parameters") else None
    cuda = param is not None and param.device.type == "cuda"
    results = []
    for n in counts:
        reset = _reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        s = run_samples(model, all_samples[n], out / f"N{n}", batch_size=batch_size, max_new_tokens=max_new_tokens,
                        desc=f"distractors={n}", meta={"task": "distractor", "data": data, "distractors": n,
                                                       "variants": variants, "seed": seed, "style": style},
                        scoring=scoring)
        row = {"distractors": n, "n": s["n"], "accuracy": s["accuracy"], "computed": s["computed"],
               "latency_s": s["seconds"] / s["computed"] if s["computed"] else None,
               "peak_rss_mib": round(_peak_rss_mib(), 1), "rss_peak_reset": reset,
               "categories": s["categories"]}
        if cuda:
            row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        results.append(row)
        log.info("distractors=%d: accuracy %.3f over %d questions", n, s["accuracy"], s["n"])
    report = {"task": "distractor", "data": data, "seed": seed, "variants": variants, "style": style,
              "scoring": scoring, "pool_size": len(pool),
              "results": results}
    if dist_info()[0] != 0:  # under torchrun rank 0 writes the report (its own memory and latency)
        return report
    (out / "distractor.json").write_text(json.dumps(report, indent=2))
    (out / "distractor.txt").write_text(format_table(report) + "\n")
    if plot:
        report["plot"] = plot_accuracy(report, out / "distractor.png")
    return report


def format_table(report: dict) -> str:
    lines = [f"{'N':>4}  {'n':>5}  {'accuracy':>8}  {'latency s':>9}  {'peak RSS MiB':>12}" +
             ("  peak GPU MiB" if any("peak_gpu_mib" in r for r in report["results"]) else "")]
    for r in report["results"]:
        lat = f"{r['latency_s']:.3f}" if r["latency_s"] is not None else "-"
        line = f"{r['distractors']:>4}  {r['n']:>5}  {r['accuracy']:>8.3f}  {lat:>9}  {r['peak_rss_mib']:>12.1f}"
        if "peak_gpu_mib" in r:
            line += f"  {r['peak_gpu_mib']:>12.1f}"
        lines.append(line)
    return "\n".join(lines)


def plot_accuracy(report: dict, path: Path) -> str | None:
    """Accuracy vs N as a PNG; None (and a log line) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: no plot written (pip install matplotlib)")
        return None
    rs = report["results"]
    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([r["distractors"] for r in rs], [r["accuracy"] for r in rs], marker="o")
    for r in rs:
        lat = f", {r['latency_s']:.2f}s" if r["latency_s"] is not None else ""
        ax.annotate(f"{r['peak_rss_mib']:.0f} MiB{lat}", (r["distractors"], r["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xlabel("distractor images N")
    ax.set_ylabel(f"accuracy (all {report['variants']} versions right)")
    ax.set_ylim(-0.05, 1.1)
    ax.grid(alpha=0.3)
    ax.set_title("Distractor robustness")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    return str(path)
