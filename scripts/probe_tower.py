"""Can a vision tower learn the synthetic world's objects on its own? A supervised diagnostic for issue 3.

Why this exists: the embedded model answers colour and count questions but shape and position ones at
chance. This probe takes the language model out of the question: the tower of a preset (or a variant:
--patch/--width/--layers, or a small CNN with --cnn as a yardstick) is trained directly, multi-label, on
what each scene holds - colours present, kinds present, occupied grid cells, (colour, kind) pairs - from
pooled tower features (mean, or one learned query per label with --pool attn). It prints, every --every
steps, the held-out exact-set accuracy per label group (every label of the group right), and writes JSON.

    .venv/bin/python scripts/probe_tower.py --steps 800 --out results/probe_tower.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from hyperowl.config import PRESETS
from hyperowl.data import synthetic as syn
from hyperowl.models.siglip import SiglipTower
from hyperowl.processing.images import image_to_tensor

PAIRS = [(c, k) for c in syn.COLOUR_NAMES for k in syn.KINDS]
# label group -> slice of the label vector
GROUPS = {"colours": slice(0, 6), "kinds": slice(6, 11), "cells": slice(11, 20), "pairs": slice(20, 50)}


def labels(scene: syn.Scene) -> torch.Tensor:
    y = torch.zeros(50)
    for o in scene.objects:
        r, c = scene.cell(o)
        y[syn.COLOUR_NAMES.index(o.colour)] = 1
        y[6 + syn.KINDS.index(o.kind)] = 1
        y[11 + 3 * r + c] = 1
        y[20 + PAIRS.index((o.colour, o.kind))] = 1
    return y


class SmallCNN(nn.Module):
    """A yardstick with a convolutional prior: 3x3 convs, stride 8 overall, tokens like an 8 px ViT."""

    def __init__(self, width: int) -> None:
        super().__init__()
        act = nn.GELU
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), act(), nn.Conv2d(32, 64, 3, 2, 1), act(),
                                 nn.Conv2d(64, 64, 3, padding=1), act(), nn.Conv2d(64, width, 3, 2, 1), act(),
                                 nn.Conv2d(width, width, 3, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]


class Probe(nn.Module):
    def __init__(self, tower: nn.Module, width: int, pool: str) -> None:
        super().__init__()
        self.tower, self.pool = tower, pool
        self.head = nn.Linear(width, 50)
        self.queries = nn.Parameter(torch.randn(50, width) * 0.02)  # used by pool=attn only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.tower(x)  # [B, T, C]
        if self.pool == "mean":
            return self.head(f.mean(1))
        a = torch.softmax(torch.einsum("btc,lc->blt", f, self.queries) / f.shape[-1] ** 0.5, -1)
        return (torch.einsum("blt,btc->blc", a, f) * self.head.weight).sum(-1) + self.head.bias


def exact_set(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    pred = logits > 0
    return {g: round(float((pred[:, s] == (y[:, s] > 0)).all(1).float().mean()), 4) for g, s in GROUPS.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="owl3-synthetic", choices=sorted(k for k in PRESETS if k.startswith("owl3")))
    p.add_argument("--patch", type=int, help="override the tower's patch size")
    p.add_argument("--width", type=int, help="override the tower's width (MLP = 2x)")
    p.add_argument("--layers", type=int, help="override the tower's depth")
    p.add_argument("--cnn", action="store_true", help="a small CNN instead of the tower (yardstick)")
    p.add_argument("--pool", choices=["mean", "attn"], default="mean")
    p.add_argument("--images", type=int, default=4000, help="scenes generated (500 of them held out)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", default="results/probe_tower.json")
    a = p.parse_args()
    if a.steps < 1 or a.images < 10 or a.batch_size < 1 or a.every < 1:
        p.error("--steps, --batch-size and --every must be >= 1, --images >= 10 (a fifth is held out)")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    vc = PRESETS[a.preset].vision
    over = {k: v for k, v in (("patch_size", a.patch), ("hidden_size", a.width), ("num_layers", a.layers)) if v}
    if a.width:
        over["intermediate_size"] = 2 * a.width
    vc = dataclasses.replace(vc, **over)
    tower = SmallCNN(vc.hidden_size) if a.cnn else SiglipTower(vc)
    model = Probe(tower, vc.hidden_size, a.pool)

    exs = list(syn.iter_examples("train", n_single=a.images, seed=a.seed, image_size=vc.image_size))
    x = torch.stack([image_to_tensor(e.images[0], vc.image_size) for e in tqdm(exs, desc="render", leave=False)])
    y = torch.stack([labels(e.scenes[0]) for e in exs])
    n_test = min(500, len(exs) // 5)
    xt, yt, x, y = x[:n_test], y[:n_test], x[n_test:], y[n_test:]

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05)
    rows, t0 = [], time.time()
    bar = tqdm(range(1, a.steps + 1), desc="probe")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, step / max(1, a.warmup))
        i = torch.randint(0, len(x), (a.batch_size,))
        loss = nn.functional.binary_cross_entropy_with_logits(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % a.every == 0 or step == a.steps:
            with torch.no_grad():
                acc = exact_set(model(xt), yt)
            rows.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - t0, 1), **acc})
            bar.write(" ".join(f"{k} {v}" for k, v in rows[-1].items()))
    setup = {"tower": "cnn" if a.cnn else dataclasses.asdict(vc), "pool": a.pool, "lr": a.lr, "batch_size": a.batch_size,
             "train_images": len(x), "test_images": n_test, "threads": a.threads}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    print(f"held-out exact-set accuracy after {a.steps} steps: " + ", ".join(f"{g} {rows[-1][g]}" for g in GROUPS))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
