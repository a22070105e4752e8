"""Probe: can an Owl3 learn to pick an image by its index, and after how many steps?

Writes a multi-image dataset where every answer needs the image's index, trains a fresh LM on it with
`hyperowl train` and scores a held-out set with `hyperowl eval` (docs/embedded_model_history.md, "Why
multi-image and video stay at chance", has the measurements):
  --images solid:   4 solid-colour images, "Which image is green?" -> "image 3";
  --images objects: 4 synthetic scenes of one object each (hyperowl.data.synthetic), three questions per
                    conversation: which image has a red circle / what colour (shape) is the object in image k.
  --model tiny:     the tiny-240728 preset (28 px, tower trained too);
  --model embedded: the embedded model's preset on the stage-0 tower (runs/vision-synthetic, frozen) and the
                    shipped tokenizer.

    python scripts/probe_index.py --images solid --model tiny --steps 2000          # 4 min: 1.000 (plateau to ~800)
    python scripts/probe_index.py --images solid --model embedded --steps 1200      # 8 min: 0.52 (plateau to ~950)

Layout variants (solid images, tiny model; the test set always uses the usual layout):
  --aux 0.5:       half the training conversations show the images one per turn ("Image k: <|image|> What
                   colour is it?") before the index question: 0.935 at 700 steps vs 0.515 without (both
                   1.000 at 1500) -- the idea behind `hyperowl data synth --progressive`;
  --label after:   "<|image|> image k" instead of "Image k: <|image|>": 0.260 at 1500 steps (worse).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hyperowl.data.synthetic import ALL_CELLS, IMAGE_TOKEN, COLOUR_NAMES, KINDS, SIZES, _Builder, _labelled, phrase  # noqa: E402

SOLID = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
N_IMAGES = 4


def labels(n: int, where: str) -> str:
    """The image list: "Image k: <|image|>" (the dataset's format) or the label after each image."""
    return _labelled(n) if where == "before" else "".join(f"{IMAGE_TOKEN} image {i + 1}\n" for i in range(n))


def solid_rows(out: Path, size: int, n: int, rng: random.Random, split: str, where: str = "before",
               aux: float = 0.0) -> list[dict]:
    """`aux`: the share of training rows that show the images one per turn ("What colour is it?") before the
    index question, so the answer can lean on the text and cross-attention learns "the latest image"."""
    (out / "img").mkdir(parents=True, exist_ok=True)
    for c, rgb in SOLID.items():
        Image.new("RGB", (size, size), rgb).save(out / f"img/{c}.png")
    rows = []
    for i in range(n):
        order = list(SOLID)
        rng.shuffle(order)
        target = rng.choice(order)
        answer = f"image {order.index(target) + 1}"
        question = f"Which image is {target}?"
        if split == "train" and rng.random() < aux:
            messages = []
            for k, c in enumerate(order):
                messages += [{"role": "user", "content": _labelled(1, k) + "What colour is it?"},
                             {"role": "assistant", "content": c}]
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        else:
            messages = [{"role": "user", "content": labels(N_IMAGES, where) + question},
                        {"role": "assistant", "content": answer}]
        rows.append({"id": f"{split}-{i}", "task": "index/which", "answer": answer, "messages": messages,
                     "images": [f"img/{c}.png" for c in order]})
    return rows


def object_rows(out: Path, size: int, n: int, rng: random.Random, split: str) -> list[dict]:
    (out / "img" / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        b = _Builder(rng, size)
        pairs = rng.sample([(c, k) for c in COLOUR_NAMES for k in KINDS], N_IMAGES)
        paths = []
        for j, (c, k) in enumerate(pairs):
            p = f"img/{split}/{i}_{j}.png"
            b.scene([b.place(k, c, rng.choice(SIZES), rng.choice(ALL_CELLS))]).render().save(out / p)
            paths.append(p)
        qs = []
        t = rng.randrange(N_IMAGES)
        qs.append(("index/which", f"Which image has {phrase(*pairs[t])}?", f"image {t + 1}"))
        t = rng.randrange(N_IMAGES)
        qs.append(("index/colour", f"What colour is the object in image {t + 1}?", pairs[t][0]))
        t = rng.randrange(N_IMAGES)
        qs.append(("index/shape", f"What shape is the object in image {t + 1}?", pairs[t][1]))
        rng.shuffle(qs)
        if split == "test":
            qs = qs[:1]  # scored: the first question only
        messages = []
        for qi, (_, q, a) in enumerate(qs):
            messages += [{"role": "user", "content": (_labelled(N_IMAGES) if qi == 0 else "") + q},
                         {"role": "assistant", "content": a}]
        rows.append({"id": f"{split}-{i}", "task": qs[0][0], "answer": qs[0][2], "messages": messages,
                     "images": paths})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", choices=["solid", "objects"], default="solid")
    ap.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train", type=int, default=4000, help="training conversations")
    ap.add_argument("--test", type=int, default=200, help="held-out questions")
    ap.add_argument("--out", default="runs/probe-index")
    ap.add_argument("--label", choices=["before", "after"], default="before",
                    help="solid: 'Image k: <|image|>' (the dataset's format) or '<|image|> image k'")
    ap.add_argument("--aux", type=float, default=0.0, help="solid: share of one-image-per-turn conversations")
    a = ap.parse_args()
    out = Path(a.out)
    size = 28 if a.model == "tiny" else 64
    if a.images == "solid":
        def make(out, size, n, rng, split):
            return solid_rows(out, size, n, rng, split, a.label, a.aux)
    else:
        make = object_rows
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", a.train), ("test", a.test)):
        rows = make(out, size, n, rng, split)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if a.model == "tiny":
        init = {"preset": "tiny-240728", "tokenizer": "train", "vocab_size": 300}
        extra = {}
    else:
        vision = ROOT / "runs/vision-synthetic"
        if not (vision / "model.safetensors").exists():
            sys.exit(f"{vision}: no stage-0 tower; run scripts/train_embedded.sh (or its pretrain-vision step) first")
        init = {"preset": "owl3-synthetic", "tokenizer": str(ROOT / "hyperowl/assets/owl3-synthetic/tokenizer.json"),
                "vision": str(vision)}
        extra = {"trainable": {"vision": False}}
    recipe = {"init": init, "data": {"train": str(out / "train.jsonl")}, "stage": "instruct", **extra,
              "optim": {"lr": a.lr, "min_lr_ratio": 0.3, "warmup_steps": 50, "max_steps": a.steps,
                        "weight_decay": 0.05, "grad_clip": 1.0},
              "batch_size": 16, "seed": 0, "output": str(out / "run"), "log_every": 50, "save_every": 10 ** 9}
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1))  # YAML is a superset of JSON
    hyperowl = [sys.executable, "-m", "hyperowl.cli"]
    subprocess.run([*hyperowl, "train", str(out / "recipe.json")], check=True)
    subprocess.run([*hyperowl, "eval", "--model", str(out / "run/final"), "--data", str(out / "test.jsonl"),
                    "--out", str(out / "eval")], check=True)
    print("loss every 50 steps:", [round(json.loads(line)["loss"], 3) for line in open(out / "run/log.jsonl")])


if __name__ == "__main__":
    main()
