"""Splits in memory: which tasks a split asks, in which order, with which seeds, and the checks on its options.

Design note: a split's task order is a round-robin over the chosen tasks of each group (balanced tasks),
shuffled by a seed of its own. Example i is built from its own RNG, seeded by sha256(seed, split, i, attempt),
so an example does not change when other counts change; an example that uses a scene hash of an earlier
split is redrawn with the next attempt. The extra turns use further per-example seeds. `iter_examples` yields
the examples without writing files; `writer` writes the same examples to disk.
"""

from __future__ import annotations

import hashlib
import random
from typing import Iterator, Mapping, Optional, Sequence, Union

from hyperowl.errors import InputError

from .conversations import Example, add_intro, add_turns, add_video_turns, add_which_turns, build_example
from .questions import ALL_TASKS, GROUPS, SINGLE_TASKS

SPLITS = ("train", "val", "test")  # in this order: a split never uses a scene of the ones before it
# Share of each group when a split size is one number.
DEFAULT_MIX = {"single": 0.4, "multi": 0.2, "video": 0.2, "distractor": 0.2}
DEFAULT_SIZES = {"train": 20000, "val": 1000, "test": 1000}
MAX_ATTEMPTS = 200  # redraws of one example before giving up (its scenes kept hitting earlier splits')


def _seed_for(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, ("hyperowl-synth",) + parts)).encode()).digest()[:8], "big")


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
          which_turns: int = 0, drawn: float = 0.0, indices: Optional[range] = None) -> Iterator[Example]:
    """Validate now (not at the first next()), then return the generator. indices: only these examples of the
    split (each example's content depends on its index alone, so a split can be written in parallel pieces)."""
    counts = {"single": n_single, "multi": n_multi, "video": n_video, "distractor": n_distractor}
    _validate(split, counts, distractors, image_size, video_frames, turns, progressive, video_turns, which_turns)
    if not isinstance(drawn, (int, float)) or not 0 <= drawn <= 1:
        raise InputError(f"drawn={drawn!r}: the share of examples in the drawn look must be from 0 to 1")
    per_group = _select_tasks(tasks)
    order: list[str] = []
    for g, n in counts.items():
        if n and not per_group[g]:
            raise InputError(f"{n} {g} examples asked for, but the task filter leaves no {g} task")
        order += [per_group[g][j % len(per_group[g])] for j in range(n)]  # round-robin: balanced tasks
    random.Random(_seed_for(seed, split, "order")).shuffle(order)
    return _generate(split, order, distractors, seed, image_size, video_frames, exclude, stats, turns, progressive,
                     video_turns, which_turns, drawn, indices)


def _generate(split: str, order: list[str], distractors: int, seed: int, image_size: int, video_frames: int,
              exclude: Optional[set[str]], stats: _Stats, turns: int = 1,
              progressive: float = 0.0, video_turns: int = 1, which_turns: int = 0,
              drawn: float = 0.0, indices: Optional[range] = None) -> Iterator[Example]:
    for i in range(len(order)) if indices is None else indices:
        task = order[i]
        # Which look (a share `drawn` of the examples, from a seed of its own: drawn=0 draws what it always drew).
        look = drawn >= 1 or (drawn > 0 and random.Random(_seed_for(seed, split, i, "look")).random() < drawn)
        for attempt in range(MAX_ATTEMPTS):
            # The drawn look has seeds of its own: its examples are not the plain ones redrawn.
            rng = random.Random(_seed_for(seed, split, i, attempt, *(("drawn",) if look else ())))
            ex = build_example(task, rng, image_size=image_size, video_frames=video_frames, distractors=distractors,
                               id=f"{split}-{i:06d}", drawn=look)
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
                  progressive: float = 0.0, video_turns: int = 1, which_turns: int = 0,
                  drawn: float = 0.0) -> Iterator[Example]:
    """The examples of a split in memory (same content as `generate_split` writes), without files.

    `ex.images` / `ex.videos` render lazily to PIL images / frame lists; `ex.scenes` / `ex.video_scenes`
    hold the data. `exclude_hashes`: scene hashes to avoid (an earlier split's). `tasks`: keep only these
    task or group names. `turns`: questions per image conversation (see `add_turns`). `progressive`: share of
    multi-image conversations shown one image per turn (see `add_intro`). `video_turns`: questions per video
    conversation (see `add_video_turns`). `which_turns`: further "which image has X?" questions per conversation
    of several images (see `add_which_turns`). `drawn`: the share of examples (0 to 1; True = all) in the drawn look
    (`build_example`); their images come at their source sizes (the writer reduces them to `image_size`).
    """
    return _iter(split, n_single, n_multi, n_video, n_distractor, distractors, seed, image_size, video_frames,
                 exclude_hashes, tasks, _Stats(), turns, progressive, video_turns, which_turns, drawn)


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
