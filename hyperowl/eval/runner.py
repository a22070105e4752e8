"""The evaluation loop shared by every task, and exact-match evaluation of conversation JSONL files.

Design note: a task turns its data into `Sample`s. A sample has an id, a category, a reference answer (only
written to the predictions), a `build()` that returns the conversations to ask (one for a plain question,
k for a circularly evaluated multiple-choice question; media are loaded only then, so a large benchmark is
never held in memory) and a `score(outputs)` that turns the model's answers into `{"score", "correct",
...}`. `run_samples` asks the questions greedily in padded batches of about `batch_size` conversations (a
sample that carries its answers, from a prediction file, is only scored) and appends one row per sample to
`out/predictions.jsonl` as they come, so an interrupted run resumes where it stopped (samples whose id is
already there are skipped; a row on disk is trusted). `out/summary.json` holds the mean score overall, per
category, per group (the category up to its first "/") and, where rows have them, per `BREAKDOWN_FIELDS`
value (`breakdown`).

Data parallel: under torchrun (WORLD_SIZE > 1) rank r evaluates samples r::world into
`predictions.rank<r>.jsonl`; after a barrier (gloo, so it works on CPU) rank 0 merges them into
`predictions.jsonl` (in sample order) and writes the summary; every rank returns the same summary.

Likelihood scoring (`scoring`, `hyperowl eval --scoring`): a multiple-choice sample carries the options of each
of its conversations (`Sample.choices`, in the order the prompt shows them). Instead of generating an answer and
parsing it, the model's log probability (`chat.score_batch`: log_softmax of the raw logits, the definition the
server's logprobs use) of each option as the answer is computed and the best one is taken: "likelihood" scores
the option's letter at the answer position (one forward per conversation, the letter being one token), and
"likelihood-text" the option's own text as the answer (mean logprob per token, so long options are not
penalised for their length; the prompt is prefilled once and its K/V shared by the options). The answer is
then the chosen option's letter, scored by the sample's own scorer (so circular evaluation works unchanged),
and the row keeps the per-conversation option scores (`option_scores`). Samples without options (yes/no,
exact match) are generated as usual (their row says `"scoring": "generation"`).

Exact match (the `exact` task): each record's last assistant message (or its "answer" field) is the
reference, compared after `normalize`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from ..chat import chat_batch
from ..data.tables import exists, iter_rows
from ..errors import InputError

log = logging.getLogger(__name__)


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".")


@dataclass
class Sample:
    """One scored unit of a benchmark (see the module note)."""

    id: str
    category: str
    answer: Any
    build: Callable[[], list[dict]]
    score: Callable[[list[str]], dict]
    extra: dict = field(default_factory=dict)  # copied into the predictions row
    predictions: list[str] | None = None  # answers given with the data (a prediction file): no model call
    choices: list[list[str]] | None = None  # multiple choice: each conversation's options as shown (likelihood)


def read_predictions(path: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    if not path.exists():
        return rows
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            rows[str(r["id"])] = r
        except (ValueError, KeyError, TypeError):
            # A line cut by a kill is the last one: drop it (the sample is recomputed), anything else is not ours.
            if n == len(lines):
                log.warning("%s:%d: incomplete last line dropped (interrupted run); it is recomputed", path, n)
                path.write_text("".join(l + "\n" for l in lines[:-1]), encoding="utf-8")
                continue
            raise InputError(f"{path}:{n}: not a predictions row; remove the file or choose another --out") from None
    return rows


def _row_score(row: dict) -> float:
    return float(row["score"]) if "score" in row else float(bool(row["correct"]))


def _category(row: dict) -> str:
    return str(row.get("category", row.get("task", "default")))


# Row fields that benchmarks report accuracy by, besides the category (Video-MME: durations and task types;
# MMBench: its l2-category), when the rows have them.
# `look`: the synthetic world's drawn look (`hyperowl data synth --drawn P`) against the plain one.
BREAKDOWN_FIELDS = ("duration", "task_type", "l2-category", "look")


def summarize(rows: Sequence[dict], groups: bool = True, **meta: Any) -> dict[str, Any]:
    by_cat, by_group = defaultdict(list), defaultdict(list)
    for r in rows:
        by_cat[_category(r)].append(_row_score(r))
        by_group[_category(r).split("/")[0]].append(_row_score(r))
    acc = lambda xs: sum(xs) / len(xs) if xs else 0.0
    out = {**meta, "n": len(rows), "accuracy": acc([_row_score(r) for r in rows]),
           "groups": {k: {"n": len(v), "accuracy": acc(v)} for k, v in sorted(by_group.items())},
           "categories": {k: {"n": len(v), "accuracy": acc(v)} for k, v in sorted(by_cat.items())}}
    if not groups:  # categories with a "/" that is no hierarchy (VQA's "yes/no")
        del out["groups"]
    by = {}
    for f in BREAKDOWN_FIELDS:
        vals = defaultdict(list)
        for r in rows:
            if r.get(f) not in (None, ""):
                vals[str(r[f])].append(_row_score(r))
        if vals:
            by[f] = {k: {"n": len(v), "accuracy": acc(v)} for k, v in sorted(vals.items())}
    if by:
        out["breakdown"] = by
    return out


def dist_info() -> tuple[int, int]:
    """(rank, world size); initialises a gloo process group under torchrun if none exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))  # ranks may wait long for each other
    return dist.get_rank(), dist.get_world_size()


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def model_fingerprint(model) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and the first values of every tensor
    (a retrained or re-quantized model differs; hashing all of a 7B model's bytes would take minutes)."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _run_key(meta: dict) -> dict:
    key = {k: meta[k] for k in ("task", "distractors", "variants", "seed", "style", "model") if k in meta}
    if meta.get("scoring", "generation") != "generation":  # (generation runs keep their earlier run.json)
        key["scoring"] = meta["scoring"]
    if meta.get("data"):
        key["data"] = Path(str(meta["data"])).name
    return key


def _check_same_run(out: Path, meta: dict, rank: int) -> None:
    """Resuming trusts the rows on disk: refuse those of another task, data file or model (`out/run.json`)."""
    f = out / "run.json"
    key = _run_key(meta)
    if f.exists():
        old = json.loads(f.read_text())
        if old != key:
            if {k: v for k, v in old.items() if k != "model"} == {k: v for k, v in key.items() if k != "model"}:
                raise InputError(f"output '{out}' holds predictions of another model (or of an older hyperowl that did "
                                 "not record the model): its rows cannot be resumed with this one; choose another "
                                 "--out (or delete it)")
            raise InputError(f"output '{out}' holds a run of {old}, not {key}; choose another --out (or delete it)")
    elif rank == 0:
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(key))
        tmp.replace(f)


SCORINGS = ("generation", "likelihood", "likelihood-text")


def check_scoring(scoring: str) -> None:
    if scoring not in SCORINGS:
        raise InputError(f"--scoring '{scoring}': choose one of {', '.join(SCORINGS)}")


def pick_options(model, convs: list[dict], choices: list[list[str]], scoring: str,
                 batch_size: int) -> tuple[list[str], list[list[float]]]:
    """Likelihood scoring (see the module note): per conversation the chosen option's letter and every option's
    score (letter: its logprob; text: its mean logprob per token)."""
    from ..chat import score_batch
    from .tasks import LETTERS

    conts = [list(LETTERS[: len(c)]) if scoring == "likelihood" else list(c) for c in choices]
    lps: list[list[list[float]]] = []
    for i in range(0, len(convs), batch_size):
        lps += score_batch(model, convs[i : i + batch_size], conts[i : i + batch_size])
    scores = [[sum(x) / len(x) for x in per] for per in lps]  # one token per letter: the mean is its logprob
    picks = [LETTERS[max(range(len(sc)), key=sc.__getitem__)] for sc in scores]
    return picks, scores


def _chunks(samples: Sequence[Sample], batch_size: int):
    """Consecutive samples whose conversations fill about `batch_size` slots (at least one sample)."""
    chunk: list[tuple[Sample, list[dict]]] = []
    size = 0
    for s in samples:
        convs = [] if s.predictions is not None else s.build()
        chunk.append((s, convs))
        size += len(convs)
        if size >= batch_size:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def run_samples(model, samples: Sequence[Sample], out_dir: str | Path, *, batch_size: int = 8,
                max_new_tokens: int = 16, desc: str = "eval", meta: dict | None = None,
                groups: bool = True, scoring: str = "generation") -> dict[str, Any]:
    """Evaluate `samples` (resuming from `out_dir`), write predictions + summary, return the summary.
    The summary also holds `seconds` (time spent computing in this call) and `computed` (samples computed).
    scoring: "generation" (answers generated and parsed) or a likelihood method (module note)."""
    check_scoring(scoring)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise InputError(f"sample id '{dup}' appears twice in the data; ids must be unique (resume relies on them)")
    rank, world = dist_info()
    meta = dict(meta or {}, scoring=scoring)
    module = getattr(model, "model", model)  # a Pipeline's nn.Module
    if isinstance(module, torch.nn.Module):  # rows on disk are resumed only for the same weights
        meta["model"] = model_fingerprint(module)
    _check_same_run(out, meta, rank)
    main_file = out / "predictions.jsonl"
    own_file = main_file if world == 1 else out / f"predictions.rank{rank}.jsonl"
    done = read_predictions(main_file)
    if own_file != main_file:
        done.update(read_predictions(own_file))
    mine = list(samples[rank::world])
    todo = [s for s in mine if s.id not in done]
    t0 = time.perf_counter()
    with own_file.open("a", encoding="utf-8") as f, tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc,
                                                        disable=rank != 0) as bar:
        for chunk in _chunks(todo, batch_size):
            by_lik = scoring != "generation"
            gen = [c for s, cs in chunk if not (by_lik and s.choices) for c in cs]
            lik = [(c, o) for s, cs in chunk if by_lik and s.choices for c, o in zip(cs, s.choices)]
            outs: list[str] = []
            for i in range(0, len(gen), batch_size):
                outs += chat_batch(model, gen[i : i + batch_size], max_new_tokens=max_new_tokens)
            picks, option_scores = pick_options(model, [c for c, _ in lik], [o for _, o in lik], scoring,
                                                batch_size) if lik else ([], [])
            k = j = 0
            for s, cs in chunk:
                kept = {}
                if s.predictions is not None:
                    preds = list(s.predictions)
                elif by_lik and s.choices:
                    preds = picks[j : j + len(cs)]
                    kept = {"scoring": scoring, "option_scores": [[round(v, 4) for v in sc]
                                                                  for sc in option_scores[j : j + len(cs)]]}
                    j += len(cs)
                else:
                    preds = outs[k : k + len(cs)]
                    k += len(cs)
                    kept = {"scoring": "generation"} if by_lik else {}
                row = {"id": s.id, "category": s.category, **s.extra, **kept,
                       "prediction": preds[0] if len(preds) == 1 else preds, "answer": s.answer, **s.score(preds)}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[s.id] = row
            f.flush()
            bar.update(len(chunk))
    seconds = time.perf_counter() - t0
    if world > 1:
        _barrier()
        if rank == 0:
            for r in range(world):
                done.update(read_predictions(out / f"predictions.rank{r}.jsonl"))
            rows = [done[i] for i in ids]
            wanted = set(ids)
            kept = rows + [r for i, r in done.items() if i not in wanted]  # rows of an earlier, larger run stay
            tmp = main_file.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
            tmp.replace(main_file)
            for r in range(world):
                (out / f"predictions.rank{r}.jsonl").unlink(missing_ok=True)
            summary = summarize(rows, groups, **meta, world_size=world)
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        _barrier()
        summary = json.loads((out / "summary.json").read_text())
    else:
        summary = summarize([done[i] for i in ids], groups, **meta)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["seconds"], summary["computed"] = seconds, len(todo)
    return summary


# -- exact match on conversation JSONL --------------------------------------------------------------------


def load_records(path: Path) -> list[dict[str, Any]]:
    """Conversation records ({messages, images?, videos?, answer?, id?, task?}) of any record file
    (`data.tables`: JSONL, JSON, Parquet, a datasets folder)."""
    if not exists(path):
        raise InputError(f"eval data '{path}': no such file")
    root = path if path.is_dir() else path.parent
    out = []
    for n, (where, rec) in enumerate(iter_rows(path, "eval data"), 1):
        msgs = rec.get("messages")
        if not isinstance(msgs, list):
            raise InputError(f"{where}: not a JSON object with 'messages'")
        answer = rec.get("answer")
        if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            answer = answer if answer is not None else msgs[-1]["content"]
            msgs = msgs[:-1]
        if answer is None:
            raise InputError(f"{where}: no reference answer (an 'answer' field or a final assistant message)")
        media = {k: [p if Path(p).is_absolute() else str(root / p) for p in rec.get(k) or []] for k in ("images", "videos")}
        out.append({"id": str(rec.get("id", n)), "task": rec.get("task") or "default", "messages": msgs,
                    "answer": str(answer), **media, **({"look": rec["look"]} if rec.get("look") else {})})
    return out


def exact_samples(records: Sequence[dict[str, Any]]) -> list[Sample]:
    def sample(rec: dict[str, Any]) -> Sample:
        conv = {"messages": rec["messages"], "images": rec["images"], "videos": rec["videos"]}
        return Sample(rec["id"], rec["task"], rec["answer"], build=lambda: [conv],
                      score=lambda preds: {"correct": normalize(preds[0]) == normalize(rec["answer"])},
                      extra={"task": rec["task"], **({"look": rec["look"]} if "look" in rec else {})})

    return [sample(r) for r in records]


def evaluate(model, data: str | Path, out_dir: str | Path, limit: int | None = None, batch_size: int = 8,
             max_new_tokens: int = 16) -> dict[str, Any]:
    """Exact match over a conversation JSONL. The summary's `tasks` is the per-task accuracy (= categories)."""
    data = Path(data)
    records = load_records(data)[:limit]
    s = run_samples(model, exact_samples(records), out_dir, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    meta={"task": "exact", "data": str(data)})
    s["tasks"] = s["categories"]
    summary_file = Path(out_dir) / "summary.json"
    if dist_info()[0] == 0:
        on_disk = json.loads(summary_file.read_text())
        on_disk["tasks"] = on_disk["categories"]
        summary_file.write_text(json.dumps(on_disk, indent=2))
    return s


def ood_path(ood: str | Path) -> Path:
    """The JSONL of an out-of-distribution set: a file, or a folder written by `hyperowl data ood` (its ood.jsonl)."""
    p = Path(ood)
    if p.is_dir():
        p = p / "ood.jsonl"
    if not p.is_file():
        raise InputError(f"--ood '{ood}': no such file or set (write one with `hyperowl data ood --out {ood}`)")
    return p


def add_ood(model, ood: str | Path, out_dir: str | Path, batch_size: int = 8, max_new_tokens: int = 16) -> dict:
    """Exact match on an out-of-distribution set (`hyperowl data ood`), into `out_dir/ood/`, reported beside the
    main result as the `ood` block of `out_dir/summary.json` (n, accuracy, per category). Returns the block."""
    path = ood_path(ood)
    s = evaluate(model, path, Path(out_dir) / "ood", batch_size=batch_size, max_new_tokens=max_new_tokens)
    block = {"data": str(path), "n": s["n"], "accuracy": s["accuracy"], "categories": s["categories"]}
    if dist_info()[0] == 0:
        f = Path(out_dir) / "summary.json"
        summary = json.loads(f.read_text()) if f.exists() else {}
        summary["ood"] = block
        f.write_text(json.dumps(summary, indent=2))
    return block
