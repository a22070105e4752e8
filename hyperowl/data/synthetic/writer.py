"""Files: a dataset on disk (JSONL, PNG, mp4, scene hashes, meta.json, README.md) and the README examples.

Design note: `_write_split` writes the examples of `splits._iter` one by one (media first, then the JSONL
record; the JSONL is renamed into place at the end, so a half-written split has no `<split>.jsonl`), and
records the scene hashes of every image and frame in `<split>.scenes.txt`; `write_dataset` plans and
validates all splits before writing any, then writes them in order train, val, test so that each avoids the
scenes of the ones before it (and of any `exclude` files). Videos are encoded by `write_mp4` (x264 lossless,
single-threaded, so the bytes are the same every run; MPEG-4 when this PyAV has no x264).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image

from hyperowl.errors import InputError

from .questions import GROUPS
from .splits import DEFAULT_MIX, DEFAULT_SIZES, SPLITS, _iter, _select_tasks, _split_counts, _Stats, _validate
from .world import COLOUR_NAMES, FREE_TASKS, GRID, KINDS, Obj, Scene, cell_centre

# The package's logger (not this module's): log lines keep the name they had when this was one module.
logger = logging.getLogger(__package__)


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


def _to_size(im: Image.Image, size: int) -> Image.Image:
    """A drawn scene's source image (48-1024 px) as a model of input `size` receives it: the processor's own resize
    (`processing.images.image_to_tensor`: PIL bicubic), done once here so that the files stay small; the
    processor's resize of a `size` px image is then the identity, so training sees exactly these pixels."""
    return im if im.size == (size, size) else im.resize((size, size), Image.Resampling.BICUBIC)


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


_CHUNK = 500  # examples per piece of work when a split is written by several processes
_worker_state: dict = {}


def _init_worker(args: tuple, exclude: set[str]) -> None:
    _worker_state["args"], _worker_state["exclude"] = args, exclude


def _write_chunk(indices: range) -> tuple[list[tuple[str, dict]], int]:
    """Build and write examples `indices` of a split (media files, then their JSONL lines and bookkeeping, in
    order); returns them with the number of redrawn scenes. Runs in the writing process or in a worker."""
    (split, n_single, n_multi, n_video, n_distractor, distractors, seed, image_size, video_frames, tasks, turns,
     progressive, video_turns, which_turns, drawn, out, fps) = _worker_state["args"]
    out = Path(out)
    stats = _Stats()
    rows = []
    for ex in _iter(split, n_single, n_multi, n_video, n_distractor, distractors, seed, image_size, video_frames,
                    _worker_state["exclude"], tasks, stats, turns, progressive, video_turns, which_turns, drawn,
                    indices):
        stem = ex.id.split("-", 1)[1]
        images, videos = [], []
        for j, im in enumerate(ex.images):
            rel = f"{split}/images/{stem}_{j}.png"
            _to_size(im, image_size).save(out / rel, compress_level=1)  # fast; the images are tiny anyway
            images.append(rel)
        for j, frames in enumerate(ex.videos):
            rel = f"{split}/videos/{stem}" + (f"_{j}" if j else "") + ".mp4"
            write_mp4([_to_size(im, image_size) for im in frames], out / rel, fps=fps)
            videos.append(rel)
        record = {"id": ex.id, "task": ex.task, "messages": ex.messages, "images": images, "videos": videos,
                  "answer": ex.answer}
        is_drawn = any(s.look for s in ex.all_scenes())
        if drawn:  # `hyperowl eval` reports accuracy per look (its breakdown); plain datasets stay as they were
            record["look"] = "drawn" if is_drawn else "plain"
        info = {"hashes": [(s.hash, s.layout_hash) for s in ex.all_scenes()], "task": ex.task,
                "extra": len(ex.extra), "which": sum(t == "which" for t, _, _ in ex.extra), "intro": bool(ex.intro),
                "drawn": bool(drawn) and is_drawn, "prompt_chars": len(ex.prompt),
                "answer": ex.answer if not ex.task.endswith("/caption") else "<caption>"}
        rows.append((json.dumps(record, ensure_ascii=False), info))
        del ex.images, ex.videos  # free the rendered pixels
    return rows, stats.rejected


def _write_split(out_dir: Union[str, Path], split: str, n_single: int, n_multi: int, n_video: int, n_distractor: int,
                 distractors: int, seed: int, image_size: int, video_frames: int, fps: int,
                 exclude: Optional[tuple[set[str], set[str]]], tasks: Optional[Sequence[str]],
                 progress: Optional[bool], turns: int = 1, progressive: float = 0.0,
                 video_turns: int = 1, which_turns: int = 0, drawn: float = 0.0,
                 workers: int = 1) -> tuple[Path, dict]:
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
    _prepare_split_dir(out, split)
    stats = _Stats()
    hashes: dict[str, str] = {}  # scene hash -> layout hash
    tasks_count: Counter = Counter()
    answers: Counter = Counter()
    prompt_chars: list[int] = []
    total = sum(counts.values())
    jsonl = out / f"{split}.jsonl"
    tmp = jsonl.with_suffix(".jsonl.tmp")
    args = (split, n_single, n_multi, n_video, n_distractor, distractors, seed, image_size, video_frames, tasks,
            turns, progressive, video_turns, which_turns, drawn, str(out), fps)
    _iter(split, n_single, n_multi, n_video, n_distractor, distractors, seed, image_size, video_frames, exclude[0],
          tasks, stats, turns, progressive, video_turns, which_turns, drawn, range(0))  # validate before any work
    extra_turns = intro_conversations = which_turns_n = drawn_n = 0
    workers = max(1, min(int(workers), -(-total // _CHUNK)))
    chunks = [range(a, min(a + _CHUNK, total)) for a in range(0, total, _CHUNK)]
    pool = None
    if workers > 1:  # the same bytes as one process: each example depends on its index alone, pieces kept in order
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (args, exclude[0]))
        pieces = pool.imap(_write_chunk, chunks)
    else:
        _init_worker(args, exclude[0])
        pieces = map(_write_chunk, chunks)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            bar = tqdm(total=total, desc=f"synth {split}", unit="ex", file=sys.stderr,
                       disable=None if progress is None else not progress)  # None: shown on a terminal
            for rows, rejected in pieces:
                stats.rejected += rejected
                for line, info in rows:
                    f.write(line + "\n")
                    hashes.update(info["hashes"])
                    tasks_count[info["task"]] += 1
                    extra_turns += info["extra"]
                    which_turns_n += info["which"]
                    intro_conversations += info["intro"]
                    drawn_n += info["drawn"]
                    answers[info["answer"]] += 1
                    prompt_chars.append(info["prompt_chars"])
                bar.update(len(rows))
            bar.close()
    finally:
        if pool is not None:
            pool.terminate()
    tmp.replace(jsonl)
    _hash_file(out, split).write_text("".join(f"{h}\t{lay}\n" for h, lay in sorted(hashes.items())))
    layouts = set(hashes.values())
    stats_out = {
        "file": jsonl.name,
        "examples": total,
        "extra_turns": extra_turns,
        **({"drawn": drawn_n} if drawn else {}),
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
                   progressive: float = 0.0, video_turns: int = 1, which_turns: int = 0, drawn: float = 0.0) -> Path:
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
                           video_frames, fps, exclude, tasks, progress, turns, progressive, video_turns, which_turns,
                           drawn)
    return path


_DATASET_README = """# Synthetic visual world (hyperowl.data.synthetic)

Generated by `hyperowl data synth` (seed {seed}, {image_size}x{image_size} images, {video_frames}-frame videos
at {fps} fps).
Files: `<split>.jsonl` (one conversation per line), `<split>/images/*.png`, `<split>/videos/*.mp4`,
`<split>.scenes.txt` (hashes of every scene used; splits never share one), `meta.json` (counts, answer
vocabulary). Media paths in the JSONL are relative to this folder. Record format:

    {{"id", "task", "messages": [user with <|image|>/<|video|> placeholders, assistant answer],
      "images": [...], "videos": [...], "answer"}}

Answers are canonical and exactly matchable; score with exact string match. Read videos with all their
frames (max_frames >= {video_frames}). The docstring of `hyperowl/data/synthetic/__init__.py` lists the tasks.
"""


def write_dataset(out_dir: Union[str, Path], sizes: Mapping[str, Union[int, Mapping[str, int]]] = DEFAULT_SIZES,
                  seed: int = 0, *, image_size: int = 64, video_frames: int = 8, distractors: int = 3, fps: int = 4,
                  tasks: Optional[Sequence[str]] = None, progress: Optional[bool] = None,
                  train_turns: int = 1, train_progressive: float = 0.0,
                  train_mix: Optional[Mapping[str, float]] = None, train_video_turns: int = 1,
                  train_which_turns: int = 0,
                  exclude: Sequence[Union[str, Path]] = (), drawn: float = 0.0, workers: int = 1) -> dict[str, Path]:
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
    an image of an existing test split). drawn: the share of every split's examples (0 to 1) in the drawn look
    (`build_example`; images are drawn at 48-1024 px and reduced to `image_size` by the processor's resize; videos
    have 4 to 32 frames); their records carry `"look": "drawn"`. workers: processes that build and write a split's
    examples in pieces of 500 (the files are byte-identical for any number).

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
    if not isinstance(drawn, (int, float)) or not 0 <= drawn <= 1:
        raise InputError(f"drawn={drawn!r}: the share of examples in the drawn look must be from 0 to 1")
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
                                train_which_turns if split == "train" else 0, drawn, workers)
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
        # free_tasks: which drawn questions lay their objects out anywhere (world.FREE_TASKS); absent in drawn
        # datasets written before the free layout existed (all in thirds)
        **({"drawn": float(drawn), "free_tasks": list(FREE_TASKS)} if drawn else {}),
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
