"""Rendering: scenes to pixels, and per-pixel / per-patch object labels.

Design note: `render` draws a `Scene` on its background (aliased, solid colours: the same scene always gives
the same pixels, which is what makes a scene hash name an image). `object_map` and `patch_labels` draw each
object alone to say which object covers each pixel / patch: the dense targets of vision-tower pretraining
(`hyperowl.train.vision_pretrain`). Video frames are scenes too, rendered one by one (`Example.videos`) and
encoded by `writer.write_mp4`. `render_drawn` draws a scene of the drawn look (`Scene.look`, issue 31):
anti-aliased or not, filled or outlined, jittered colours, plain/gradient/texture/noise backgrounds, JPEG;
everything from the scene's seeds, so it is as deterministic as `render`. (The module is `rendering`, not `render`, so that `hyperowl.data.synthetic.render`
stays the function.)
"""

from __future__ import annotations

import functools
import io
import math
import random
from dataclasses import dataclass
from typing import Optional

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


def _draw(draw: ImageDraw.ImageDraw, o: Obj, image_size: int, fill=None, scale: int = 1, outline: int = 0) -> None:
    """Draw one object (its box: x - d//2 .. x - d//2 + d - 1), `scale` times larger (supersampling), filled or,
    with `outline` > 0, as an outline that many pixels wide (at scale 1)."""
    d = o.d or diameter(o.size, image_size)
    k = scale
    x0, y0 = (o.x - d // 2) * k, (o.y - d // 2) * k
    x1, y1 = x0 + d * k - 1, y0 + d * k - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    fill = fill or COLOURS[o.colour]
    w = outline * k
    paint = {"outline": fill, "width": w} if outline else {"fill": fill}
    if o.kind == "circle":
        draw.ellipse([x0, y0, x1, y1], **paint)
    elif o.kind == "square":
        draw.rectangle([x0, y0, x1, y1], **paint)
    elif o.kind == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], **paint)
    elif o.kind == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], **paint)
    elif o.kind == "cross":
        t = max(1, round(d / 3)) * k  # arm thickness
        a = (d * k - t) // 2
        if outline:  # the twelve-sided outline of the two bars
            p, q = x0 + a, x0 + a + t - 1
            r, u = y0 + a, y0 + a + t - 1
            draw.polygon([(p, y0), (q, y0), (q, r), (x1, r), (x1, u), (q, u), (q, y1), (p, y1), (p, u), (x0, u),
                          (x0, r), (p, r)], **paint)
        else:
            draw.rectangle([x0, y0 + a, x1, y0 + a + t - 1], fill=fill)
            draw.rectangle([x0 + a, y0, x0 + a + t - 1, y1], fill=fill)
    else:
        raise ValueError(f"unknown kind {o.kind!r}")


def render(scene: Scene) -> Image.Image:
    """Draw a scene (aliased: solid colours only, deterministic). A scene of the drawn look (`scene.look`) is
    drawn by `render_drawn`."""
    if scene.look:
        return render_drawn(scene)
    img = Image.fromarray(_background(scene.background, scene.image_size, scene.bg_variant), "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o, scene.image_size)
    return img


# ----------------------------------------------------------------------------------------------------------
# The drawn look (issue 31): what people draw, not only what the plain look draws
# ----------------------------------------------------------------------------------------------------------

COLOUR_JITTER = 24  # +- per RGB channel around the named colour
COLOUR_MARGIN = 20.0  # a jittered colour is at least this much nearer (RGB distance) its name than any other


def nearest_colour(rgb) -> tuple[str, float]:
    """(the palette name nearest `rgb`, its margin: distance to the second nearest minus to the nearest)."""
    d = sorted((float(np.linalg.norm(np.subtract(rgb, v, dtype=float))), n) for n, v in COLOURS.items())
    return d[0][1], d[1][0] - d[0][0]


def jitter_colour(name: str, rng: random.Random, jitter: int = COLOUR_JITTER) -> tuple[int, int, int]:
    """A colour near `name` that still reads as it: nearest palette colour `name`, by COLOUR_MARGIN."""
    base = COLOURS[name]
    for _ in range(50):
        c = tuple(int(min(255, max(0, v + rng.randint(-jitter, jitter)))) for v in base)
        near, margin = nearest_colour(c)
        if near == name and margin >= COLOUR_MARGIN:
            return c
    return base


def _pale(rng: random.Random) -> np.ndarray:
    """A light, low-saturation colour: every channel 195..255, at most 40 apart."""
    v = rng.randint(225, 255)
    return np.array([min(255, max(195, v - rng.randint(0, 40))) for _ in range(3)], np.float32)


@functools.lru_cache(maxsize=8)
def _unit_grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    return yy, xx


@functools.lru_cache(maxsize=64)  # the frames of a video share theirs
def drawn_background(kind: str, s: int, variant: int) -> np.ndarray:
    """[s, s, 3] uint8 (read-only), light and low-contrast: plain (a pale tint), gradient (two pale colours along a
    random direction), texture (low-contrast stripes, checks or blotches), noise (per-pixel)."""
    rng = random.Random(variant)
    base = _pale(rng)
    if kind == "plain":
        out = np.broadcast_to(base, (s, s, 3))
    elif kind in ("gradient", "texture") and (kind == "gradient" or rng.random() < 1 / 3):
        # Smooth: computed on a coarse grid and enlarged bilinearly (the cost of a large source stays small).
        g = min(s, 32)
        yy, xx = _unit_grid(g)
        if kind == "gradient":
            a = rng.uniform(0, 2 * math.pi)
            t = np.cos(a) * xx + np.sin(a) * yy
            t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
            other = _pale(rng)
            coarse = [base[c] + t * (other[c] - base[c]) for c in range(3)]
        else:  # blotches: coarse noise
            amp, k = rng.uniform(6, 22), rng.randint(3, 8)
            t = np.random.default_rng(variant).uniform(0, 1, (k, k)).astype(np.float32)
            t = np.asarray(Image.fromarray(t, "F").resize((g, g), Image.Resampling.BILINEAR))
            coarse = [base[c] - amp * t for c in range(3)]
        out = np.stack([np.asarray(Image.fromarray(c.astype(np.float32), "F").resize((s, s), Image.Resampling.BILINEAR))
                        for c in coarse], -1)
    elif kind == "texture":
        amp = rng.uniform(6, 22)
        yy, xx = _unit_grid(s)
        if rng.random() < 0.5:  # stripes at a random angle and period
            a, period = rng.uniform(0, math.pi), rng.uniform(0.03, 0.15)
            t = (np.sin((2 * math.pi / period) * (math.cos(a) * xx + math.sin(a) * yy)) + 1) / 2
        else:  # checks
            period = rng.uniform(0.05, 0.2)
            t = (np.floor(xx / period) + np.floor(yy / period)) % 2
        out = base - amp * t[..., None]
    elif kind == "noise":
        amp = rng.randint(8, 30)
        noise = np.random.default_rng(variant).integers(0, amp, (s, s, 1), dtype=np.uint8)
        return _frozen(np.clip(base, amp, 255).astype(np.uint8) - noise)
    else:
        raise ValueError(f"unknown drawn background {kind!r}")
    return _frozen(np.clip(np.asarray(out), 0, 255).astype(np.uint8))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # shared by the cache
    return a


@dataclass(frozen=True)
class DrawnStyle:
    """The look of one example's scenes, all drawn from `Scene.look` (so every frame of a video, and both images of
    a 'same?' pair, look alike): anti-aliased or not, JPEG quality (0: none); per object (by colour and kind) its
    jittered colour and its outline width (0: filled)."""

    antialias: bool
    jpeg_quality: int
    look: int

    @classmethod
    def of(cls, look: int) -> "DrawnStyle":
        rng = random.Random(f"look/{look}")
        aa = rng.random() < 0.6
        q = rng.randint(30, 95) if rng.random() < 0.4 else 0
        return cls(aa, q, look)

    def paint(self, o: Obj, d_model: float) -> tuple[tuple[int, int, int], int]:
        """(colour, outline width) of an object; outlines only where the shape stays readable (>= 12 px at the
        model's 64 px)."""
        rng = random.Random(f"look/{self.look}/{o.colour}/{o.kind}")
        colour = jitter_colour(o.colour, rng)
        outline = 0
        if d_model >= 12 and rng.random() < 0.3:
            d = o.d or 1
            outline = max(1, round(d * rng.uniform(0.1, 0.2)))
        return colour, outline


MODEL_SIZE = 64  # what the outline rule measures against: the embedded model's input size
# Datasets and stage 0 draw sources larger than this at this size (`render_drawn(max_side=...)`): the processor
# reduces them to 64 px anyway, and a 1024 px canvas costs ~15x a 256 px one (measured: docs/embedded_model.md).
DRAWN_RENDER_SIDE = 256


def render_drawn(scene: Scene, max_side: Optional[int] = None) -> Image.Image:
    """Draw a scene in the drawn look at its own (source) size, or at `max_side` if that is smaller (the scene
    scaled): background (`drawn_background`), then the objects in jittered colours, filled or outlined, aliased or
    anti-aliased (drawn 2-4x larger and reduced by area), then optionally a JPEG round trip. Deterministic:
    everything comes from `scene.look` and `scene.bg_variant`."""
    # JPEG only from 96 px up: at 48-95 px a 6 px shape's colour is lost in 4:2:0 chroma (measured: 3 of ~1500
    # objects read as another colour name), and users rarely save such tiny pictures as JPEG.
    jpeg = DrawnStyle.of(scene.look).jpeg_quality if scene.image_size >= 96 else 0
    if max_side and scene.image_size > max_side:
        scene = scene.scaled(max_side)
    s = scene.image_size
    style = DrawnStyle.of(scene.look)
    img = Image.fromarray(drawn_background(scene.background, s, scene.bg_variant), "RGB")
    # Anti-aliasing where it shows at a 64 px input; larger sources are anti-aliased by the processor's reduction.
    k = (4 if s < 96 else 2 if s < 192 else 1) if style.antialias else 1
    layer = Image.new("RGBA", (s * k, s * k), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for o in scene.objects:
        d = scene.diameter(o)
        colour, outline = style.paint(o, d * MODEL_SIZE / s)
        _draw(draw, o, s, fill=colour + (255,), scale=k, outline=outline)
    if k > 1:
        layer = layer.resize((s, s), Image.Resampling.BOX)  # area average: coverage -> alpha (premultiplied)
    img = Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
    if jpeg:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=jpeg)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def object_map(scene: Scene) -> np.ndarray:
    """[S, S] int64: 1 + the index in `scene.objects` of the object drawn at each pixel, 0 = background."""
    s = scene.image_size
    out = np.zeros((s, s), np.int64)
    for i, o in enumerate(scene.objects):
        im = Image.new("RGB", (s, s))  # black: every colour of the palette has a non-zero channel
        _draw(ImageDraw.Draw(im), o, s, fill=(255, 255, 255))  # the whole shape, never its outline
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
