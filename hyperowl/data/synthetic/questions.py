"""Questions: the task names, their templates, and question/answer pairs drawn from or for scenes.

Design note: two directions. `_single`, `_multi` and `_video` draw the answer first and then build scenes
(through `world._Builder`) that make it true, so answers are balanced by construction; each returns
(template, fields, answer, scenes). `ask` goes the other way: a question of a single-image task about an
existing scene, used for the extra turns of a conversation. In both, an object referred to by name is unique
in its scene, so every question has exactly one answer, and the answer never depends on the template.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Optional

from .world import (ALL_CELLS, CHANGES, COLOUR_NAMES, DIRECTIONS, FREE_TASKS, GRID, KINDS, MAX_OBJECTS, PLURALS,
                    POSITION_NAMES, RELATIONS, SIZES, DRAWN_VIDEO_FRAMES, Obj, Scene, _Builder, cell_centre, max_jitter, phrase)

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
    if not objs or (scene.free and task not in FREE_TASKS):  # answers by thirds: not about objects anywhere
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
    if b.look:  # drawn videos: 4 to 32 frames whatever `frames` (several lengths, so several speeds)
        frames = rng.choice(DRAWN_VIDEO_FRAMES)
    bg = b.background()
    if task == "direction":  # one object crosses the image along a row or column; others stay outside its lane
        direction = rng.choice(DIRECTIONS)
        colour, kind = b.pair()
        size = rng.choice(SIZES)
        lane = rng.randrange(GRID)
        horizontal = direction in ("left", "right")
        cells = [c for c in ALL_CELLS if (c[0] if horizontal else c[1]) != lane]
        static = b.fill([], rng.randint(0, 2), cells=cells, allow=lambda k, c: (c, k) != (colour, kind))
        if b.look:  # anywhere in its lane, a continuous size, travelling 35-100% of the free span: several speeds
            o = b.place(kind, colour, size, (lane, lane))
            d, across = o.d, o.x if horizontal else o.y
            lo, hi = d // 2 + 1, s - (d - d // 2) - 1
            length = round((hi - lo) * rng.uniform(0.35, 1.0))
            start = rng.randint(lo, hi - length)
            start, end = start, start + length
        else:
            d = 0
            j = max_jitter(size, s)
            across = cell_centre(lane, s) + rng.randint(-j, j)
            start, end = cell_centre(0, s), cell_centre(GRID - 1, s)
        if direction in ("left", "up"):
            start, end = end, start
        scenes = []
        for f in range(frames):
            along = round(start + (end - start) * f / (frames - 1))
            x, y = (along, across) if horizontal else (across, along)
            scenes.append(b.scene(static + [Obj(kind, colour, size, x, y, d)], bg))
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
