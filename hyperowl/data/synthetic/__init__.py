"""A deterministic synthetic visual world: scenes of coloured shapes, and conversations about them.

Design note
-----------
The world is small on purpose: a tiny Owl3 (tiny vision tower, a few CPU-minutes of training) must be able
to learn it. So images are low resolution (64x64 by default), shapes are solid, aliased and never overlap,
backgrounds are light and low-contrast, and every answer is a short canonical string from a closed
vocabulary (except captions, which are canonical compositions of that vocabulary).

* **Scenes are data.** A `Scene` is a background plus a tuple of `Obj(kind, colour, size, x, y)` (pixel
  centres on a given `image_size`). `render()` draws it; every answer is computed from the Scene objects,
  never from pixels. Objects sit in the cells of a 3x3 grid (at most one per cell, a small jitter that keeps
  them inside their cell), so positions have exact names ("top left", "center", ...).
* **Vocabulary.** kinds: circle square triangle diamond cross; colours: red orange yellow green blue
  purple; sizes: small large; backgrounds: white gray stripes noise, each in a few variants (levels,
  stripe phases, noise seeds; never asked about: a nuisance factor that also keeps images distinct).
* **Tasks** (`task` field; answers in brackets):
    single/colour     What colour is the circle in the image?               [red]
    single/shape      What shape is the red object in the image?            [circle]
    single/count      How many circles are there in the image?              [1..4]
    single/count_all  How many shapes are there in the image?               [1..4]
    single/position   Where is the red circle in the image?                 [top left|top|...|center|...]
    single/relation   Is the red circle left of the blue square in the image? [yes|no]
    single/size       Is the red circle in the image small or large?        [small|large]
    single/caption    Describe the image.                                   [a red circle and a blue square]
    multi/which       Which image has a red circle? (2-4 images)            [image 2]
    multi/same        Are the two images the same?                          [yes|no]
    multi/diff        What is different between the two images?             [colour|shape|size|position|count]
    video/direction   Which way does the red circle move?                   [left|right|up|down]
    video/appear      What appears in the video?                            [a red circle]
    video/disappear   What disappears in the video?                         [a red circle]
    video/order       Which appears first, the red circle or the blue square? [the red circle]
    distractor/<t>    a single/<t> question about image k among N+1 images  [as single/<t>]
  Each task has 2-3 paraphrased templates; the answer never depends on the wording. Objects referred to
  by name are unique in their scene, so every question has exactly one answer. Answers are balanced by
  construction (the answer is drawn first, the scene built to match), tasks round-robin within a group.
  Captions list objects in reading order (row by row, left to right) without sizes: "a red circle, an
  orange square and a blue cross".
* **Videos** are `video_frames` scenes (default 8) sharing one background; events are at least two frames
  from either end (appear/disappear) or apart (order), so sample *all* frames when reading them back.
  They are written as real .mp4 files with PyAV (libx264 4:4:4 lossless when available, else MPEG-4 at
  high quality), `fps` frames per second (default 4).
* **Determinism.** Example i of a split is built from its own RNG, seeded by sha256(seed, split, i,
  attempt), so outputs are bit-identical for equal arguments (x264 runs single-threaded for that) and an
  example does not change when other counts change.
* **Disjoint splits.** A scene's hash is the sha1 of its canonical JSON (background and its variant, image
  size, sorted objects with pixel positions): equal hashes <=> identical images. Each split writes the
  hashes of every image and video frame it uses to `<split>.scenes.txt`; a later split (order train, val,
  test) rejects any example that uses a hash of an earlier split and redraws it (next attempt). Distinct
  hashes can still be near-duplicates (the same objects in the same cells, 2 px apart); `meta.json`
  reports that "layout overlap" per split so it is visible.

Output format (what the training pipeline reads)
------------------------------------------------
`<out>/<split>.jsonl`, one JSON object per line; media paths are relative to the JSONL's directory::

    {"id": "train-000123", "task": "single/colour",
     "messages": [{"role": "user", "content": "<|image|>What colour is the circle in the image?"},
                  {"role": "assistant", "content": "red"}],
     "images": ["train/images/000123_0.png"], "videos": [], "answer": "red"}

One `<|image|>` per entry of "images" and one `<|video|>` per entry of "videos", in order. Multi-image and
distractor prompts label each image: "Image 1: <|image|>\\nImage 2: <|image|>\\nWhich image has a red
circle?"; video prompts are "<|video|>Which way does the red circle move?". Also written: `<split>/images/`
(PNG), `<split>/videos/` (mp4), `<split>.scenes.txt` (scene hashes); `write_dataset` adds `meta.json`
(settings, counts per task, the answer vocabulary, prompt lengths) and a `README.md`.

API: `iter_examples` (in memory: `Example` with scenes, PIL images and frame lists), `generate_split`,
`write_dataset`, `examples` (a few files for a README), `synth_main` (the `hyperowl data synth` CLI);
`random_scene` + `patch_labels` (per-patch kind/colour/size/cell targets) feed vision-tower pretraining
(`hyperowl.train.vision_pretrain`).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import random
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from hyperowl.errors import InputError

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# The vocabulary of the world
# ----------------------------------------------------------------------------------------------------------

KINDS = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}
# Well separated in hue and in each RGB channel (orange sits between red and yellow on G: 40 / 140 / 210).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 0),
    "yellow": (235, 210, 0),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "purple": (150, 60, 190),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
# Object diameter as a fraction of the image side: 11 and 18 px at 64x64, a 3x3 grid cell is 21 px.
SIZE_FRACTION = {"small": 0.17, "large": 0.28}
BACKGROUNDS = ("white", "gray", "stripes", "noise")
# Variants per background (levels, stripe phases x directions, noise seeds): they multiply the number of
# distinct images, so that small scenes (one object) are rarely shared between splits and redrawn.
BG_VARIANTS = {"white": 14, "gray": 19, "stripes": 12, "noise": 2**31}
GRID = 3
MAX_OBJECTS = 4
# (row, col) -> canonical position name.
POSITION_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
DIRECTIONS = ("left", "right", "up", "down")
CHANGES = ("colour", "shape", "size", "position", "count")
RELATIONS = ("left of", "right of", "above", "below")

SPLITS = ("train", "val", "test")
GROUPS = ("single", "multi", "video", "distractor")
SINGLE_TASKS = ("colour", "shape", "count", "count_all", "position", "relation", "size", "caption")
MULTI_TASKS = ("which", "same", "diff")
VIDEO_TASKS = ("direction", "appear", "disappear", "order")
ALL_TASKS = (
    tuple(f"single/{t}" for t in SINGLE_TASKS)
    + tuple(f"multi/{t}" for t in MULTI_TASKS)
    + tuple(f"video/{t}" for t in VIDEO_TASKS)
    + tuple(f"distractor/{t}" for t in SINGLE_TASKS)
)
# Share of each group when a split size is one number.
DEFAULT_MIX = {"single": 0.4, "multi": 0.2, "video": 0.2, "distractor": 0.2}
DEFAULT_SIZES = {"train": 20000, "val": 1000, "test": 1000}

IMAGE_TOKEN = "<|image|>"
VIDEO_TOKEN = "<|video|>"
# Single-image questions name their image through {img}: "the image" alone, "image 3" among distractors.
SINGLE_REFS = ("the image", "the picture")
MAX_ATTEMPTS = 200


def phrase(colour: str, kind: str, article: str = "a") -> str:
    """Canonical object phrase: 'a red circle', 'an orange square', 'the blue cross'."""
    if article == "a" and colour[0] in "aeiou":
        article = "an"
    return f"{article} {colour} {kind}"


# ----------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    """One shape: kind, colour and size names, and its centre in pixels."""

    kind: str
    colour: str
    size: str
    x: int
    y: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """A background and non-overlapping objects on an `image_size` x `image_size` canvas."""

    objects: tuple[Obj, ...]
    background: str = "white"
    image_size: int = 64
    # Which variant of the background (see BG_VARIANTS): a white/gray level, a stripe phase and direction,
    # a noise seed. Always < BG_VARIANTS[background], so equal scenes <=> equal pixels.
    bg_variant: int = 0

    def cell(self, o: Obj) -> tuple[int, int]:
        """(row, col) of the grid cell holding the object's centre."""
        s = self.image_size
        return min(GRID - 1, o.y * GRID // s), min(GRID - 1, o.x * GRID // s)

    def position(self, o: Obj) -> str:
        return POSITION_NAMES[self.cell(o)]

    def find(self, colour: Optional[str] = None, kind: Optional[str] = None) -> list[Obj]:
        return [o for o in self.objects if (colour is None or o.colour == colour) and (kind is None or o.kind == kind)]

    def caption(self) -> str:
        """Objects in reading order (row by row, left to right): 'a red circle, a blue square and a green cross'."""
        objs = sorted(self.objects, key=lambda o: (self.cell(o), o.y, o.x))
        parts = [phrase(o.colour, o.kind) for o in objs]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    def to_dict(self) -> dict:
        return {
            "background": self.background,
            "bg_variant": self.bg_variant,
            "image_size": self.image_size,
            "objects": sorted([o.kind, o.colour, o.size, o.x, o.y] for o in self.objects),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "Scene":
        return cls(tuple(Obj(*o) for o in d["objects"]), d["background"], d["image_size"], d["bg_variant"])

    @functools.cached_property
    def hash(self) -> str:
        """sha1 of the canonical JSON (objects sorted: they never overlap, so draw order is irrelevant)."""
        return hashlib.sha1(json.dumps(self.to_dict(), separators=(",", ":")).encode()).hexdigest()[:16]

    @functools.cached_property
    def layout_hash(self) -> str:
        """Like `hash` without pixel jitter and background variant: equal for near-duplicate images."""
        objs = sorted([o.kind, o.colour, o.size, *self.cell(o)] for o in self.objects)
        key = [self.background, self.image_size, objs]
        return hashlib.sha1(json.dumps(key, separators=(",", ":")).encode()).hexdigest()[:16]

    def render(self) -> Image.Image:
        return render(self)


def diameter(size: str, image_size: int) -> int:
    return max(3, round(SIZE_FRACTION[size] * image_size))


def cell_centre(index: int, image_size: int) -> int:
    return round((index + 0.5) * image_size / GRID)


def max_jitter(size: str, image_size: int) -> int:
    """Largest centre offset such that objects in neighbouring cells never overlap and stay in the image
    (cell centres are rounded, hence the extra pixel): +-1 px large, +-4 px small at 64x64."""
    return max(0, int((image_size / GRID - diameter(size, image_size) - 1) / 2))


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


# ----------------------------------------------------------------------------------------------------------
# Scene construction (all randomness goes through one random.Random per example)
# ----------------------------------------------------------------------------------------------------------

Cell = tuple[int, int]  # (row, col)
ALL_CELLS: tuple[Cell, ...] = tuple((r, c) for r in range(GRID) for c in range(GRID))


class _Builder:
    """Random scene pieces for one example."""

    def __init__(self, rng: random.Random, image_size: int) -> None:
        self.rng = rng
        self.s = image_size

    def place(self, kind: str, colour: str, size: str, cell: Cell) -> Obj:
        j = max_jitter(size, self.s)
        r, c = cell
        return Obj(kind, colour, size, cell_centre(c, self.s) + self.rng.randint(-j, j),
                   cell_centre(r, self.s) + self.rng.randint(-j, j))

    def background(self) -> tuple[str, int]:
        bg = self.rng.choice(BACKGROUNDS)
        return bg, self.rng.randrange(BG_VARIANTS[bg])

    def scene(self, objs: Iterable[Obj], bg: Optional[tuple[str, int]] = None) -> Scene:
        bg = bg or self.background()
        return Scene(tuple(objs), bg[0], self.s, bg[1])

    def fill(self, objs: list[Obj], n: int, cells: Optional[Sequence[Cell]] = None,
             allow: Callable[[str, str], bool] = lambda k, c: True) -> list[Obj]:
        """Add n random objects in free cells (of `cells`), keeping every (colour, kind) pair unique."""
        used = {self._cell(o) for o in objs}
        free = [c for c in (cells or ALL_CELLS) if c not in used]
        taken = {(o.colour, o.kind) for o in objs}
        pairs = [(c, k) for c in COLOUR_NAMES for k in KINDS if (c, k) not in taken and allow(k, c)]
        out = list(objs)
        for cell in self.rng.sample(free, n):
            colour, kind = pairs.pop(self.rng.randrange(len(pairs)))
            out.append(self.place(kind, colour, self.rng.choice(SIZES), cell))
        return out

    def _cell(self, o: Obj) -> Cell:
        return min(GRID - 1, o.y * GRID // self.s), min(GRID - 1, o.x * GRID // self.s)

    def random_objects(self, lo: int = 1, hi: int = MAX_OBJECTS, **kw) -> list[Obj]:
        return self.fill([], self.rng.randint(lo, hi), **kw)

    def pair(self, avoid: set[tuple[str, str]] = frozenset()) -> tuple[str, str]:
        """A random (colour, kind) not in `avoid`."""
        while True:
            p = (self.rng.choice(COLOUR_NAMES), self.rng.choice(KINDS))
            if p not in avoid:
                return p

    def change(self, scene: Scene, what: str) -> Scene:
        """The scene with exactly one change of type `what` (see CHANGES)."""
        rng, objs = self.rng, list(scene.objects)
        i = rng.randrange(len(objs))
        o = objs[i]
        pairs = {(p.colour, p.kind) for p in objs}
        if what == "colour":
            colours = [c for c in COLOUR_NAMES if c != o.colour and (c, o.kind) not in pairs]
            objs[i] = replace(o, colour=rng.choice(colours))
        elif what == "shape":
            kinds = [k for k in KINDS if k != o.kind and (o.colour, k) not in pairs]
            objs[i] = replace(o, kind=rng.choice(kinds))
        elif what == "size":  # keep the cell; re-jitter within the new size's limit so nothing overlaps
            objs[i] = self.place(o.kind, o.colour, "large" if o.size == "small" else "small", self._cell(o))
        elif what == "position":
            used = {self._cell(p) for p in objs}
            objs[i] = self.place(o.kind, o.colour, o.size, rng.choice([c for c in ALL_CELLS if c not in used]))
        elif what == "count":
            add = len(objs) == 1 or (len(objs) < MAX_OBJECTS and rng.random() < 0.5)
            objs = self.fill(objs, 1) if add else objs[:i] + objs[i + 1:]
        else:
            raise ValueError(what)
        return replace(scene, objects=tuple(objs))


def random_scene(rng: random.Random, image_size: int = 64) -> Scene:
    """A scene of 1..MAX_OBJECTS random objects (unique colour+kind pairs) on a random background."""
    b = _Builder(rng, image_size)
    return b.scene(b.random_objects())


# ----------------------------------------------------------------------------------------------------------
# Tasks. Each returns (template, fields, answer, scenes): the template may use {img} (single tasks).
# ----------------------------------------------------------------------------------------------------------

SINGLE_TEMPLATES = {
    "colour": ("What colour is the {kind} in {img}?", "What is the colour of the {kind} in {img}?",
               "Which colour does the {kind} in {img} have?"),
    "shape": ("What shape is the {colour} object in {img}?", "Which shape in {img} is {colour}?",
              "What is the shape of the {colour} object in {img}?"),
    "count": ("How many {kinds} are there in {img}?", "Count the {kinds} in {img}.",
              "How many {kinds} does {img} show?"),
    "count_all": ("How many shapes are there in {img}?", "How many objects are in {img}?",
                  "Count the shapes in {img}."),
    "position": ("Where is the {obj} in {img}?", "In which part of {img} is the {obj}?",
                 "Where in {img} is the {obj}?"),
    "relation": ("Is the {a} {rel} the {b} in {img}?", "In {img}, is the {a} {rel} the {b}?"),
    "size": ("Is the {obj} in {img} small or large?", "What size is the {obj} in {img}?",
             "How big is the {obj} in {img}?"),
    "caption": ("Describe {img}.", "What is in {img}?", "List the shapes in {img}."),
}
MULTI_TEMPLATES = {
    "which": ("Which image has {obj}?", "Which image shows {obj}?", "In which image is there {obj}?"),
    "same": ("Are the two images the same?", "Are these two images identical?",
             "Do the two images show the same scene?"),
    "diff": ("What is different between the two images?", "What changed between the two images?",
             "What differs between the two images?"),
}
VIDEO_TEMPLATES = {
    "direction": ("Which way does the {obj} move?", "In which direction does the {obj} move?",
                  "Which direction is the {obj} moving in?"),
    "appear": ("What appears in the video?", "Which object appears during the video?", "What shows up in the video?"),
    "disappear": ("What disappears in the video?", "Which object disappears during the video?",
                  "What vanishes in the video?"),
    "order": ("Which appears first, the {a} or the {b}?", "What shows up first, the {a} or the {b}?"),
}

_Item = tuple[str, dict, str, list[Scene]]


def _single(b: _Builder, task: str) -> _Item:
    rng = b.rng
    t = rng.choice(SINGLE_TEMPLATES[task])
    if task == "colour":  # the asked kind is unique in the scene
        colour, kind = rng.choice(COLOUR_NAMES), rng.choice(KINDS)
        target = b.place(kind, colour, rng.choice(SIZES), rng.choice(ALL_CELLS))
        objs = b.fill([target], rng.randint(0, MAX_OBJECTS - 1), allow=lambda k, c: k != kind)
        return t, {"kind": kind}, colour, [b.scene(objs)]
    if task == "shape":  # the asked colour is unique
        colour, kind = rng.choice(COLOUR_NAMES), rng.choice(KINDS)
        target = b.place(kind, colour, rng.choice(SIZES), rng.choice(ALL_CELLS))
        objs = b.fill([target], rng.randint(0, MAX_OBJECTS - 1), allow=lambda k, c: c != colour)
        return t, {"colour": colour}, kind, [b.scene(objs)]
    if task == "count":  # n of one kind (colours may repeat), plus other kinds
        n, kind = rng.randint(1, MAX_OBJECTS), rng.choice(KINDS)
        cells = rng.sample(ALL_CELLS, n)
        objs = [b.place(kind, rng.choice(COLOUR_NAMES), rng.choice(SIZES), c) for c in cells]
        objs = b.fill(objs, rng.randint(0, MAX_OBJECTS - n), allow=lambda k, c: k != kind)
        return t, {"kinds": PLURALS[kind]}, str(n), [b.scene(objs)]
    if task == "count_all":
        n = rng.randint(1, MAX_OBJECTS)
        return t, {}, str(n), [b.scene(b.fill([], n))]
    if task in ("position", "size"):
        colour, kind = b.pair()
        size, cell = rng.choice(SIZES), rng.choice(ALL_CELLS)
        objs = b.fill([b.place(kind, colour, size, cell)], rng.randint(0, MAX_OBJECTS - 1))
        answer = POSITION_NAMES[cell] if task == "position" else size
        return t, {"obj": f"{colour} {kind}"}, answer, [b.scene(objs)]
    if task == "relation":
        rel, yes = rng.choice(RELATIONS), rng.random() < 0.5
        axis = 1 if rel in ("left of", "right of") else 0  # compare columns or rows; never equal
        ca, cb = rng.sample(ALL_CELLS, 2)
        while ca[axis] == cb[axis]:
            ca, cb = rng.sample(ALL_CELLS, 2)
        truth = ca[axis] < cb[axis] if rel in ("left of", "above") else ca[axis] > cb[axis]
        if truth != yes:
            ca, cb = cb, ca
        pa = b.pair()
        pb = b.pair({pa})
        objs = [b.place(pa[1], pa[0], rng.choice(SIZES), ca), b.place(pb[1], pb[0], rng.choice(SIZES), cb)]
        objs = b.fill(objs, rng.randint(0, MAX_OBJECTS - 2))
        fields = {"a": f"{pa[0]} {pa[1]}", "b": f"{pb[0]} {pb[1]}", "rel": rel}
        return t, fields, "yes" if yes else "no", [b.scene(objs)]
    if task == "caption":
        scene = b.scene(b.random_objects())
        return t, {}, scene.caption(), [scene]
    raise ValueError(task)


def ask(scene: Scene, task: str, rng: random.Random, img: str = "the image") -> Optional[tuple[str, str]]:
    """A `single/<task>` question about an existing scene and its answer, or None if the scene has none.

    The inverse of `_single` (which builds a scene for an answer): used for the extra turns of a training
    conversation, so one image is asked about several times. Answers follow the same rules (the object named
    is unique in the scene).
    """
    objs = scene.objects
    if not objs:
        return None
    t = rng.choice(SINGLE_TEMPLATES[task])
    kinds = Counter(o.kind for o in objs)
    names = Counter(o.name for o in objs)
    named = [o for o in objs if names[o.name] == 1]  # nameable: a count scene may repeat a colour and kind
    if task in ("colour", "shape"):  # name the object by its other attribute, which must be unique
        key, answer = ("kind", "colour") if task == "colour" else ("colour", "kind")
        seen = Counter(getattr(o, key) for o in objs)
        unique = sorted(v for v, n in seen.items() if n == 1)
        if not unique:
            return None
        value = rng.choice(unique)
        return t.format(img=img, **{key: value}), getattr(scene.find(**{key: value})[0], answer)
    if task == "count":
        kind = rng.choice(sorted(kinds))
        return t.format(img=img, kinds=PLURALS[kind]), str(kinds[kind])
    if task == "count_all":
        return t.format(img=img), str(len(objs))
    if task in ("position", "size"):
        if not named:
            return None
        o = rng.choice(named)
        return t.format(img=img, obj=o.name), scene.position(o) if task == "position" else o.size
    if task == "relation":
        rel = rng.choice(RELATIONS)
        axis = 1 if rel in ("left of", "right of") else 0
        pairs = [(a, b) for a in named for b in named if scene.cell(a)[axis] != scene.cell(b)[axis]]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        ca, cb = scene.cell(a)[axis], scene.cell(b)[axis]
        truth = ca < cb if rel in ("left of", "above") else ca > cb
        return t.format(img=img, a=a.name, b=b.name, rel=rel), "yes" if truth else "no"
    if task == "caption":
        return t.format(img=img), scene.caption()
    raise ValueError(task)


def _multi(b: _Builder, task: str) -> _Item:
    rng = b.rng
    t = rng.choice(MULTI_TEMPLATES[task])
    if task == "which":  # exactly one of 2-4 images holds the pair
        m = rng.randint(2, 4)
        k = rng.randrange(m)
        colour, kind = b.pair()
        scenes = []
        for i in range(m):
            if i == k:
                objs = b.fill([b.place(kind, colour, rng.choice(SIZES), rng.choice(ALL_CELLS))], rng.randint(0, 2))
            else:
                objs = b.random_objects(1, 3, allow=lambda kk, cc: (cc, kk) != (colour, kind))
            scenes.append(b.scene(objs))
        return t, {"obj": phrase(colour, kind)}, f"image {k + 1}", scenes
    base = b.scene(b.random_objects())
    if task == "same":
        same = rng.random() < 0.5
        other = base if same else b.change(base, rng.choice(CHANGES))
        return t, {}, "yes" if same else "no", [base, other]
    if task == "diff":
        what = rng.choice(CHANGES)
        return t, {}, what, [base, b.change(base, what)]
    raise ValueError(task)


def _video(b: _Builder, task: str, frames: int) -> _Item:
    rng, s = b.rng, b.s
    t = rng.choice(VIDEO_TEMPLATES[task])
    bg = b.background()
    if task == "direction":  # one object crosses the image along a row or column; others stay outside its lane
        direction = rng.choice(DIRECTIONS)
        colour, kind = b.pair()
        size = rng.choice(SIZES)
        lane = rng.randrange(GRID)
        horizontal = direction in ("left", "right")
        cells = [c for c in ALL_CELLS if (c[0] if horizontal else c[1]) != lane]
        static = b.fill([], rng.randint(0, 2), cells=cells, allow=lambda k, c: (c, k) != (colour, kind))
        j = max_jitter(size, s)
        across = cell_centre(lane, s) + rng.randint(-j, j)
        start, end = cell_centre(0, s), cell_centre(GRID - 1, s)
        if direction in ("left", "up"):
            start, end = end, start
        scenes = []
        for f in range(frames):
            along = round(start + (end - start) * f / (frames - 1))
            x, y = (along, across) if horizontal else (across, along)
            scenes.append(b.scene(static + [Obj(kind, colour, size, x, y)], bg))
        return t, {"obj": f"{colour} {kind}"}, direction, scenes
    if task in ("appear", "disappear"):  # >= 2 frames on each side of the event
        base = b.random_objects(1, 3)
        with_new = b.fill(base, 1)
        new = with_new[-1]
        k = rng.randint(2, frames - 2)
        before, after = (base, with_new) if task == "appear" else (with_new, base)
        scenes = [b.scene(before if f < k else after, bg) for f in range(frames)]
        return t, {}, phrase(new.colour, new.kind), scenes
    if task == "order":  # A appears at ka, B at kb >= ka + 2; >= 1 static object (an empty image is in every split)
        objs = b.fill(b.random_objects(1, 2), 2)
        base, a, bb = objs[:-2], objs[-2], objs[-1]
        ka = rng.randint(1, frames - 3)
        kb = rng.randint(ka + 2, frames - 1)
        scenes = [b.scene(base + ([a] if f >= ka else []) + ([bb] if f >= kb else []), bg) for f in range(frames)]
        first, second = f"{a.colour} {a.kind}", f"{bb.colour} {bb.kind}"
        opts = [first, second] if rng.random() < 0.5 else [second, first]
        return t, {"a": opts[0], "b": opts[1]}, f"the {first}", scenes
    raise ValueError(task)


# ----------------------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One conversation: the user prompt (with placeholders), the canonical answer and its scenes."""

    id: str
    task: str
    prompt: str
    answer: str
    scenes: list[Scene] = field(default_factory=list)  # one per image, in prompt order
    video_scenes: list[list[Scene]] = field(default_factory=list)  # one frame list per video
    target: Optional[int] = None  # 1-based image asked about (distractor and multi/which)
    extra: list[tuple[str, str, str]] = field(default_factory=list)  # further (task, question, answer) turns
    intro: list[tuple[str, str, str]] = field(default_factory=list)  # one (task, question, answer) per image

    @functools.cached_property
    def images(self) -> list[Image.Image]:
        return [s.render() for s in self.scenes]

    @functools.cached_property
    def videos(self) -> list[list[Image.Image]]:
        # Static videos repeat scenes: render each distinct one once.
        cache: dict[str, Image.Image] = {}
        for s in {s.hash: s for v in self.video_scenes for s in v}.values():
            cache[s.hash] = s.render()
        return [[cache[s.hash] for s in v] for v in self.video_scenes]

    @property
    def messages(self) -> list[dict]:
        out = []
        prompt = self.prompt
        if self.intro:  # the images one per turn, each with a question about it, then the question
            for k, (_, q, a) in enumerate(self.intro):
                out += [{"role": "user", "content": _labelled(1, k) + q}, {"role": "assistant", "content": a}]
            prefix = _labelled(len(self.scenes))
            assert prompt.startswith(prefix), "only multi-image prompts that start with the image list get an intro"
            prompt = prompt[len(prefix):]
        out += [{"role": "user", "content": prompt}, {"role": "assistant", "content": self.answer}]
        for _, q, a in self.extra:
            out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return out

    def scene_hashes(self) -> set[str]:
        return {s.hash for s in self.scenes} | {s.hash for v in self.video_scenes for s in v}

    def all_scenes(self) -> list[Scene]:
        return list(self.scenes) + [s for v in self.video_scenes for s in v]


def add_turns(ex: Example, turns: int, rng: random.Random) -> Example:
    """Give `ex` up to `turns - 1` further single-image questions about its images (set `ex.extra`).

    Why: an answer is a few tokens, so a one-question conversation is a thin learning signal per image;
    asking about the same picture several times (different tasks, different objects) multiplies the
    supervised answers at little cost, the way instruction datasets ask many questions per image. A single
    image is "the image"; with several images each question names its image ("image 2"). Videos get theirs
    from `add_video_turns`.
    """
    if turns <= 1 or not ex.scenes:
        return ex
    group, sub = ex.task.split("/", 1)
    tasks = [t for t in SINGLE_TASKS if not (group == "single" and t == sub)]  # not the first question again

    def pick() -> tuple[Scene, str]:
        k = rng.randrange(len(ex.scenes))
        return ex.scenes[k], rng.choice(SINGLE_REFS) if len(ex.scenes) == 1 else f"image {k + 1}"

    ex.extra = _ask_turns(tasks, turns - 1, pick, rng)
    return ex


def _ask_turns(tasks: Sequence[str], n: int, pick: Callable[[], tuple[Scene, str]],
               rng: random.Random) -> list[tuple[str, str, str]]:
    """Up to n (task, question, answer) turns, one per task in a shuffled order of `tasks`; `pick()` draws the
    scene to ask about and how the question names it. Tasks the scene cannot answer are skipped."""
    tasks = list(tasks)
    rng.shuffle(tasks)
    out: list[tuple[str, str, str]] = []
    for task in tasks:
        if len(out) == n:
            break
        scene, ref = pick()
        qa = ask(scene, task, rng, ref)
        if qa is not None:
            out.append((task, *qa))
    return out


FRAME_REFS = ("the first frame", "the last frame")


def add_video_turns(ex: Example, turns: int, rng: random.Random) -> Example:
    """Give a video conversation up to `turns - 1` further questions about its first or last frame (`ex.extra`).

    Why: a video conversation asks one question (about an event), so each video, eight images through the
    tower, is a thin learning signal. The events are differences between the start and the end: what moves
    is somewhere else in the last frame, what appears is only in the last, what vanishes only in the first.
    Questions about "the first frame" and "the last frame" (colour, position, count, caption, ... of that
    frame, answered from its scene like any single-image question) teach the model to read the start and the
    end of a video apart, the part of every video task that a single event question supervises least.
    """
    if turns <= 1 or not ex.video_scenes:
        return ex
    frames = ex.video_scenes[0]

    def pick() -> tuple[Scene, str]:
        last = rng.random() < 0.5
        return frames[-1] if last else frames[0], FRAME_REFS[last]

    ex.extra = _ask_turns(SINGLE_TASKS, turns - 1, pick, rng)  # a video has no other extra turns
    return ex


def add_which_turns(ex: Example, turns: int, rng: random.Random) -> Example:
    """Give a conversation of several images up to `turns` further "which image has X?" questions (`ex.extra`).

    Why: in the usual mix one multi-image conversation in three asks it once. Measured (docs/
    embedded_model_history.md, "'Which' questions in every multi-image conversation" and "The 'which' circuit
    was a positional shortcut"): with K = 3 the model still answers at chance. Every conversation of several
    images (multi-image and distractor)
    can ask it about any object whose colour and kind occur in exactly one image; a turn is ~12 tokens
    against the tower and prompt the images already cost. Targets are drawn over the images without
    replacement (balanced answers; with two images the second turn's answer therefore follows from the
    first's); an object the prompt already names is not asked again. The turns are shuffled in among the
    other extra turns.
    """
    if turns <= 0 or len(ex.scenes) < 2:
        return ex
    seen = Counter((o.colour, o.kind) for s in ex.scenes for o in s.objects)
    asked = ex.prompt + "".join(q for _, q, _ in ex.extra)
    candidates = {k: sorted({(o.colour, o.kind) for o in s.objects
                             if seen[o.colour, o.kind] == 1 and phrase(o.colour, o.kind) not in asked})
                  for k, s in enumerate(ex.scenes)}
    targets = [k for k, objs in candidates.items() if objs]
    rng.shuffle(targets)
    turns_ = []
    for k in targets[:turns]:
        colour, kind = rng.choice(candidates[k])
        q = rng.choice(MULTI_TEMPLATES["which"]).format(obj=phrase(colour, kind))
        turns_.append(("which", q, f"image {k + 1}"))
    extra = ex.extra + turns_
    rng.shuffle(extra)
    ex.extra = extra
    return ex


def add_intro(ex: Example, share: float, rng: random.Random) -> Example:
    """With probability `share`, show a multi-image conversation's images one per turn (set `ex.intro`).

    Each image comes in its own user turn ("Image k: <|image|>" and a question about "this image"), then the
    conversation's own question without the image list. Why: picking an image by its index ("which image",
    "in image 3") needs a circuit that forms only after a long plateau (docs/embedded_model_history.md);
    questions about the latest image teach cross-attention to read the image nearest to the question (the
    first half of that circuit), and the index question can first be answered from the text history. In a
    tiny-model probe (scripts/probe_index.py --aux 0.5) this lifted the index accuracy at 700 steps from 0.52
    to 0.94 on the usual one-turn layout (one fixed layout: possibly a positional shortcut, see the history's
    2026-12-03 section). Such a conversation drops its extra turns (`add_turns`): the intro
    already asks about every image. Single-image and video conversations are left as they are.
    """
    if share <= 0 or len(ex.scenes) < 2 or rng.random() >= share:
        return ex
    intro = []
    for scene in ex.scenes:
        tasks = [t for t in SINGLE_TASKS if t != "caption"]  # short answers: the turns add few tokens
        rng.shuffle(tasks)
        turn = next(((t, *qa) for t in tasks if (qa := ask(scene, t, rng, "this image")) is not None), None)
        if turn is None:  # an empty image: nothing to ask; keep the usual layout
            return ex
        intro.append(turn)
    ex.intro = intro
    ex.extra = []  # the intro already asks about every image; longer rows would pad whole batches
    return ex


def _seed_for(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, ("hyperowl-synth",) + parts)).encode()).digest()[:8], "big")


def _labelled(n: int, start: int = 0) -> str:
    return "".join(f"Image {i + 1}: {IMAGE_TOKEN}\n" for i in range(start, start + n))


def build_example(task: str, rng: random.Random, *, image_size: int = 64, video_frames: int = 8,
                  distractors: int = 3, id: str = "") -> Example:
    """One example of `task` (a name from ALL_TASKS) drawn with `rng`."""
    b = _Builder(rng, image_size)
    group, sub = task.split("/", 1)
    if group == "single":
        t, fields, answer, scenes = _single(b, sub)
        q = t.format(img=rng.choice(SINGLE_REFS), **fields)
        return Example(id, task, IMAGE_TOKEN + q, answer, scenes)
    if group == "multi":
        t, fields, answer, scenes = _multi(b, sub)
        target = int(answer.split()[1]) if sub == "which" else None
        return Example(id, task, _labelled(len(scenes)) + t.format(**fields), answer, scenes, target=target)
    if group == "video":
        t, fields, answer, frames = _video(b, sub, video_frames)
        return Example(id, task, VIDEO_TOKEN + t.format(**fields), answer, video_scenes=[frames])
    if group == "distractor":  # the single question about image k among distractors + 1 shuffled images
        t, fields, answer, (scene,) = _single(b, sub)
        m = distractors + 1
        k = rng.randrange(m)
        scenes = [scene if i == k else b.scene(b.random_objects()) for i in range(m)]
        q = t.format(img=f"image {k + 1}", **fields)
        return Example(id, task, _labelled(m) + q[0].upper() + q[1:], answer, scenes, target=k + 1)
    raise ValueError(f"unknown task {task!r}")


def _select_tasks(tasks: Optional[Sequence[str]]) -> dict[str, list[str]]:
    """Task names per group, filtered by exact names or group names ('video', 'single/colour')."""
    chosen = [t for t in ALL_TASKS if tasks is None or t in tasks or t.split("/")[0] in tasks]
    if tasks is not None:
        unknown = [t for t in tasks if t not in ALL_TASKS and t not in GROUPS]
        if unknown:
            raise InputError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(GROUPS + ALL_TASKS)}")
    if not chosen:
        raise InputError("the task filter selects no task; give task or group names, e.g. 'single,video/direction'")
    return {g: [t for t in chosen if t.startswith(g + "/")] for g in GROUPS}


def _validate(split: str, counts: Mapping[str, int], distractors: int, image_size: int, video_frames: int,
              turns: int = 1, progressive: float = 0.0, video_turns: int = 1, which_turns: int = 0) -> None:
    if split not in SPLITS:
        raise InputError(f"split '{split}': must be one of {', '.join(SPLITS)}")
    for g, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise InputError(f"number of {g} examples {n!r}: must be a non-negative integer")
    if not isinstance(distractors, int) or distractors < 1:
        raise InputError(f"distractors={distractors!r}: must be at least 1")
    if not isinstance(image_size, int) or image_size < 32 or image_size % 2 or image_size > 1024:
        raise InputError(f"image size {image_size!r}: must be an even number of pixels from 32 to 1024")
    if not isinstance(video_frames, int) or not 4 <= video_frames <= 64:
        raise InputError(f"video frames {video_frames!r}: must be from 4 to 64")
    if not isinstance(turns, int) or not 1 <= turns <= len(SINGLE_TASKS):
        raise InputError(f"turns={turns!r}: questions per conversation must be from 1 to {len(SINGLE_TASKS)} "
                         f"(one per single-image task)")
    if not isinstance(video_turns, int) or not 1 <= video_turns <= len(SINGLE_TASKS):
        raise InputError(f"video_turns={video_turns!r}: questions per video conversation must be from 1 to "
                         f"{len(SINGLE_TASKS)} (the video's question, then one per single-image task)")
    if not isinstance(which_turns, int) or not 0 <= which_turns <= 8:
        raise InputError(f"which_turns={which_turns!r}: further 'which image has X?' questions per conversation of "
                         f"several images must be from 0 to 8 (at most one per image is asked)")
    if not isinstance(progressive, (int, float)) or not 0 <= progressive <= 1:
        raise InputError(f"progressive={progressive!r}: the share of multi-image conversations shown one image per "
                         f"turn must be from 0 to 1")


class _Stats:
    def __init__(self) -> None:
        self.rejected = 0


def _iter(split: str, n_single: int, n_multi: int, n_video: int, n_distractor: int, distractors: int, seed: int,
          image_size: int, video_frames: int, exclude: Optional[set[str]], tasks: Optional[Sequence[str]],
          stats: _Stats, turns: int = 1, progressive: float = 0.0, video_turns: int = 1,
          which_turns: int = 0) -> Iterator[Example]:
    """Validate now (not at the first next()), then return the generator."""
    counts = {"single": n_single, "multi": n_multi, "video": n_video, "distractor": n_distractor}
    _validate(split, counts, distractors, image_size, video_frames, turns, progressive, video_turns, which_turns)
    per_group = _select_tasks(tasks)
    order: list[str] = []
    for g, n in counts.items():
        if n and not per_group[g]:
            raise InputError(f"{n} {g} examples asked for, but the task filter leaves no {g} task")
        order += [per_group[g][j % len(per_group[g])] for j in range(n)]  # round-robin: balanced tasks
    random.Random(_seed_for(seed, split, "order")).shuffle(order)
    return _generate(split, order, distractors, seed, image_size, video_frames, exclude, stats, turns, progressive,
                     video_turns, which_turns)


def _generate(split: str, order: list[str], distractors: int, seed: int, image_size: int, video_frames: int,
              exclude: Optional[set[str]], stats: _Stats, turns: int = 1,
              progressive: float = 0.0, video_turns: int = 1, which_turns: int = 0) -> Iterator[Example]:
    for i, task in enumerate(order):
        for attempt in range(MAX_ATTEMPTS):
            rng = random.Random(_seed_for(seed, split, i, attempt))
            ex = build_example(task, rng, image_size=image_size, video_frames=video_frames, distractors=distractors,
                               id=f"{split}-{i:06d}")
            if not exclude or exclude.isdisjoint(ex.scene_hashes()):
                break
            stats.rejected += 1  # an image of an earlier split: redraw
        else:
            raise RuntimeError(f"{split} example {i} ({task}): every attempt reused an earlier split's scene")
        # Own RNGs: the first question (and so every turns=1 dataset) depends on neither option.
        ex = add_turns(ex, turns, random.Random(_seed_for(seed, split, i, "turns")))
        ex = add_video_turns(ex, video_turns, random.Random(_seed_for(seed, split, i, "video-turns")))
        ex = add_intro(ex, progressive, random.Random(_seed_for(seed, split, i, "intro")))
        yield add_which_turns(ex, which_turns, random.Random(_seed_for(seed, split, i, "which-turns")))


def iter_examples(split: str = "train", n_single: int = 0, n_multi: int = 0, n_video: int = 0, n_distractor: int = 0,
                  distractors: int = 3, seed: int = 0, image_size: int = 64, video_frames: int = 8, *,
                  exclude_hashes: Optional[set[str]] = None,
                  tasks: Optional[Sequence[str]] = None, turns: int = 1,
                  progressive: float = 0.0, video_turns: int = 1, which_turns: int = 0) -> Iterator[Example]:
    """The examples of a split in memory (same content as `generate_split` writes), without files.

    `ex.images` / `ex.videos` render lazily to PIL images / frame lists; `ex.scenes` / `ex.video_scenes`
    hold the data. `exclude_hashes`: scene hashes to avoid (an earlier split's). `tasks`: keep only these
    task or group names. `turns`: questions per image conversation (see `add_turns`). `progressive`: share of
    multi-image conversations shown one image per turn (see `add_intro`). `video_turns`: questions per video
    conversation (see `add_video_turns`). `which_turns`: further "which image has X?" questions per conversation
    of several images (see `add_which_turns`).
    """
    return _iter(split, n_single, n_multi, n_video, n_distractor, distractors, seed, image_size, video_frames,
                 exclude_hashes, tasks, _Stats(), turns, progressive, video_turns, which_turns)


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def video_codec() -> str:
    """libx264 when this PyAV build can encode it, else mpeg4."""
    import av

    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    raise RuntimeError("this PyAV build has neither a libx264 nor an mpeg4 encoder")


def write_mp4(frames: Sequence[Image.Image], path: Union[str, Path], fps: int = 4) -> None:
    """Encode RGB frames as an .mp4, faithfully: x264 lossless 4:4:4 (single-threaded: same bytes every
    run), or MPEG-4 part 2 at the best quantizer."""
    import av

    codec = video_codec()
    w, h = frames[0].size
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        if codec == "libx264":
            stream.pix_fmt = "yuv444p"
            stream.options = {"qp": "0", "preset": "medium", "threads": "1"}
        else:
            stream.pix_fmt = "yuv420p"
            stream.options = {"qscale": "1", "threads": "1"}
            stream.codec_context.qmin = stream.codec_context.qmax = 1
        for im in frames:
            frame = av.VideoFrame.from_ndarray(np.asarray(im.convert("RGB")), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _hash_file(out: Path, split: str) -> Path:
    return out / f"{split}.scenes.txt"


def read_scene_hashes(path: Path) -> tuple[set[str], set[str]]:
    """(scene hashes, layout hashes) of a `<split>.scenes.txt` (one `hash<TAB>layout_hash` line per scene)."""
    hashes, layouts = set(), set()
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it as a scenes file ({e}); pass a <split>.scenes.txt written by "
                         "`hyperowl data synth`") from e
    for n, line in enumerate(lines, 1):
        if line:
            parts = line.split("\t")
            if len(parts) != 2:
                raise InputError(f"{path}:{n}: expected 'scene_hash<TAB>layout_hash', got {line[:60]!r}; pass a "
                                 "<split>.scenes.txt written by `hyperowl data synth`")
            hashes.add(parts[0])
            layouts.add(parts[1])
    return hashes, layouts


def _prepare_split_dir(out: Path, split: str) -> Path:
    if out.exists() and not out.is_dir():
        raise InputError(f"output '{out}': exists and is not a directory")
    d = out / split
    if d.exists():
        # Only ever delete a folder we wrote (its JSONL sits next to it), never a user's.
        if not (out / f"{split}.jsonl").exists():
            raise InputError(f"output '{d}': exists but is not a generated split (no {split}.jsonl next to it); "
                             f"remove it or choose another --out")
        shutil.rmtree(d)
    (d / "images").mkdir(parents=True)
    (d / "videos").mkdir()
    return d


def _write_split(out_dir: Union[str, Path], split: str, n_single: int, n_multi: int, n_video: int, n_distractor: int,
                 distractors: int, seed: int, image_size: int, video_frames: int, fps: int,
                 exclude: Optional[tuple[set[str], set[str]]], tasks: Optional[Sequence[str]],
                 progress: Optional[bool], turns: int = 1, progressive: float = 0.0,
                 video_turns: int = 1, which_turns: int = 0) -> tuple[Path, dict]:
    from tqdm import tqdm

    out = Path(out_dir)
    counts = {"single": n_single, "multi": n_multi, "video": n_video, "distractor": n_distractor}
    _validate(split, counts, distractors, image_size, video_frames, turns, progressive, video_turns, which_turns)
    if not isinstance(fps, int) or fps < 1:
        raise InputError(f"fps={fps!r}: must be a positive integer")
    if exclude is None:  # the hashes of the splits before this one that are already in out_dir
        exclude = (set(), set())
        for earlier in SPLITS[: SPLITS.index(split)]:
            if _hash_file(out, earlier).exists():
                h, lay = read_scene_hashes(_hash_file(out, earlier))
                exclude[0].update(h)
                exclude[1].update(lay)
    split_dir = _prepare_split_dir(out, split)
    stats = _Stats()
    hashes: dict[str, str] = {}  # scene hash -> layout hash
    tasks_count: Counter = Counter()
    answers: Counter = Counter()
    prompt_chars: list[int] = []
    total = sum(counts.values())
    jsonl = out / f"{split}.jsonl"
    tmp = jsonl.with_suffix(".jsonl.tmp")
    examples = _iter(split, n_single, n_multi, n_video, n_distractor, distractors, seed, image_size, video_frames,
                     exclude[0], tasks, stats, turns, progressive, video_turns, which_turns)
    extra_turns = intro_conversations = which_turns_n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        bar = tqdm(examples, total=total, desc=f"synth {split}", unit="ex", file=sys.stderr,
                   disable=None if progress is None else not progress)  # None: shown on a terminal
        for ex in bar:
            stem = ex.id.split("-", 1)[1]
            images, videos = [], []
            for j, im in enumerate(ex.images):
                rel = f"{split}/images/{stem}_{j}.png"
                im.save(out / rel, compress_level=1)  # fast; the images are tiny anyway
                images.append(rel)
            for j, frames in enumerate(ex.videos):
                rel = f"{split}/videos/{stem}" + (f"_{j}" if j else "") + ".mp4"
                write_mp4(frames, out / rel, fps=fps)
                videos.append(rel)
            record = {"id": ex.id, "task": ex.task, "messages": ex.messages, "images": images, "videos": videos,
                      "answer": ex.answer}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            for s in ex.all_scenes():
                hashes[s.hash] = s.layout_hash
            tasks_count[ex.task] += 1
            extra_turns += len(ex.extra)
            which_turns_n += sum(t == "which" for t, _, _ in ex.extra)
            intro_conversations += bool(ex.intro)
            answers[ex.answer if not ex.task.endswith("/caption") else "<caption>"] += 1
            prompt_chars.append(len(ex.prompt))
            del ex.images, ex.videos  # free the rendered pixels
    tmp.replace(jsonl)
    _hash_file(out, split).write_text("".join(f"{h}\t{lay}\n" for h, lay in sorted(hashes.items())))
    layouts = set(hashes.values())
    stats_out = {
        "file": jsonl.name,
        "examples": total,
        "extra_turns": extra_turns,
        "which_turns": which_turns_n,
        "one_image_per_turn": intro_conversations,
        "tasks": dict(sorted(tasks_count.items())),
        "answers": dict(sorted(answers.items())),
        "scenes": len(hashes),
        "rejected_attempts": stats.rejected,
        # Share of this split's scene layouts (jitter and noise ignored) also present in earlier splits.
        "layout_overlap_with_earlier_splits": round(len(layouts & exclude[1]) / max(1, len(layouts)), 4),
        "prompt_chars": {"min": min(prompt_chars, default=0), "mean": round(sum(prompt_chars) / max(1, total), 1),
                         "max": max(prompt_chars, default=0)},
    }
    logger.info("wrote %s: %d examples, %d scenes, %d redraws", jsonl, total, len(hashes), stats.rejected)
    return jsonl, stats_out


def generate_split(out_dir: Union[str, Path], split: str, n_single: int, n_multi: int, n_video: int,
                   n_distractor: int = 0, distractors: int = 3, seed: int = 0, image_size: int = 64,
                   video_frames: int = 8, *, fps: int = 4, exclude_hashes: Optional[set[str]] = None,
                   tasks: Optional[Sequence[str]] = None, progress: Optional[bool] = None, turns: int = 1,
                   progressive: float = 0.0, video_turns: int = 1, which_turns: int = 0) -> Path:
    """Write `<out_dir>/<split>.jsonl` with its images, videos and scene hashes; return the JSONL path.

    Scenes of earlier splits (train < val < test) whose `<split>.scenes.txt` is in `out_dir` are never
    reused, unless `exclude_hashes` is given (then exactly those are avoided). An existing generated split of
    the same name is replaced. `turns`: questions per image conversation (see `add_turns`); `progressive`: share
    of multi-image conversations shown one image per turn (see `add_intro`); `video_turns`: questions per video
    conversation (see `add_video_turns`); `which_turns`: further "which image has X?" questions per conversation of
    several images (see `add_which_turns`).
    """
    exclude = None if exclude_hashes is None else (set(exclude_hashes), set())
    path, _ = _write_split(out_dir, split, n_single, n_multi, n_video, n_distractor, distractors, seed, image_size,
                           video_frames, fps, exclude, tasks, progress, turns, progressive, video_turns, which_turns)
    return path


def _split_counts(size: Union[int, Mapping[str, int]], split: str, groups: Sequence[str],
                  mix: Mapping[str, float] = DEFAULT_MIX) -> dict[str, int]:
    """Examples per group; a total is shared by the weights `mix` among the groups that have tasks."""
    if isinstance(size, Mapping):
        unknown = set(size) - set(GROUPS)
        if unknown:
            raise InputError(f"size of split '{split}': unknown group(s) {', '.join(sorted(unknown))}; "
                             f"use {', '.join(GROUPS)}")
        return {g: size.get(g, 0) for g in GROUPS}
    if not isinstance(size, int) or size < 0:
        raise InputError(f"size of split '{split}' {size!r}: must be a non-negative integer")
    weight = sum(mix[g] for g in groups)
    counts = {g: int(size * mix[g] / weight) if g in groups else 0 for g in GROUPS}
    counts[groups[0]] += size - sum(counts.values())
    return counts


_DATASET_README = """# Synthetic visual world (hyperowl.data.synthetic)

Generated by `hyperowl data synth` (seed {seed}, {image_size}x{image_size} images, {video_frames}-frame videos
at {fps} fps).
Files: `<split>.jsonl` (one conversation per line), `<split>/images/*.png`, `<split>/videos/*.mp4`,
`<split>.scenes.txt` (hashes of every scene used; splits never share one), `meta.json` (counts, answer
vocabulary). Media paths in the JSONL are relative to this folder. Record format:

    {{"id", "task", "messages": [user with <|image|>/<|video|> placeholders, assistant answer],
      "images": [...], "videos": [...], "answer"}}

Answers are canonical and exactly matchable; score with exact string match. Read videos with all their
frames (max_frames >= {video_frames}). The module docstring of `hyperowl/data/synthetic.py` lists the tasks.
"""


def write_dataset(out_dir: Union[str, Path], sizes: Mapping[str, Union[int, Mapping[str, int]]] = DEFAULT_SIZES,
                  seed: int = 0, *, image_size: int = 64, video_frames: int = 8, distractors: int = 3, fps: int = 4,
                  tasks: Optional[Sequence[str]] = None, progress: Optional[bool] = None,
                  train_turns: int = 1, train_progressive: float = 0.0,
                  train_mix: Optional[Mapping[str, float]] = None, train_video_turns: int = 1,
                  train_which_turns: int = 0,
                  exclude: Sequence[Union[str, Path]] = ()) -> dict[str, Path]:
    """Write train/val/test (splits absent from `sizes` are skipped), `meta.json` and `README.md`.

    train_turns: questions per image conversation in the train split (`add_turns`); val and test always
    ask one, so evaluation scores one answer per conversation. train_progressive: share of the train split's
    multi-image conversations shown one image per turn (`add_intro`); val and test keep the one-turn layout.
    train_mix: weights of the groups in the train split's total (missing groups keep DEFAULT_MIX's); val and
    test keep DEFAULT_MIX, so scores stay comparable across training mixes. train_video_turns: questions per
    video conversation in the train split (`add_video_turns`); val and test ask one. train_which_turns: further
    "which image has X?" questions per train conversation of several images (`add_which_turns`); val and test
    ask none. exclude: `<split>.scenes.txt`
    files of another dataset whose scenes no split here may use (e.g. extra training data that must not show
    an image of an existing test split).

    sizes: per split, a total (divided by DEFAULT_MIX) or {"single": n, "multi": n, "video": n, "distractor": n}.
    Returns the paths of the JSONLs and of meta.json.
    """
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise InputError(f"unknown split(s) {', '.join(sorted(unknown))}; use {', '.join(SPLITS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output '{out}': exists and is not a directory")
    per_group = _select_tasks(tasks)
    groups = [g for g in GROUPS if per_group[g]]
    given = dict(train_mix or {})
    weights = {**DEFAULT_MIX, **given}  # the train split's; val and test keep DEFAULT_MIX
    bad = {g: w for g, w in given.items() if g not in GROUPS or not isinstance(w, (int, float)) or w < 0}
    if bad or sum(weights[g] for g in groups) <= 0:
        raise InputError(f"train mix {given!r}: give non-negative weights for groups {', '.join(GROUPS)} "
                         f"(e.g. video=0.3), not all zero")
    plan = {s: _split_counts(sizes[s], s, groups, weights if s == "train" else DEFAULT_MIX)
            for s in SPLITS if s in sizes}
    for split, counts in plan.items():  # validate everything before writing anything
        _validate(split, counts, distractors, image_size, video_frames, train_turns if split == "train" else 1,
                  train_progressive if split == "train" else 0.0, train_video_turns if split == "train" else 1,
                  train_which_turns if split == "train" else 0)
        for g, n in counts.items():
            if n and not per_group[g]:
                raise InputError(f"{n} {g} examples asked for in '{split}', but the task filter leaves no {g} task")
    seen: tuple[set[str], set[str]] = (set(), set())  # scene and layout hashes the next split must avoid
    for f in exclude:
        if not Path(f).is_file():
            raise InputError(f"exclude '{f}': no such file (give the <split>.scenes.txt of a generated dataset)")
        h, lay = read_scene_hashes(Path(f))
        seen[0].update(h)
        seen[1].update(lay)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:  # stale files of a split not generated now would mislead
        if split not in plan and (out / f"{split}.jsonl").exists():
            shutil.rmtree(out / split, ignore_errors=True)
            (out / f"{split}.jsonl").unlink()
            _hash_file(out, split).unlink(missing_ok=True)
    paths: dict[str, Path] = {}
    split_meta: dict[str, dict] = {}
    for split, c in plan.items():
        path, st = _write_split(out, split, c["single"], c["multi"], c["video"], c["distractor"], distractors, seed,
                                image_size, video_frames, fps, (set(seen[0]), set(seen[1])), tasks, progress,
                                train_turns if split == "train" else 1,
                                train_progressive if split == "train" else 0.0,
                                train_video_turns if split == "train" else 1,
                                train_which_turns if split == "train" else 0)
        h, lay = read_scene_hashes(_hash_file(out, split))
        seen[0].update(h)
        seen[1].update(lay)
        paths[split] = path
        split_meta[split] = st
    answers = sorted({a for st in split_meta.values() for a in st["answers"] if a != "<caption>"})
    caption_words = sorted({"a", "an", "and"} | set(COLOUR_NAMES) | set(KINDS))
    meta = {
        "format": "hyperowl-synth/1",
        "seed": seed,
        "image_size": image_size,
        "video_frames": video_frames,
        "fps": fps,
        "distractors": distractors,
        "train_turns": train_turns,
        "train_progressive": train_progressive,
        "train_video_turns": train_video_turns,
        "train_which_turns": train_which_turns,
        "train_mix": {g: weights[g] for g in GROUPS},
        **({"exclude": [str(f) for f in exclude]} if exclude else {}),
        "video_codec": video_codec(),
        "tasks": [t for g in per_group.values() for t in g],
        "splits": split_meta,
        "answer_vocab": answers,
        "answer_vocab_size": len(answers),
        "caption_words": caption_words,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out / "README.md").write_text(_DATASET_README.format(seed=seed, image_size=image_size,
                                                          video_frames=video_frames, fps=fps))
    paths["meta"] = out / "meta.json"
    return paths


def examples(out_dir: Union[str, Path], image_size: int = 64, fps: int = 4) -> list[Path]:
    """Write three example images, one example video and `examples.json` (questions with their answers)
    into out_dir, for a README quickstart. Returns the written media paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output '{out}': exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    s = image_size
    c = functools.partial(cell_centre, image_size=s)
    scenes = [
        Scene((Obj("circle", "red", "large", c(0), c(1)), Obj("square", "blue", "small", c(2), c(1))), "white", s),
        Scene((Obj("triangle", "green", "large", c(1), c(0)), Obj("cross", "orange", "small", c(0), c(2)),
               Obj("diamond", "purple", "small", c(2), c(2))), "stripes", s),
        Scene((Obj("circle", "yellow", "small", c(0), c(0)), Obj("circle", "blue", "large", c(2), c(2)),
               Obj("square", "red", "large", c(1), c(2))), "gray", s),
    ]
    qa = [
        ("Describe the image.", scenes[0].caption()),
        ("Is the green triangle above the purple diamond in the image?", "yes"),
        ("How many circles are there in the image?", "2"),
    ]
    written, records = [], []
    for i, (scene, (q, a)) in enumerate(zip(scenes, qa), 1):
        p = out / f"example_{i}.png"
        scene.render().save(p)
        written.append(p)
        records.append({"file": p.name, "question": q, "answer": a, "caption": scene.caption()})
    frames = 8
    start, end = c(0), c(GRID - 1)
    video = [Scene((Obj("square", "green", "small", c(1), c(0)),
                    Obj("circle", "red", "large", round(start + (end - start) * f / (frames - 1)), c(2))), "white", s)
             for f in range(frames)]
    p = out / "example_video.mp4"
    write_mp4([v.render() for v in video], p, fps=fps)
    written.append(p)
    records.append({"file": p.name, "question": "Which way does the red circle move?", "answer": "right"})
    (out / "examples.json").write_text(json.dumps(records, indent=1) + "\n")
    return written


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, our error type (the CLI prints it and exits 2)
        raise InputError(f"data synth: {message}")


def synth_main(argv: Optional[Sequence[str]] = None) -> int:
    """`hyperowl data synth`: write a train/val/test dataset (or `--examples` only) into --out."""
    p = _Parser(prog="hyperowl data synth", description="Generate the synthetic visual world dataset "
                "(images, .mp4 videos, JSONL conversations; train/val/test never share an image).")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=DEFAULT_SIZES["train"], metavar="N", help="training examples")
    p.add_argument("--val", type=int, default=DEFAULT_SIZES["val"], metavar="N")
    p.add_argument("--test", type=int, default=DEFAULT_SIZES["test"], metavar="N")
    p.add_argument("--image-size", type=int, default=64, metavar="PX")
    p.add_argument("--frames", type=int, default=8, help="frames per video")
    p.add_argument("--fps", type=int, default=4)
    p.add_argument("--distractors", type=int, default=3, help="irrelevant images around a distractor question")
    p.add_argument("--turns", type=int, default=1, metavar="K",
                   help="training conversations ask up to K questions about their images (val/test: 1)")
    p.add_argument("--progressive", type=float, default=0.0, metavar="P",
                   help="share of training multi-image conversations that show their images one per turn, each "
                        "with a question about it, before the conversation's question (val/test: never)")
    p.add_argument("--video-turns", type=int, default=1, metavar="K",
                   help="training video conversations ask up to K questions: the video's own, then questions about "
                        "its first or last frame (val/test: 1)")
    p.add_argument("--which-turns", type=int, default=0, metavar="K",
                   help="training conversations of several images (multi-image, distractor) also ask up to K "
                        "'which image has X?' questions about objects found in only one of them (val/test: 0)")
    p.add_argument("--train-mix", default=None, metavar="G=W,...",
                   help="weights of the groups in the train split, e.g. video=0.3 (others keep "
                        + ", ".join(f"{g}={w}" for g, w in DEFAULT_MIX.items()) + "); val/test keep the default")
    p.add_argument("--tasks", default=None, help="comma-separated task or group names to keep (default: all)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="SCENES",
                   help="<split>.scenes.txt files of another dataset whose images no split here may use (e.g. extra "
                        "training data beside an existing test split)")
    p.add_argument("--examples", action="store_true", help="only write a few example images and a video")
    args = p.parse_args(argv)
    if args.examples:
        for path in examples(args.out, image_size=args.image_size, fps=args.fps):
            logger.info("wrote %s", path)
        return 0
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    mix: dict[str, float] = {}
    for item in (args.train_mix or "").split(","):
        if item.strip():
            g, _, w = item.partition("=")
            try:
                mix[g.strip()] = float(w)
            except ValueError:
                raise InputError(f"--train-mix '{item}': expected GROUP=WEIGHT, e.g. video=0.3") from None
    paths = write_dataset(args.out, {"train": args.train, "val": args.val, "test": args.test}, seed=args.seed,
                          image_size=args.image_size, video_frames=args.frames, distractors=args.distractors,
                          fps=args.fps, tasks=tasks, train_turns=args.turns, train_progressive=args.progressive,
                          train_mix=mix, train_video_turns=args.video_turns, train_which_turns=args.which_turns,
                          exclude=args.exclude)
    logger.info("wrote %s", ", ".join(str(v) for v in paths.values()))
    return 0
