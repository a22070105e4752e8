"""An out-of-distribution test set of the synthetic world, drawn by another renderer (`hyperowl data ood`).

Design note
-----------
The embedded model is trained on pictures drawn by `rendering` (PIL's ImageDraw). Its test split measures
what it learned of *that* renderer; users draw their pictures with anything. This set asks the world's own
questions, in the world's own wording (`questions.SINGLE_TEMPLATES`: the colour of a named shape, the shape of a
named colour, how many shapes), about pictures drawn by **matplotlib's Agg renderer** (anti-aliased paths:
another rasteriser, other edges, other geometry of the same five kinds), at 96-512 px, with colours jittered
around the named ones in HSV (`rendering` jitters in RGB), objects anywhere in the image (not in a 3x3 grid:
sizes 12-32% of the side, never overlapping), on light backgrounds of its own kinds (white, tinted, a
gradient drawn by imshow, graph paper, soft noise), a third of them saved as JPEG (quality 55-90).

Why matplotlib: measured against the other candidates named in issue 31 - it is already a dependency of the
`train` and `test` extras (skia-python and pycairo add a wheel or a system library), it anti-aliases filled
paths (skimage.draw anti-aliases only lines and circle outlines), and 300 images take ~10 s on one core.

It is for testing only: never for training or model selection (the retrain script evaluates on it after
training, beside the test split). The training generator cannot draw these images (another renderer, other
sizes and backgrounds), so no hash check is needed; every colour still reads as its name
(`rendering.nearest_colour`, by `rendering.COLOUR_MARGIN`), so answers are exact.

Files: `<out>/ood.jsonl` (records as `hyperowl data synth` writes them, task `ood/colour|shape|count_all`,
plus `size` and the drawn `objects` for checks), `<out>/images/`, `<out>/meta.json`. Deterministic for a seed
and a matplotlib version (recorded in meta.json).
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from hyperowl.errors import InputError

from .conversations import IMAGE_TOKEN, SINGLE_REFS
from .questions import SINGLE_TEMPLATES
from .rendering import COLOUR_MARGIN, nearest_colour
from .world import COLOUR_NAMES, COLOURS, KINDS, MAX_OBJECTS

logger = logging.getLogger(__package__)

OOD_TASKS = ("colour", "shape", "count_all")
OOD_SIZES = (96, 512)
OOD_BACKGROUNDS = ("white", "tint", "gradient", "paper", "noise")


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, ("hyperowl-ood",) + parts)).encode()).digest()[:8], "big")


def ood_colour(name: str, rng: random.Random) -> tuple[int, int, int]:
    """The named colour moved in HSV (hue +-0.02, saturation x0.75-1, value x0.8-1.05), kept nearest its name."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in COLOURS[name]))
    for _ in range(50):
        rgb = colorsys.hsv_to_rgb((h + rng.uniform(-0.02, 0.02)) % 1, s * rng.uniform(0.75, 1.0),
                                  min(1.0, v * rng.uniform(0.8, 1.05)))
        c = tuple(int(round(255 * x)) for x in rgb)
        near, margin = nearest_colour(c)
        if near == name and margin >= COLOUR_MARGIN:
            return c
    return COLOURS[name]


def _objects(rng: random.Random, task: str, size: int) -> tuple[list[dict], str, dict]:
    """Objects (kind, colour, rgb, x, y, d in pixels), the answer and the template fields of one question."""
    n = rng.randint(1, MAX_OBJECTS)
    pairs = [(c, k) for c in COLOUR_NAMES for k in KINDS]
    rng.shuffle(pairs)
    chosen = [pairs.pop()]
    if task == "colour":  # the asked kind is unique
        keep = lambda c, k: k != chosen[0][1]
    elif task == "shape":  # the asked colour is unique
        keep = lambda c, k: c != chosen[0][0]
    else:
        keep = lambda c, k: True
    chosen += [p for p in pairs if keep(*p)][: n - 1]
    objs: list[dict] = []
    for colour, kind in chosen:
        for _ in range(500):  # anywhere, not overlapping (boxes apart by 4% of the side)
            d = rng.uniform(0.12, 0.32) * size
            x, y = rng.uniform(d / 2 + 2, size - d / 2 - 2), rng.uniform(d / 2 + 2, size - d / 2 - 2)
            gap = 0.04 * size
            if all(abs(x - o["x"]) > (d + o["d"]) / 2 + gap or abs(y - o["y"]) > (d + o["d"]) / 2 + gap for o in objs):
                break
        else:
            continue  # crowded: fewer objects (the count answer is computed from what is drawn)
        objs.append({"kind": kind, "colour": colour, "rgb": list(ood_colour(colour, rng)), "x": round(x, 1),
                     "y": round(y, 1), "d": round(d, 1)})
    target = objs[0]
    if task == "colour":
        return objs, target["colour"], {"kind": target["kind"]}
    if task == "shape":
        return objs, target["kind"], {"colour": target["colour"]}
    return objs, str(len(objs)), {}


def _patch(o: dict):
    """A matplotlib patch of one object (pixel coordinates, y down), filled with its colour, no edge."""
    from matplotlib import patches

    x, y, r = o["x"], o["y"], o["d"] / 2
    style = {"facecolor": [c / 255 for c in o["rgb"]], "edgecolor": "none", "antialiased": True}
    if o["kind"] == "circle":
        return patches.Circle((x, y), r, **style)
    if o["kind"] == "square":
        return patches.Rectangle((x - r, y - r), 2 * r, 2 * r, **style)
    if o["kind"] == "triangle":  # apex up (y grows downwards)
        return patches.Polygon([(x - r, y + r), (x + r, y + r), (x, y - r)], closed=True, **style)
    if o["kind"] == "diamond":
        return patches.Polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], closed=True, **style)
    t = 2 * r / 3 / 2  # cross: bars a third of the size thick
    pts = [(x - t, y - r), (x + t, y - r), (x + t, y - t), (x + r, y - t), (x + r, y + t), (x + t, y + t),
           (x + t, y + r), (x - t, y + r), (x - t, y + t), (x - r, y + t), (x - r, y - t), (x - t, y - t)]
    return patches.Polygon(pts, closed=True, **style)


def _pale(rng: random.Random) -> list[float]:
    return [rng.uniform(0.86, 1.0) for _ in range(3)]


def draw_ood(objs: list[dict], size: int, background: str, bg_seed: int) -> Image.Image:
    """The picture, drawn by matplotlib (Agg) on a `size` x `size` canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rng = random.Random(bg_seed)
    fig = Figure(figsize=(size / 100, size / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, size)
    ax.set_ylim(size, 0)
    ax.axis("off")
    fig.patch.set_facecolor("white" if background == "white" else _pale(rng))
    if background == "gradient":
        a, b = np.array(_pale(rng)), np.array(_pale(rng))
        t = np.linspace(0, 1, 64)[:, None, None]
        img = a + t * (b - a)  # vertical; transposed for horizontal
        ax.imshow(img if rng.random() < 0.5 else img.transpose(1, 0, 2), extent=(0, size, size, 0),
                  interpolation="bilinear", zorder=0)
    elif background == "paper":  # graph paper: thin light lines
        step = size / rng.randint(6, 16)
        colour = [c * 0.85 for c in _pale(rng)]
        for k in np.arange(step, size, step):
            ax.axhline(k, color=colour, linewidth=0.8, zorder=0)
            ax.axvline(k, color=colour, linewidth=0.8, zorder=0)
    elif background == "noise":
        g = rng.randint(16, 48)
        noise = np.random.default_rng(bg_seed).uniform(0.88, 1.0, (g, g, 1)) * np.array(_pale(rng))
        ax.imshow(noise, extent=(0, size, size, 0), interpolation="bicubic", zorder=0)
    for o in objs:
        ax.add_patch(_patch(o))
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy(), "RGB")


def ood_examples(n: int, seed: int = 7):
    """Yield (record without the image path, PIL image, use_jpeg quality or 0) for example 0..n-1."""
    for i in range(n):
        rng = random.Random(_seed(seed, i))
        task = OOD_TASKS[i % len(OOD_TASKS)]
        size = 2 * rng.randint(OOD_SIZES[0] // 2, OOD_SIZES[1] // 2)
        objs, answer, fields = _objects(rng, task, size)
        background, bg_seed = rng.choice(OOD_BACKGROUNDS), rng.randrange(2**31)
        quality = rng.randint(55, 90) if rng.random() < 1 / 3 else 0
        template = rng.choice(SINGLE_TEMPLATES[task])
        question = template.format(img=rng.choice(SINGLE_REFS), **fields)
        record = {"id": f"ood-{i:05d}", "task": f"ood/{task}",
                  "messages": [{"role": "user", "content": IMAGE_TOKEN + question},
                               {"role": "assistant", "content": answer}],
                  "answer": answer, "size": size, "background": background, "jpeg_quality": quality, "objects": objs}
        yield record, draw_ood(objs, size, background, bg_seed), quality


def write_ood(out: Union[str, Path], n: int = 300, seed: int = 7) -> Path:
    """Write the set (see the module note) into `out`; returns the JSONL path. An earlier set there is replaced."""
    import matplotlib

    if not isinstance(n, int) or n < 1:
        raise InputError(f"data ood: --n {n!r} must be a positive number of questions")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"data ood: output '{out}' exists and is not a directory")
    if (out / "images").exists():
        if not (out / "ood.jsonl").exists():  # only ever delete a folder we wrote
            raise InputError(f"data ood: '{out / 'images'}' exists but is not a generated set; choose another --out")
        shutil.rmtree(out / "images")
    (out / "images").mkdir(parents=True)
    rows = []
    for record, img, quality in ood_examples(n, seed):
        name = f"images/{record['id']}." + ("jpg" if quality else "png")
        if quality:
            img.save(out / name, "JPEG", quality=quality)
        else:
            img.save(out / name, compress_level=6)
        rows.append({**record, "images": [name], "videos": []})
    path = out / "ood.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"format": "hyperowl-ood/1", "seed": seed, "n": n, "renderer": f"matplotlib {matplotlib.__version__} (Agg)",
            "tasks": {f"ood/{t}": sum(r["task"] == f"ood/{t}" for r in rows) for t in OOD_TASKS},
            "sizes": list(OOD_SIZES), "backgrounds": list(OOD_BACKGROUNDS),
            "jpeg": sum(bool(r["jpeg_quality"]) for r in rows),
            "note": "test only: never train or select models on it (docs/embedded_model.md, 'Drawn pictures')"}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    logger.info("wrote %s: %d questions drawn by %s", path, n, meta["renderer"])
    return path


def ood_main(argv: Optional[list[str]] = None) -> int:
    """`hyperowl data ood --out DIR [--n 300] [--seed 7]`."""
    from .cli import _Parser

    p = _Parser(prog="hyperowl data ood", description="Write the out-of-distribution test set: the synthetic "
                "world's colour / shape / count questions about pictures drawn by matplotlib (test only).")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=300, help="questions (default 300)")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("data ood draws with matplotlib: pip install 'hyperowl[data]'") from None
    print(write_ood(args.out, args.n, args.seed))
    return 0

