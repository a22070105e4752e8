"""Conversations: `Example` (one conversation, its scenes and messages) and how it is built and extended.

Design note: `build_example` turns one task's question into a prompt with its `<|image|>` / `<|video|>`
placeholders (multi-image and distractor prompts label each image, "Image 2: <|image|>"); a distractor
example is a single-image question about image k among shuffled random images. The `add_*` functions add
further turns to a built example (more questions about the same images, about a video's first/last frame,
"which image has X?", or one image per turn); each takes its own RNG, so the first question never depends on
them. `Example.messages` is the chat the JSONL stores.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from PIL import Image

from .rendering import DRAWN_RENDER_SIDE
from .questions import MULTI_TEMPLATES, SINGLE_TASKS, _multi, _single, _video, ask
from .world import FREE_TASKS, Scene, _Builder, phrase

IMAGE_TOKEN = "<|image|>"
VIDEO_TOKEN = "<|video|>"
# Single-image questions name their image through {img}: "the image" alone, "image 3" among distractors.
SINGLE_REFS = ("the image", "the picture")


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

    # Drawn scenes come at their source size, at most DRAWN_RENDER_SIDE (the writer reduces them to the model's).
    @functools.cached_property
    def images(self) -> list[Image.Image]:
        return [s.render(DRAWN_RENDER_SIDE) for s in self.scenes]

    @functools.cached_property
    def videos(self) -> list[list[Image.Image]]:
        # Static videos repeat scenes: render each distinct one once.
        cache: dict[str, Image.Image] = {}
        for s in {s.hash: s for v in self.video_scenes for s in v}.values():
            cache[s.hash] = s.render(DRAWN_RENDER_SIDE)
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


def _labelled(n: int, start: int = 0) -> str:
    return "".join(f"Image {i + 1}: {IMAGE_TOKEN}\n" for i in range(start, start + n))


def build_example(task: str, rng: random.Random, *, image_size: int = 64, video_frames: int = 8,
                  distractors: int = 3, id: str = "", drawn: bool = False) -> Example:
    """One example of `task` (a name from ALL_TASKS) drawn with `rng`. drawn: in the drawn look (`world`'s
    DRAWN_*: a random source size, free positions, continuous sizes, videos of 4 to 32 frames)."""
    group, sub = task.split("/", 1)
    free = drawn and group in ("single", "distractor") and sub in FREE_TASKS  # objects anywhere (world.FREE_TASKS)
    b = _Builder(rng, image_size, drawn, free)
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
