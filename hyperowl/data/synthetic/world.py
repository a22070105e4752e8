"""The world: what exists in it, and how random scenes of it are drawn.

Design note: everything else in `hyperowl.data.synthetic` is computed from the data defined here. The
vocabulary (kinds, colours, sizes, backgrounds, the 3x3 grid and its position names, the directions, changes
and relations questions can ask about), `Obj` and `Scene` (a scene is data: answers come from its objects,
never from pixels; its hash names an image exactly), the grid geometry (object diameters, cell centres, how
far an object may move inside its cell), and `_Builder`, which draws random scene pieces from one
`random.Random` per example. The order of the builder's RNG calls is part of the dataset's format: changing it
changes every generated example. This module imports no other module of the package at load time (it is the
bottom layer); `Scene.render` reaches up to `rendering.render` only when called.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping, Optional, Sequence

from PIL import Image

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
# The drawn look (`drawn=True`, issue 31: pictures as people draw them). Sizes are continuous, named relative to
# the image side with a gap between the names (at 64 px: small 6-11 px, large 14-20 px; the plain look's 11 and
# 18 px fall inside them); every object's box stays inside its third of the image in each direction, so objects
# never overlap and position and relation answers (by thirds) are never ambiguous. Sources are drawn at 48 to
# 1024 px (log-uniform) and reach a model through its processor's resize, as users' images do.
DRAWN_SIZE_FRACTION = {"small": (0.10, 0.17), "large": (0.22, 0.31)}
DRAWN_SOURCE_SIZES = (48, 1024)
DRAWN_BACKGROUNDS = ("plain", "gradient", "texture", "noise")
DRAWN_VIDEO_FRAMES = (4, 6, 8, 12, 16, 24, 32)  # a drawn video has one of these (`--frames` is the plain look's)
# Free layout (`Scene.free`): a drawn scene whose questions do not depend on where things are (the colour of a
# named shape, the shape of a named colour, a size, a count) places its objects anywhere, boxes inside the image
# and apart by FREE_GAP of the side, as people draw. Why: with every object inside its third, a tower learned
# to read a kind only at the places the grid puts objects (a linear probe on the tower: kind 0.61-0.72 on another
# renderer's objects kept inside their thirds, 0.36 anywhere). Position, relation and caption answers are by
# thirds, which an object anywhere may straddle: those questions are never asked about a free scene.
FREE_TASKS = ("colour", "shape", "size", "count", "count_all")
FREE_GAP = 0.04
FREE_TRIES = 200  # random places tried per object before a crowded scene keeps its thirds layout
# (row, col) -> canonical position name.
POSITION_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
DIRECTIONS = ("left", "right", "up", "down")
CHANGES = ("colour", "shape", "size", "position", "count")
RELATIONS = ("left of", "right of", "above", "below")


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
    d: int = 0  # diameter in pixels (the drawn look); 0: the size name's (`diameter`)

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
    # 0: the plain look (aliased solid shapes, `rendering.render`); else the seed of the drawn look (per-object
    # colour jitter, outline or fill, anti-aliasing, JPEG: `rendering.render_drawn`), shared by an example's scenes.
    look: int = 0
    free: bool = False  # objects anywhere (FREE_TASKS), not each inside its third

    def diameter(self, o: Obj) -> int:
        return o.d or diameter(o.size, self.image_size)

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
        # The drawn look's fields appear only when set: plain scenes keep the hashes they always had.
        return {
            "background": self.background,
            "bg_variant": self.bg_variant,
            "image_size": self.image_size,
            "objects": sorted([o.kind, o.colour, o.size, o.x, o.y] + ([o.d] if o.d else []) for o in self.objects),
            **({"look": self.look} if self.look else {}),
            **({"free": True} if self.free else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "Scene":
        return cls(tuple(Obj(*o) for o in d["objects"]), d["background"], d["image_size"], d["bg_variant"],
                   d.get("look", 0), d.get("free", False))

    def scaled(self, size: int) -> "Scene":
        """The scene on a `size` canvas (centres and diameters scaled): where its objects land in a model's input
        after the processor's resize (the per-patch labels of a drawn scene are computed on it)."""
        if size == self.image_size:
            return self
        f = size / self.image_size
        objs = tuple(replace(o, x=round((o.x + 0.5) * f - 0.5), y=round((o.y + 0.5) * f - 0.5),
                             d=max(1, round(self.diameter(o) * f)))
                     for o in self.objects)
        return replace(self, objects=objs, image_size=size)

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

    def render(self, max_side: Optional[int] = None) -> Image.Image:
        """The scene's image; a drawn scene larger than `max_side` is drawn at `max_side` (see `render_drawn`)."""
        # Imported here, not at the top: rendering sits above the world (rendering.py imports this module).
        from .rendering import render, render_drawn

        return render_drawn(self, max_side) if self.look else render(self)


def diameter(size: str, image_size: int) -> int:
    return max(3, round(SIZE_FRACTION[size] * image_size))


def cell_centre(index: int, image_size: int) -> int:
    return round((index + 0.5) * image_size / GRID)


def max_jitter(size: str, image_size: int) -> int:
    """Largest centre offset such that objects in neighbouring cells never overlap and stay in the image
    (cell centres are rounded, hence the extra pixel): +-1 px large, +-4 px small at 64x64."""
    return max(0, int((image_size / GRID - diameter(size, image_size) - 1) / 2))


# ----------------------------------------------------------------------------------------------------------
# Scene construction (all randomness goes through one random.Random per example)
# ----------------------------------------------------------------------------------------------------------

Cell = tuple[int, int]  # (row, col)
ALL_CELLS: tuple[Cell, ...] = tuple((r, c) for r in range(GRID) for c in range(GRID))


class _Builder:
    """Random scene pieces for one example."""

    def __init__(self, rng: random.Random, image_size: int, drawn: bool = False, free: bool = False) -> None:
        self.rng = rng
        self.s = image_size
        self.look = 0
        self.free = free  # a drawn example of FREE_TASKS: `scene` lays its objects out anywhere
        if drawn:  # one source size and one look per example (so "are the two images the same?" stays exact)
            lo, hi = DRAWN_SOURCE_SIZES
            self.s = 2 * round(math.exp(rng.uniform(math.log(lo), math.log(hi))) / 2)
            self.look = rng.randrange(1, 2**31)

    def place(self, kind: str, colour: str, size: str, cell: Cell) -> Obj:
        if self.look:
            return self._place_drawn(kind, colour, size, cell)
        j = max_jitter(size, self.s)
        r, c = cell
        return Obj(kind, colour, size, cell_centre(c, self.s) + self.rng.randint(-j, j),
                   cell_centre(r, self.s) + self.rng.randint(-j, j))

    def _place_drawn(self, kind: str, colour: str, size: str, cell: Cell) -> Obj:
        """A continuous size of the name, the centre anywhere such that the box stays inside the cell."""
        lo, hi = DRAWN_SIZE_FRACTION[size]
        d = max(3, round(self.rng.uniform(lo, hi) * self.s))
        xy = []
        for index in (cell[1], cell[0]):
            a, b = index * self.s / GRID, (index + 1) * self.s / GRID  # the cell's span on this axis
            first, last = math.ceil(a) + d // 2 + 1, math.floor(b) - (d - d // 2) - 1  # box x - d//2 .. x - d//2 + d - 1
            xy.append(self.rng.randint(first, last) if last >= first else round((a + b) / 2))
        return Obj(kind, colour, size, xy[0], xy[1], d)

    def background(self) -> tuple[str, int]:
        if self.look:
            return self.rng.choice(DRAWN_BACKGROUNDS), self.rng.randrange(2**31)
        bg = self.rng.choice(BACKGROUNDS)
        return bg, self.rng.randrange(BG_VARIANTS[bg])

    def scene(self, objs: Iterable[Obj], bg: Optional[tuple[str, int]] = None) -> Scene:
        objs = tuple(objs)
        free = self.free and self.look != 0
        if free:
            placed = self._layout_free(objs)
            free = placed is not None  # crowded (rare): the objects stay inside their thirds
            objs = placed or objs
        bg = bg or self.background()
        return Scene(objs, bg[0], self.s, bg[1], self.look, free)

    def _layout_free(self, objs: tuple[Obj, ...]) -> Optional[tuple[Obj, ...]]:
        """The objects (kind, colour, size and diameter kept) at random places anywhere in the image, boxes
        inside it and apart by FREE_GAP of the side; None if one does not fit in FREE_TRIES tries."""
        s, gap, out = self.s, FREE_GAP * self.s, []
        for o in objs:
            d = o.d or diameter(o.size, s)
            lo, hi = d // 2 + 1, s - (d - d // 2) - 1  # box x - d//2 .. x - d//2 + d - 1, a pixel from the edge
            if hi < lo:
                return None
            for _ in range(FREE_TRIES):
                x, y = self.rng.randint(lo, hi), self.rng.randint(lo, hi)
                if all(abs(x - p.x) > (d + p.d) / 2 + gap or abs(y - p.y) > (d + p.d) / 2 + gap for p in out):
                    out.append(replace(o, x=x, y=y, d=d))
                    break
            else:
                return None
        return tuple(out)

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


def random_scene(rng: random.Random, image_size: int = 64, drawn: bool = False, free: bool = False) -> Scene:
    """A scene of 1..MAX_OBJECTS random objects (unique colour+kind pairs) on a random background. drawn: the
    drawn look, at a random source size (`image_size` is then ignored; see DRAWN_SOURCE_SIZES); free: a drawn
    scene's objects anywhere (`Scene.free`)."""
    b = _Builder(rng, image_size, drawn, free)
    return b.scene(b.random_objects())
