"""Probe a model on what issue 31 asks of the embedded model beyond its test split: the direction of a moving
object in videos of 8, 16 and 32 frames (all frames shown: max_frames = N, as the README's Python example
does with 32), and the issue's picture of three shapes drawn with PIL (a red circle, a blue square, a green
triangle) at 256 and 64 px.

    python scripts/probe_drawn.py [--model DIR] [--n 100] [--out results/probe-drawn]

Prints a table and writes `<out>/probe_drawn.json`. The out-of-distribution set and the test splits are scored
by `hyperowl eval --data ... --ood ...` (docs/embedded_model.md, "Drawn pictures (issue 31)").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hyperowl  # noqa: E402
from hyperowl.chat import chat_batch  # noqa: E402
from hyperowl.data import synthetic as syn  # noqa: E402
from hyperowl.eval.runner import normalize  # noqa: E402


def direction(model, frames: int, n: int, drawn: bool, batch: int = 8) -> float:
    """Share of `n` held-out direction videos (test split, seed 0) answered right, all `frames` frames shown."""
    # A drawn video's length is drawn from DRAWN_VIDEO_FRAMES: draw more, keep those of `frames`.
    k = len(syn.DRAWN_VIDEO_FRAMES) + 3 if drawn else 1
    exs = list(syn.iter_examples("test", n_video=n * k, tasks=["video/direction"], video_frames=frames, seed=0,
                                 drawn=drawn))
    exs = [e for e in exs if len(e.video_scenes[0]) == frames][:n]
    right = 0
    for i in range(0, len(exs), batch):
        chunk = exs[i:i + batch]
        convs = [{"messages": [{"role": "user", "content": e.prompt}],
                  "videos": [[f.resize((64, 64), Image.Resampling.BICUBIC) for f in e.videos[0]]]} for e in chunk]
        outs = chat_batch(model, convs, max_new_tokens=8)
        right += sum(normalize(o) == e.answer for o, e in zip(outs, chunk))
    return right / max(1, len(exs)), len(exs)


def three_shapes(size: int) -> Image.Image:
    """The issue's picture: a red circle, a blue square and a green triangle drawn with PIL on white."""
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    u = size / 256
    d.ellipse([20 * u, 30 * u, 90 * u, 100 * u], fill=(255, 0, 0))
    d.rectangle([150 * u, 30 * u, 220 * u, 100 * u], fill=(0, 0, 255))
    d.polygon([(90 * u, 230 * u), (170 * u, 230 * u), (130 * u, 150 * u)], fill=(0, 160, 0))
    return im


QUESTIONS = [("Describe the image.", "a red circle, a blue square and a green triangle"),
             ("What colour is the circle in the image?", "red"), ("What colour is the square in the image?", "blue"),
             ("What colour is the triangle in the image?", "green"),
             ("What shape is the red object in the image?", "circle"),
             ("What shape is the blue object in the image?", "square"),
             ("What shape is the green object in the image?", "triangle"),
             ("How many shapes are there in the image?", "3")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    p.add_argument("--n", type=int, default=100, help="direction videos per length")
    p.add_argument("--out", default="results/probe-drawn")
    args = p.parse_args()
    model = hyperowl.load(args.model)
    result: dict = {"model": str(args.model or hyperowl.default_model_dir()), "direction": {}, "three_shapes": {}}
    print(f"{'video direction (all frames shown)':<40} {'n':>4}  accuracy")
    for drawn in (False, True):
        for frames in (8, 16, 32):
            acc, n = direction(model, frames, args.n, drawn)
            key = f"{'drawn' if drawn else 'plain'}-{frames}"
            result["direction"][key] = {"n": n, "accuracy": round(acc, 3)}
            print(f"{key:<40} {n:>4}  {acc:.3f}")
    for size in (256, 64):
        im = three_shapes(size)
        outs = chat_batch(model, [{"messages": [{"role": "user", "content": "<|image|>" + q}], "images": [im]}
                                  for q, _ in QUESTIONS], max_new_tokens=24)
        rows = [{"question": q, "answer": a, "reply": o, "right": normalize(o) == a} for (q, a), o in zip(QUESTIONS, outs)]
        result["three_shapes"][str(size)] = {"right": sum(r["right"] for r in rows), "of": len(rows), "rows": rows}
        print(f"\nthree shapes drawn with PIL at {size} px: {sum(r['right'] for r in rows)}/{len(rows)} right")
        for r in rows:
            print(f"  {'ok ' if r['right'] else 'NO '} {r['question']:<45} -> {r['reply']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_drawn.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten: {out / 'probe_drawn.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
