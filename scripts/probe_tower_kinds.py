"""Does a stage-0 tower read the kind of a shape drawn by another renderer, anywhere in the picture? (issue 31)

A linear probe: a fresh `PatchHead` is trained for --probe-steps on the frozen tower's features (scenes half in
the drawn look, thirds layout), then each object's kind and colour are read as stage 0 reads them (the summed
log-probabilities of the patches in the middle of its box) on:
- the tower's own held-out scenes, plain and drawn (thirds layout);
- a **selection set drawn by a third renderer** written here (numpy analytic coverage: signed distance with a
  one-pixel edge ramp; 64-768 px sources; backgrounds plain, radial gradient, dots or stripes; a third saved as
  JPEG; colours jittered in RGB), its objects either anywhere (`--layout free`, as people draw) or each inside
  its third of the image (`--layout thirds`, as the training generator places them). It exists so that a tower
  recipe can be chosen without looking at the out-of-distribution set (matplotlib), which is for the final
  report only (docs/embedded_model.md);
- optionally that OOD set (`--ood data/ood`), for the report of a tower already chosen.

    python scripts/probe_tower_kinds.py shipped runs/vision-synthetic [--layout free thirds] [--n 300]

Prints one JSON line per tower (and writes them to --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyperowl.config import PRESETS  # noqa: E402
from hyperowl.data import synthetic as syn  # noqa: E402
from hyperowl.processing.images import image_to_tensor  # noqa: E402
from hyperowl.train.vision_pretrain import PatchHead, SceneStream, dense_loss, evaluate  # noqa: E402


# -- the third renderer ----------------------------------------------------------------------------------------
def _box(dx: np.ndarray, dy: np.ndarray, hx: float, hy: float) -> np.ndarray:
    qx, qy = np.abs(dx) - hx, np.abs(dy) - hy
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def signed_distance(kind: str, X: np.ndarray, Y: np.ndarray, x: float, y: float, r: float) -> np.ndarray:
    """Distance in pixels to the edge of a shape of half-size r centred at (x, y), negative inside (y down)."""
    dx, dy = X - x, Y - y
    if kind == "circle":
        return np.hypot(dx, dy) - r
    if kind == "square":
        return _box(dx, dy, r, r)
    if kind == "diamond":
        return (np.abs(dx) + np.abs(dy) - r) / np.sqrt(2)
    if kind == "triangle":  # apex up: base 2r wide at y + r, apex at y - r
        return np.maximum(dy - r, (2 * np.abs(dx) - dy - r) / np.sqrt(5))
    return np.minimum(_box(dx, dy, r, r / 3), _box(dx, dy, r / 3, r))  # cross: bars a third of the size thick


def _colour(name: str, rng: random.Random) -> tuple[int, int, int]:
    for _ in range(50):
        c = tuple(int(np.clip(v + rng.uniform(-30, 30), 0, 255)) for v in syn.COLOURS[name])
        near, margin = syn.nearest_colour(c)
        if near == name and margin >= syn.rendering.COLOUR_MARGIN:
            return c
    return syn.COLOURS[name]


def _background(rng: random.Random, s: int) -> np.ndarray:
    pale = np.array([rng.uniform(215, 255) for _ in range(3)])
    img = np.broadcast_to(pale, (s, s, 3)).copy()
    Y, X = np.mgrid[0:s, 0:s] / s
    kind = rng.choice(["plain", "radial", "dots", "stripes"])
    if kind == "radial":
        other = np.array([rng.uniform(215, 255) for _ in range(3)])
        t = np.clip(np.hypot(X - rng.random(), Y - rng.random()) / 1.2, 0, 1)[..., None]
        img = pale + t * (other - pale)
    elif kind == "dots":
        k = rng.randint(8, 20)
        img[np.hypot((X * k) % 1 - 0.5, (Y * k) % 1 - 0.5) < 0.15] *= 0.93
    elif kind == "stripes":
        img[((X * rng.randint(6, 24)) % 1) < 0.5] *= 0.95
    return img


def selection_example(i: int, layout: str, seed: int = 11) -> tuple[dict, Image.Image]:
    """Picture i of the selection set: 1-4 objects (unique colour and kind pairs), sizes 10-32 % of the side."""
    rng = random.Random(f"tower-kinds/{seed}/{i}")
    s = rng.randint(64, 768)
    pairs = [(c, k) for c in syn.COLOUR_NAMES for k in syn.KINDS]
    rng.shuffle(pairs)
    objs: list[dict] = []
    for colour, kind in pairs[: rng.randint(1, 4)]:
        for _ in range(500):
            d = rng.uniform(0.10, 0.32) * s
            if layout == "thirds":  # the box inside one third in both directions
                d = min(d, s / 3 - 2)
                cx, cy = rng.randrange(3), rng.randrange(3)
                x = rng.uniform(cx * s / 3 + d / 2 + 1, (cx + 1) * s / 3 - d / 2 - 1)
                y = rng.uniform(cy * s / 3 + d / 2 + 1, (cy + 1) * s / 3 - d / 2 - 1)
            else:
                x, y = rng.uniform(d / 2 + 1, s - d / 2 - 1), rng.uniform(d / 2 + 1, s - d / 2 - 1)
            gap = 0.04 * s
            if all(abs(x - o["x"]) > (d + o["d"]) / 2 + gap or abs(y - o["y"]) > (d + o["d"]) / 2 + gap for o in objs):
                objs.append({"kind": kind, "colour": colour, "rgb": _colour(colour, rng), "x": x, "y": y, "d": d})
                break
    img = _background(rng, s)
    Y, X = np.mgrid[0:s, 0:s] + 0.5
    for o in objs:
        cover = np.clip(0.5 - signed_distance(o["kind"], X, Y, o["x"], o["y"], o["d"] / 2), 0, 1)[..., None]
        img = img * (1 - cover) + cover * np.array(o["rgb"], float)
    im = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")
    if s >= 96 and rng.random() < 1 / 3:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=rng.randint(50, 90))
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return {"size": s, "objects": objs}, im


# -- the probe ---------------------------------------------------------------------------------------------------
def load_tower(spec: str):
    import hyperowl
    from hyperowl.models.owl3 import Owl3Model
    from hyperowl.train.upgrade import load_vision_tower

    if spec == "shipped":
        return hyperowl.load(None).model.vision
    c = json.loads((Path(spec) / "config.json").read_text())
    preset = PRESETS["owl3-synthetic"]
    vision = dataclasses.replace(preset.vision, image_size=c["image_size"], patch_size=c["patch_size"])
    model = Owl3Model(dataclasses.replace(preset, vision=vision))
    load_vision_tower(model, spec)
    return model.vision


def read_objects(tower, head: PatchHead, rows: list[tuple[dict, Image.Image]]) -> dict[str, float]:
    """Kind and colour accuracy per object: its middle patches vote (summed log-probabilities, background out)."""
    S, P = tower.config.image_size, tower.config.patch_size
    G = S // P
    right: dict[str, list[bool]] = {"kind": [], "colour": []}
    with torch.no_grad():
        for rec, im in rows:
            logits = head(tower(image_to_tensor(im, S)[None]))
            f = S / rec["size"]
            for o in rec["objects"]:
                x, y, h = o["x"] * f, o["y"] * f, max(o["d"] * f * 0.35, P / 2)
                idx = [r * G + c for r in range(G) for c in range(G)
                       if abs(c * P + P / 2 - x) <= h and abs(r * P + P / 2 - y) <= h]
                idx = idx or [min(G - 1, int(y // P)) * G + min(G - 1, int(x // P))]
                for key, names in (("kind", syn.KINDS), ("colour", syn.COLOUR_NAMES)):
                    votes = logits[key][0, idx].log_softmax(-1)[:, 1:].sum(0)
                    right[key].append(names[int(votes.argmax())] == o[key])
    return {k: round(float(np.mean(v)), 3) for k, v in right.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("towers", nargs="+", help="stage-0 output folders, or 'shipped' (the embedded model's tower)")
    ap.add_argument("--layout", nargs="+", default=["free", "thirds"], choices=["free", "thirds"])
    ap.add_argument("--n", type=int, default=300, help="pictures per selection set")
    ap.add_argument("--probe-steps", type=int, default=300)
    ap.add_argument("--ood", default=None, help="the OOD set's folder (final report of a chosen tower only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sets = {f"selection_{lay}": [selection_example(i, lay) for i in range(a.n)] for lay in a.layout}
    if a.ood:
        rows = [json.loads(line) for line in (Path(a.ood) / "ood.jsonl").read_text().splitlines()]
        sets["ood"] = [(r, Image.open(Path(a.ood) / r["images"][0]).convert("RGB")) for r in rows]
    for spec in a.towers:
        torch.manual_seed(0)
        tower = load_tower(spec).eval()
        head = PatchHead(tower.config.hidden_size)
        opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
        stream = SceneStream(tower.config, 5, drawn=0.5)
        for _ in range(a.probe_steps):
            px, lab, _ = stream.batch(32)
            with torch.no_grad():
                feats = tower(px)
            loss = dense_loss(head(feats), lab)
            opt.zero_grad()
            loss.backward()
            opt.step()
        res: dict = {"tower": spec, "probe_steps": a.probe_steps}
        for name, drawn in (("own_plain", 0.0), ("own_drawn", 1.0)):
            r = evaluate(tower, head, *SceneStream(tower.config, 99, drawn=drawn).batch(256))
            res[name] = {"kind": r["kind_object"], "colour": r["colour_object"]}
        for name, rows in sets.items():
            res[name] = read_objects(tower, head, rows)
        line = json.dumps(res)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
