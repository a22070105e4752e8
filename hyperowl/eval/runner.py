"""Exact-match evaluation of conversation JSONL files (the training format with a reference answer).

Design note: each record's last assistant message (or its "answer" field) is the reference; the model
answers the conversation before it, greedily, in padded batches. Predictions are appended to
`out/predictions.jsonl` as they come, so an interrupted run resumes where it stopped (records whose id is
already there are skipped). `out/summary.json` holds accuracy per task group ("single/colour" -> "single")
and per task.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..chat import chat_batch
from ..errors import InputError

log = logging.getLogger(__name__)


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".")


def load_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise InputError(f"eval data '{path}': no such file")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            msgs = rec["messages"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}:{n}: not a JSON object with 'messages'") from None
        answer = rec.get("answer")
        if msgs and msgs[-1].get("role") == "assistant":
            answer = answer if answer is not None else msgs[-1]["content"]
            msgs = msgs[:-1]
        if answer is None:
            raise InputError(f"{path}:{n}: no reference answer (an 'answer' field or a final assistant message)")
        root = path.parent
        media = {k: [p if Path(p).is_absolute() else str(root / p) for p in rec.get(k) or []] for k in ("images", "videos")}
        out.append({"id": str(rec.get("id", n)), "task": rec.get("task", "default"), "messages": msgs,
                    "answer": str(answer), **media})
    return out


def evaluate(model, data: str | Path, out_dir: str | Path, limit: int | None = None, batch_size: int = 8,
             max_new_tokens: int = 16) -> dict[str, Any]:
    data, out = Path(data), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(data)[:limit]
    pred_file = out / "predictions.jsonl"
    done = {}
    if pred_file.exists():
        for line in pred_file.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["id"]] = r
    todo = [r for r in records if r["id"] not in done]
    with pred_file.open("a") as f, tqdm(total=len(records), initial=len(records) - len(todo), desc="eval") as bar:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            preds = chat_batch(model, model.processor, chunk, max_new_tokens=max_new_tokens)
            for rec, pred in zip(chunk, preds):
                row = {"id": rec["id"], "task": rec["task"], "prediction": pred, "answer": rec["answer"],
                       "correct": normalize(pred) == normalize(rec["answer"])}
                f.write(json.dumps(row) + "\n")
                done[rec["id"]] = row
            f.flush()
            bar.update(len(chunk))
    rows = [done[r["id"]] for r in records]
    by_task, by_group = defaultdict(list), defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r["correct"])
        by_group[r["task"].split("/")[0]].append(r["correct"])
    acc = lambda xs: sum(xs) / len(xs)
    summary = {"data": str(data), "n": len(rows), "accuracy": acc([r["correct"] for r in rows]),
               "groups": {k: {"n": len(v), "accuracy": acc(v)} for k, v in sorted(by_group.items())},
               "tasks": {k: {"n": len(v), "accuracy": acc(v)} for k, v in sorted(by_task.items())}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
