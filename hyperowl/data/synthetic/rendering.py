"""Rendering: scenes to pixels, and per-pixel / per-patch object labels.

Design note: `render` draws a `Scene` on its background (aliased, solid colours: the same scene always gives
the same pixels, which is what makes a scene hash name an image). `object_map` and `patch_labels` draw each
object alone to say which object covers each pixel / patch: the dense targets of vision-tower pretraining
(`hyperowl.train.vision_pretrain`). Video frames are scenes too, rendered one by one (`Example.videos`) and
encoded by `writer.write_mp4`. (The module is `rendering`, not `render`, so that `hyperowl.data.synthetic.render`
stays the function.)
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

from .world import COLOUR_NAMES, COLOURS, GRID, KINDS, SIZES, Obj, Scene, diameter


def _gray(v: np.ndarray) -> np.ndarray:
    return np.repeat(v[:, :, None], 3, axis=2)


@functools.lru_cache(maxsize=256)
def _plain_background(kind: str, s: int, variant: int) -> np.ndarray:
    if kind == "white":  # 255 .. 242
        v = np.full((s, s), 255 - variant, np.uint8)
    elif kind == "gray":  # 196 .. 214
        v = np.full((s, s), 196 + variant, np.uint8)
    elif kind == "stripes":  # diagonal stripes 3 px wide: 6 phases x 2 directions
        yy, xx = np.mgrid[0:s, 0:s]
        t = xx + yy if variant < 6 else xx - yy + s
        v = np.where(((t + variant % 6) // 3) % 2 == 0, 240, 220).astype(np.uint8)
    else:
        raise ValueError(f"unknown background {kind!r}")
    out = _gray(v)
    out.flags.writeable = False  # shared by the cache
    return out


def _background(kind: str, s: int, variant: int) -> np.ndarray:
    """Light, neutral and low-contrast, so that the shapes stay salient."""
    if kind == "noise":  # per-pixel noise seeded by the variant (not cached: one per scene)
        return _gray(np.random.default_rng(variant).integers(212, 248, size=(s, s), dtype=np.uint8))
    return _plain_background(kind, s, variant).copy()


def _draw(draw: ImageDraw.ImageDraw, o: Obj, image_size: int) -> None:
    d = diameter(o.size, image_size)
    x0, y0 = o.x - d // 2, o.y - d // 2
    x1, y1 = x0 + d - 1, y0 + d - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    fill = COLOURS[o.colour]
    if o.kind == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif o.kind == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif o.kind == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif o.kind == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif o.kind == "cross":
        t = max(1, round(d / 3))  # arm thickness
        a = (d - t) // 2
        draw.rectangle([x0, y0 + a, x1, y0 + a + t - 1], fill=fill)
        draw.rectangle([x0 + a, y0, x0 + a + t - 1, y1], fill=fill)
    else:
        raise ValueError(f"unknown kind {o.kind!r}")


def render(scene: Scene) -> Image.Image:
    """Draw a scene (aliased: solid colours only, deterministic)."""
    img = Image.fromarray(_background(scene.background, scene.image_size, scene.bg_variant), "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o, scene.image_size)
    return img


def object_map(scene: Scene) -> np.ndarray:
    """[S, S] int64: 1 + the index in `scene.objects` of the object drawn at each pixel, 0 = background."""
    s = scene.image_size
    out = np.zeros((s, s), np.int64)
    for i, o in enumerate(scene.objects):
        im = Image.new("RGB", (s, s))  # black: every colour of the palette has a non-zero channel
        _draw(ImageDraw.Draw(im), o, s)
        out[np.asarray(im).any(-1)] = i + 1
    return out


# Dense labels for vision-tower pretraining: one row per patch, each column a class index (0 = background).
PATCH_LABELS = {"kind": 1 + len(KINDS), "colour": 1 + len(COLOUR_NAMES), "size": 1 + len(SIZES),
                "cell": 1 + GRID * GRID}
MIN_PATCH_PIXELS = 6  # a patch belongs to the object covering most of its pixels, if it covers at least this many


def patch_labels(scene: Scene, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch targets of a scene, patches in row-major order (the tower's token order).

    Returns (labels [P, 4] int64: kind, colour, size, cell per PATCH_LABELS, 0 where no object; owner [P]:
    1 + the index of the object the patch belongs to, 0 for background). Why: naming an object needs the
    tower to know, at every place, what is there; one label per patch is ~64x more supervision per image
    than one set of names per image (see README, "The embedded default model").
    """
    s = scene.image_size
    if s % patch_size:
        raise ValueError(f"image size {s} is not a multiple of patch size {patch_size}")
    g, n = s // patch_size, len(scene.objects)
    ids = object_map(scene).reshape(g, patch_size, g, patch_size).transpose(0, 2, 1, 3).reshape(g * g, -1)
    owner = np.zeros(g * g, np.int64)
    if n:
        counts = np.stack([(ids == i + 1).sum(1) for i in range(n)], 1)  # [P, n] pixels per object
        owner = np.where(counts.max(1) >= MIN_PATCH_PIXELS, counts.argmax(1) + 1, 0)
    table = np.zeros((n + 1, len(PATCH_LABELS)), np.int64)  # row 0: background
    for i, o in enumerate(scene.objects):
        r, c = scene.cell(o)
        table[i + 1] = (1 + KINDS.index(o.kind), 1 + COLOUR_NAMES.index(o.colour), 1 + SIZES.index(o.size),
                        1 + GRID * r + c)
    return table[owner], owner
