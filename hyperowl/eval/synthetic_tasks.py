"""Built-in offline test sets from the synthetic visual world (`hyperowl.data.synthetic`).

Design note: `synthetic-single|multi|video` write a seeded test split of that group (exact-match
conversations, scored like `--task exact`); `synthetic-distractor` turns single-image questions into
multiple choice (the right answer plus up to three other values of its closed vocabulary, seeded) and
writes a pool of unrelated images for the distractor protocol. Sets are cached in
`<cache>/<task>-n<N>-seed<S>/` and reused (a `done.json` marks a complete set).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from ..data import synthetic as syn

log = logging.getLogger(__name__)

GROUP_OF = {"synthetic-single": "single", "synthetic-multi": "multi", "synthetic-video": "video"}
SYNTHETIC_TASKS = tuple(GROUP_OF) + ("synthetic-distractor",)
MC_TASKS = ("single/colour", "single/shape", "single/size", "single/position", "single/count", "single/count_all",
            "single/relation")
VOCAB = {
    "colour": list(syn.COLOUR_NAMES), "shape": list(syn.KINDS), "size": list(syn.SIZES),
    "position": list(syn.POSITION_NAMES.values()), "count": ["1", "2", "3", "4"], "count_all": ["1", "2", "3", "4"],
    "relation": ["yes", "no"],
}


def _cached(d: Path, key: dict) -> bool:
    f = d / "done.json"
    return f.exists() and json.loads(f.read_text()) == key


def synthetic_conversations(task: str, cache: str | Path, n: int, seed: int = 0) -> Path:
    """The test JSONL of `task` (synthetic-single|multi|video) with n examples; generated once."""
    group = GROUP_OF[task]
    d = Path(cache) / f"{task}-n{n}-seed{seed}"
    key = {"task": task, "n": n, "seed": seed}
    if not _cached(d, key):
        counts = {"n_single": 0, "n_multi": 0, "n_video": 0, **{f"n_{group}": n}}
        syn.generate_split(d, "test", seed=seed, progress=False, **counts)
        (d / "done.json").write_text(json.dumps(key))
        log.info("wrote the %s test set (%d examples) to %s", task, n, d)
    return d / "test.jsonl"


def synthetic_distractor_set(cache: str | Path, n: int, pool_size: int, seed: int = 0) -> tuple[Path, Path]:
    """(multiple-choice JSONL, pool folder) for the distractor protocol; generated once."""
    d = Path(cache) / f"synthetic-distractor-n{n}-pool{pool_size}-seed{seed}"
    key = {"task": "synthetic-distractor", "n": n, "pool": pool_size, "seed": seed}
    if not _cached(d, key):
        (d / "images").mkdir(parents=True, exist_ok=True)
        (d / "pool").mkdir(exist_ok=True)
        rows = []
        for ex in syn.iter_examples("test", n_single=n, seed=seed, tasks=list(MC_TASKS)):
            sub = ex.task.split("/")[1]
            rng = random.Random(f"{seed}/{ex.id}/options")
            others = [v for v in VOCAB[sub] if v != ex.answer]
            options = [ex.answer] + rng.sample(others, min(3, len(others)))
            rng.shuffle(options)
            name = f"images/{ex.id}.png"
            ex.images[0].save(d / name)
            rows.append({"id": ex.id, "category": ex.task, "image": name,
                         "question": ex.prompt.replace(syn.IMAGE_TOKEN, "").strip(), "options": options,
                         "answer": options.index(ex.answer)})
        (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for ex in syn.iter_examples("val", n_single=pool_size, seed=seed, tasks=["single/caption"]):
            ex.images[0].save(d / "pool" / f"{ex.id}.png")
        (d / "done.json").write_text(json.dumps(key))
        log.info("wrote the synthetic distractor set (%d questions, %d pool images) to %s", n, pool_size, d)
    return d / "mc.jsonl", d / "pool"
