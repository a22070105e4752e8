"""`hyperowl eval --task T`: one entry point over every task (what the CLI calls).

Design note: `prepare` reads and validates the data (and generates synthetic sets) before any model is
loaded, so a bad file fails in a second; `run` then evaluates. Both return plain dicts; the CLI prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..data.tables import exists, is_hub_id
from ..errors import InputError
from . import distractor as dis
from . import tasks as tk
from .runner import check_scoring, evaluate, exact_samples, load_records, run_samples
from .synthetic_tasks import GROUP_OF, SYNTHETIC_TASKS, synthetic_conversations, synthetic_distractor_set

FILE_TASKS = ("exact", "mmbench", "vqa", "multi-image", "video-mc", "distractor")
TASKS = FILE_TASKS + SYNTHETIC_TASKS
SYNTHETIC_DEFAULT_N = 100
# tasks whose questions have options, which `--scoring likelihood` can score (multi-image: its multiple-choice rows)
MC_TASKS = ("mmbench", "multi-image", "video-mc", "distractor", "synthetic-distractor")


def check_scoring_for(task: str, scoring: str, style: str = "mc") -> None:
    """A one-line error for a scoring method the task cannot use (before any model loads)."""
    check_scoring(scoring)
    if scoring != "generation" and task not in MC_TASKS:
        raise InputError(f"--scoring {scoring} is for multiple-choice tasks ({', '.join(MC_TASKS)}); --task {task} "
                         "has no options to score: drop --scoring")
    if scoring == "likelihood" and style == "open":
        raise InputError("--scoring likelihood scores the option letters, which --prompt-style open does not show; "
                         "use --scoring likelihood-text")


@dataclass
class Plan:
    task: str
    data: Optional[Path]
    samples: list = field(default_factory=list)  # Sample list (file tasks)
    items: list = field(default_factory=list)  # MCItem list (distractor)
    pool: list = field(default_factory=list)
    counts: list = field(default_factory=list)

    @property
    def offline(self) -> bool:
        """Every sample carries its answers (a prediction file): scoring needs no model."""
        return bool(self.samples) and all(s.predictions is not None for s in self.samples)


def prepare(task: str, data: Optional[str], out: str | Path, *, limit: Optional[int] = None, frames: int = 16,
            distractors: str = "0,5,10", pool: Optional[str] = None, seed: int = 0,
            cache_dir: Optional[str] = None, circular: bool = True,
            annotations: Optional[str] = None, image_dir: Optional[str] = None,
            video_dir: Optional[str] = None) -> Plan:
    if task not in TASKS:
        raise InputError(f"--task '{task}': choose one of {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit}: must be at least 1")
    if task in SYNTHETIC_TASKS:
        if data:
            raise InputError(f"--task {task} generates its own data; drop --data (or use --task exact on a file)")
        n = limit or SYNTHETIC_DEFAULT_N
        cache = Path(cache_dir) if cache_dir else Path(out) / "synthetic-data"
        if task in GROUP_OF:
            path = synthetic_conversations(task, cache, n, seed)
            return Plan(task, path, samples=exact_samples(load_records(path)))
        counts = dis.parse_counts(distractors)
        mc, pool_dir = synthetic_distractor_set(cache, n, max(20, 2 * max(counts)), seed)
        return Plan(task, mc, items=tk.load_mc_items(mc), pool=dis.load_pool(pool_dir), counts=counts)
    if not data:
        raise InputError(f"--task {task} needs --data FILE (or use a built-in set: {', '.join(SYNTHETIC_TASKS)})")
    path = Path(data)
    if not exists(data):
        raise InputError(f"--data '{data}': no such file")
    if (annotations or image_dir) and task != "vqa":
        raise InputError("--annotations and --image-dir are for --task vqa")
    if video_dir and task != "video-mc":
        raise InputError("--video-dir is for --task video-mc")
    if task == "distractor":
        if not pool:
            raise InputError("--task distractor needs --pool (a folder of images or a JSONL of {\"image\": path})")
        counts = dis.parse_counts(distractors)
        return Plan(task, path, items=tk.load_mc_items(path)[:limit], pool=dis.load_pool(pool), counts=counts)
    if task == "exact":
        return Plan(task, path, samples=exact_samples(load_records(path)[:limit]))
    if task == "mmbench":
        samples = tk.mmbench_samples(path, circular=circular)
    elif task == "vqa":
        samples = tk.vqa_samples(path, annotations, image_dir)
    elif task == "multi-image":
        samples = tk.multi_image_samples(path)
    else:
        if frames < 1:
            raise InputError(f"--frames {frames}: must be at least 1")
        samples = tk.video_mc_samples(data if is_hub_id(data) else path, max_frames=frames, video_dir=video_dir)
    return Plan(task, path, samples=samples[:limit])


def run(model, plan: Plan, out: str | Path, *, batch_size: int = 8, max_new_tokens: int = 16, seed: int = 0,
        variants: int = dis.VARIANTS, style: str = "mc", scoring: str = "generation") -> dict[str, Any]:
    """scoring: one of runner.SCORINGS (likelihood methods: multiple-choice tasks only, see runner.py)."""
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    check_scoring_for(plan.task, scoring, style)
    if plan.items:
        return dis.run_distractor(model, plan.items, plan.pool, plan.counts, out, seed=seed, variants=variants,
                                  style=style, batch_size=batch_size, max_new_tokens=max_new_tokens, data=str(plan.data),
                                  scoring=scoring)
    if plan.task == "exact":  # keeps the exact task's summary format (with "tasks")
        return evaluate(model, plan.data, out, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        limit=len(plan.samples))
    return run_samples(model, plan.samples, out, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       desc=plan.task, meta={"task": plan.task, "data": str(plan.data)}, groups=plan.task != "vqa",
                       scoring=scoring)
