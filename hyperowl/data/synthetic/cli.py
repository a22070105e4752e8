"""The `hyperowl data synth` command line (called by `hyperowl.cli`): arguments in, `write_dataset` or `examples`.

Design note: argument handling only. Defaults come from `splits` (split sizes, the train mix); a bad argument
is an `InputError` with one line (the CLI prints it and exits 2), never argparse's usage-and-exit.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Optional, Sequence

from hyperowl.errors import InputError

from .splits import DEFAULT_MIX, DEFAULT_SIZES
from .writer import examples, write_dataset

# The package's logger (not this module's): log lines keep the name they had when this was one module.
logger = logging.getLogger(__package__)


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
    p.add_argument("--frames", type=int, default=8, help="frames per video (the plain look; drawn videos have 4-32)")
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
    p.add_argument("--drawn", type=float, nargs="?", const=1.0, default=0.0, metavar="P",
                   help="share of examples (every split; alone: 1 = all) in the drawn look (issue 31): anti-aliased or aliased, filled or outlined shapes of continuous "
                        "sizes and jittered colours anywhere in their third of the image, plain/gradient/textured/noisy "
                        "backgrounds, JPEG artefacts, sources of 48-1024 px reduced by the processor's resize, videos "
                        "of 4 to 32 frames")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes writing the examples (default: one per CPU core, at most 8); the files are the "
                        "same for any number")
    p.add_argument("--examples", action="store_true", help="only write a few example images and a video")
    args = p.parse_args(argv)
    if args.examples:
        for path in examples(args.out, image_size=args.image_size, fps=args.fps):
            logger.info("wrote %s", path)
        return 0
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers {args.workers}: give 1 or more processes")
    workers = args.workers or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
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
                          exclude=args.exclude, drawn=args.drawn, workers=workers)
    logger.info("wrote %s", ", ".join(str(v) for v in paths.values()))
    return 0
