"""Benchmark formats read from local files, and their scorers.

Design note: each format's loader validates the whole file first (columns, fields, media files, base64) and
raises `InputError` naming the file, the record and what to do, so a run never dies after hours on a bad
row. It returns `Sample`s (see `runner.py`) whose media are only decoded when their batch is built.

Formats (media paths are relative to the data file's folder):

* ``mmbench``: MMBench TSV (index, question, hint?, A, B, C?, D?, ..., answer, image (base64), category?).
  An image cell that is a bare number refers to the row with that index (as the official TSVs do).
  Circular evaluation: a question with k options is asked k times, options rotated; it is right only if
  all k answers are.
* ``vqa``: JSON / JSONL records {question, image, answers: [10 strings or {"answer": ...}]}; VQA answer
  normalization and soft accuracy (`vqa_soft_accuracy`).
* ``multi-image``: records {images: [...], sentence|question, label: true/false} (NLVR2, yes/no) or
  {images, question, options, answer} (LLaVA-Interleave multiple choice). `<image>` placeholders in the
  question are honoured when their count matches the images; else the images are labelled in front.
* ``video-mc``: records {video | frames: [paths], question, options, answer (index, letter or option text),
  frames?: int}; frames sampled with the repo's video reader (`--frames`, or the record's `frames`).

Multiple-choice prompts: "<question>\\nA. ..\\nB. ..\\nAnswer with the option's letter from the given
choices directly."; `parse_choice` reads the answer back (a leading letter, an option's text, or the first
standalone option letter).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from PIL import Image

from ..data.tables import exists, iter_rows, json_rows, read_rows
from ..errors import InputError
from .runner import Sample

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
VQA_INSTRUCTION = "Answer the question using a single word or phrase."
YES_NO_INSTRUCTION = "Answer yes or no."
IMAGE_TOKEN = "<|image|>"
VIDEO_TOKEN = "<|video|>"

# -- scorers ----------------------------------------------------------------------------------------------

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Apostrophe-less spellings -> the canonical form (the apostrophe itself is kept by the punctuation step).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "hows": "how's", "im": "i'm", "isnt": "isn't", "itd": "it'd",
    "itll": "it'll", "ive": "i've", "lets": "let's", "mightnt": "mightn't", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "shant": "shan't", "shes": "she's",
    "shouldnt": "shouldn't", "shouldve": "should've", "thats": "that's", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "werent": "weren't", "weve": "we've", "whats": "what's", "whens": "when's", "wheres": "where's",
    "whos": "who's", "whyre": "why're", "wont": "won't", "wouldnt": "wouldn't", "wouldve": "would've",
    "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("2." -> "2", "3.5" stays)


def _strip_punctuation(t: str) -> str:
    """As the VQA evaluation does: a mark next to a space (or any mark, when the text has a number with
    a thousands comma) is deleted, otherwise replaced by a space; periods go unless a digit follows."""
    delete_all = _COMMA_IN_NUMBER.search(t) is not None
    for p in _PUNCT:
        if p not in t:
            continue
        t = t.replace(p, "") if delete_all or (p + " " in t or " " + p in t) else t.replace(p, " ")
    return _PERIOD_NOT_DECIMAL.sub("", t)


def vqa_normalize(text: str) -> str:
    """VQA answer normalization: lowercase, punctuation, number words -> digits, no articles, contractions."""
    t = _strip_punctuation(str(text).replace("\n", " ").replace("\t", " ").strip().lower())
    words = []
    for w in t.split():
        w = _NUMBER_WORDS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """For each annotator i: min(1, #other annotators who gave the prediction / 3); the mean over i.
    With 10 answers: 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1. A single reference answer: exact match."""
    pred = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    if not gts:
        raise ValueError("no reference answers")
    if len(gts) == 1:
        return float(pred == gts[0])
    hits = [g == pred for g in gts]
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3) for h in hits) / len(gts)


def parse_yes_no(text: str) -> Optional[bool]:
    """yes/true -> True, no/false -> False (the first such word), else None."""
    for w in vqa_normalize(text).split():
        if w in ("yes", "true", "correct", "right"):
            return True
        if w in ("no", "false", "incorrect", "wrong"):
            return False
    return None


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", str(text).lower())).strip()


def parse_choice(text: str, options: Sequence[str]) -> Optional[int]:
    """The option a free-text answer picks (0-based), or None.

    In order: a leading letter ("B", "B.", "(B)", "B) text", "Answer: B"); the whole answer equal to an
    option's text; exactly one option's text contained in the answer (the longest wins when one contains
    another); the first standalone option letter anywhere. "A" followed by a lowercase word ("A red
    circle") is read as an article, not a letter."""
    letters = LETTERS[: len(options)]
    t = str(text).strip()
    t = re.sub(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*", "", t, flags=re.I)

    def letter_ok(m: re.Match, s: str) -> bool:
        c = m.group(1)
        return c in letters and not (c == "A" and re.match(r"\s+[a-z]", s[m.end(1):]))

    bare = t.strip(" .()[]").upper()
    if len(bare) == 1 and bare in letters:  # "b", "(c)."
        return letters.index(bare)
    m = re.match(r"[\(\[]?([A-Z])(?:[\)\]]|[.:,]|\s|$)", t)
    if m and letter_ok(m, t):
        return letters.index(m.group(1))
    plain = _plain(t)
    opts = [_plain(o) for o in options]
    for i, o in enumerate(opts):
        if o and plain == o:
            return i
    found = [i for i, o in enumerate(opts) if o and re.search(r"\b" + re.escape(o) + r"\b", plain)]
    found = [i for i in found if not any(j != i and opts[i] in opts[j] for j in found)]  # drop "red" inside "dark red"
    if len(found) == 1:
        return found[0]
    for m in re.finditer(r"\b([A-Z])\b", t):
        if letter_ok(m, t):
            return letters.index(m.group(1))
    return None


def rotate(options: Sequence[str], answer: int, r: int) -> tuple[list[str], int]:
    """Rotation r of circular evaluation: option r comes first; returns (options, new answer index)."""
    k = len(options)
    r %= k
    return list(options[r:]) + list(options[:r]), (answer - r) % k


def mc_prompt(question: str, options: Sequence[str], hint: str = "") -> str:
    head = "\n".join(x for x in (hint.strip(), question.strip()) if x)
    return head + "\n" + "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(options)) + MC_INSTRUCTION


def mc_score(options_per_query: Sequence[Sequence[str]], answers: Sequence[int]) -> Callable[[list[str]], dict]:
    """Scorer of a multiple-choice sample asked len(answers) times: right only if every query is."""

    def score(preds: list[str]) -> dict:
        picked = [parse_choice(p, o) for p, o in zip(preds, options_per_query)]
        ok = [p == a for p, a in zip(picked, answers)]
        return {"picked": [None if p is None else LETTERS[p] for p in picked], "score": float(all(ok)),
                "correct": all(ok)}

    return score


# -- file reading -----------------------------------------------------------------------------------------


def need(rec: dict, names: str | Sequence[str], where: str, what: str = "") -> Any:
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if rec.get(n) is not None:
            return rec[n]
    alt = " or ".join(f"'{n}'" for n in names)
    raise InputError(f"{where}: missing field {alt}" + (f"; {what}" if what else ""))


def data_root(path: Path) -> Path:
    """Where relative media paths of a data file point: its folder (a `datasets` folder: that folder)."""
    return path if path.is_dir() else path.parent


def struct_image_bytes(value: dict, where: str) -> bytes:
    """The encoded image of a Parquet / `datasets` Image cell, {"bytes": ..., "path": ...}."""
    raw = value.get("bytes")
    if not isinstance(raw, (bytes, bytearray)) or not raw:
        raise InputError(f"{where}: the image cell has no bytes (path {value.get('path')!r}); give the images "
                         f"embedded, or paths as strings")
    return _checked_image_bytes(bytes(raw), where)


def media_path(root: Path, value: Any, where: str, what: str = "image") -> str | bytes:
    """A media file named by a record: a path (relative to `root`), or for images a Parquet / `datasets`
    Image cell ({"bytes", "path"}; its bytes, or its path when it holds none)."""
    if isinstance(value, dict) and what in ("image", "frame"):
        if value.get("bytes"):
            return struct_image_bytes(value, where)
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: {what} must be a file path string, got {value!r}")
    p = Path(value)
    p = p if p.is_absolute() else root / p
    if not p.is_file():
        raise InputError(f"{where}: {what} '{value}' not found (looked at {p}; relative paths are relative to the "
                         f"data file's folder)")
    return str(p)


def answer_index(value: Any, options: Sequence[str], where: str) -> int:
    """An answer given as a 0-based index, a letter, or the text of an option."""
    if isinstance(value, bool):
        raise InputError(f"{where}: answer {value!r} is not an option index, letter or option text")
    if isinstance(value, int):
        if 0 <= value < len(options):
            return value
        raise InputError(f"{where}: answer index {value} out of range for {len(options)} options (0-based)")
    if isinstance(value, str):
        v = value.strip()
        texts = [str(o).strip() for o in options]
        if v in texts:
            return texts.index(v)
        m = re.fullmatch(r"\(?([A-Z])[\).]?", v)
        if m and m.group(1) in LETTERS[: len(options)]:
            return LETTERS.index(m.group(1))
        if v.isdigit() and int(v) < len(options):
            return int(v)
    raise InputError(f"{where}: answer {value!r} is not an option index, letter or option text of {list(options)}")


def record_id(rec: dict, where: str, n: int) -> str:
    for k in ("id", "question_id", "qid", "index", "uid"):
        if rec.get(k) is not None:
            return str(rec[k])
    return str(n)


def _category(rec: dict, default: str) -> str:
    for k in ("category", "task", "answer_type", "question_type", "type"):
        if rec.get(k) not in (None, ""):
            return str(rec[k])
    return default


def _options(rec: dict, where: str) -> list[str]:
    if all(rec.get(k) is None for k in ("options", "choices", "candidates")) and rec.get("a0") is not None:
        opts = [rec[f"a{i}"] for i in range(26) if rec.get(f"a{i}") not in (None, "")]  # NExT-QA columns a0..a4
        return [str(o) for o in opts]
    opts = need(rec, ("options", "choices", "candidates"), where, "a list of answer options (or a0, a1, ...)")
    if isinstance(opts, dict):  # {"A": "...", "B": "..."}
        opts = [opts[k] for k in sorted(opts)]
    if not isinstance(opts, list) or len(opts) < 2 or not all(isinstance(o, (str, int, float)) for o in opts):
        raise InputError(f"{where}: 'options' must be a list of at least 2 strings")
    return [str(o) for o in opts]


# -- MMBench ----------------------------------------------------------------------------------------------

# The published MMBench files hold the circular copies themselves: copy k of question i is the row with index
# i + k * CIRCULAR_STRIDE, its options rotated by k and its image cell holding i (a reference to the base row).
CIRCULAR_STRIDE = 1_000_000


@dataclass
class MCItem:
    """A multiple-choice question about one image (MMBench rows, distractor-protocol input)."""

    id: str
    category: str
    question: str
    options: list[str]
    answer: int
    image: Any  # a path or encoded bytes (None in a prediction file)
    hint: str = ""
    extra: dict = field(default_factory=dict)
    prediction: Optional[str] = None  # the `prediction` column of a prediction file (VLMEvalKit's)


def _cell(row: dict, key: str) -> str:
    """A cell as text: TSV cells are strings; Parquet / JSON cells may be numbers, None or NaN."""
    v = row.get(key)
    if v is None or isinstance(v, dict):
        return ""
    if isinstance(v, float):
        if v != v:  # NaN: what pandas writes for an empty cell
            return ""
        if v.is_integer():
            v = int(v)
    v = str(v).strip()
    return "" if v.lower() == "nan" else v


def _decode_image(b64: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{where}: column 'image' is not valid base64 ({e}); the TSV may be damaged, download "
                         f"it again") from None
    return _checked_image_bytes(raw, where)


def _checked_image_bytes(raw: bytes, where: str) -> bytes:
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for garbage
        raise InputError(f"{where}: column 'image' decodes to no readable image ({type(e).__name__}); the file may be "
                         f"damaged, download it again") from None
    return raw


def _mmbench_table(path: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """(columns, [(where, row)]) of an MMBench file: the TSV as published (VLMEvalKit's, prediction files
    included), or the same columns as Parquet / JSON / a `datasets` folder (e.g. lmms-lab's MMBench)."""
    if path.is_file() and path.suffix.lower() == ".tsv":
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long cells
        try:
            with path.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t")
                return list(reader.fieldnames or []), [(f"{path}:{n}", r) for n, r in enumerate(reader, 2)]
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text; an MMBench TSV is tab-separated text (or give the Parquet "
                             f"file with --data x.parquet)") from None
    rows = read_rows(path, "eval data")
    return list(dict.fromkeys(k for _, r in rows[:1] for k in r)), rows


def load_mmbench_items(path: Path) -> list[MCItem]:
    """One MCItem per row (circular copies included; see `mmbench_samples`). With a `prediction` column the
    rows are a prediction file: the image is not needed (VLMEvalKit drops it there) and not read."""
    path = Path(path)
    if not exists(path):
        raise InputError(f"eval data '{path}': no such file")
    header, rows = _mmbench_table(path)
    scored = "prediction" in header
    for col in ("index", "question", "A", "B", "answer") + (() if scored else ("image",)):
        if col not in header:
            hint = " (MMBench test splits have no answers: evaluate the dev split)" if col == "answer" else ""
            raise InputError(f"{path}: column '{col}' missing{hint}; an MMBench TSV needs index, question, A, B, "
                             f"[C, D ...], answer, image (base64) or prediction; this header has: {', '.join(header)}")
    letters = [c for c in LETTERS if c in header]
    by_index = {_cell(r, "index"): r for _, r in rows}
    items = []
    for where, row in rows:
        where = f"{where} (index {_cell(row, 'index')})"
        if None in row:
            raise InputError(f"{where}: more cells than header columns; is the file tab-separated?")
        options = [_cell(row, c) for c in letters]
        k = next((i for i, o in enumerate(options) if not o), len(options))
        if k < 2 or any(options[k:]):
            raise InputError(f"{where}: options must fill A, B, ... without gaps (got {options})")
        options = options[:k]
        ans = _cell(row, "answer")
        if ans not in LETTERS[:k]:
            raise InputError(f"{where}: answer {ans!r} is not one of the option letters {', '.join(LETTERS[:k])}")
        q = _cell(row, "question")
        if not q:
            raise InputError(f"{where}: column 'question' is empty")
        image = None if scored else _row_image(row, by_index, where)
        items.append(MCItem(_cell(row, "index"), _cell(row, "category") or "default", q, options,
                            LETTERS.index(ans), image, _cell(row, "hint"),
                            {k: _cell(row, k) for k in ("l2-category", "split") if _cell(row, k)},
                            prediction=_cell(row, "prediction") if scored else None))
    if not items:
        raise InputError(f"{path}: no rows")
    log.info("%s: %d rows, %d categories", path, len(items), len({i.category for i in items}))
    return items


def _row_image(row: dict, by_index: dict, where: str) -> bytes:
    """A row's image: base64 text, a Parquet {"bytes", "path"} struct, or (a short number) the index of the
    row that holds it, as the circular copies of the published TSVs do."""
    value = row.get("image")
    if isinstance(value, dict):
        return struct_image_bytes(value, where)
    img = _cell(row, "image")
    if img.isdigit() and len(img) < 16 and img in by_index:  # a reference to another row's image
        ref = by_index[img]
        value = ref.get("image")
        if isinstance(value, dict):
            return struct_image_bytes(value, where)
        img = _cell(ref, "image")
    if not img:
        raise InputError(f"{where}: column 'image' is empty")
    return _decode_image(img, where)


def load_mc_json_items(path: Path) -> list[MCItem]:
    """Single-image multiple choice as JSON/JSONL {image, question, options, answer, hint?, category?}."""
    root = data_root(path)
    items = []
    for n, (where, rec) in enumerate(read_rows(path, "eval data"), 1):
        options = _options(rec, where)
        items.append(MCItem(record_id(rec, where, n), _category(rec, "default"),
                            str(need(rec, "question", where)), strip_option_letters(options),
                            answer_index(need(rec, "answer", where), options, where),
                            media_path(root, need(rec, "image", where), where), str(rec.get("hint") or "")))
    if not items:
        raise InputError(f"{path}: no records")
    return items


def load_mc_items(path: str | Path) -> list[MCItem]:
    """Single-image multiple-choice questions (the distractor protocol's input): an MMBench file (its base
    rows: the protocol makes its own option orders) or JSON/JSONL records."""
    path = Path(path)
    if path.suffix.lower() != ".tsv":
        first = next(iter(iter_rows(path, "eval data")), (None, {}))[1]
        if not {"index", "A", "B"} <= set(first):  # MMBench's columns (lmms-lab's Parquet): read as MMBench
            return load_mc_json_items(path)
    return [it for it in load_mmbench_items(path) if not (it.id.isdigit() and int(it.id) >= CIRCULAR_STRIDE)]


def circular_sample(item: MCItem, prompt_of: Callable[[list[str]], str], images: Callable[[], list],
                    rotations: Optional[int] = None) -> Sample:
    k = len(item.options)
    variants = [rotate(item.options, item.answer, r) for r in range(k if rotations is None else rotations)]

    def build() -> list[dict]:
        ims = images()
        return [{"messages": [{"role": "user", "content": prompt_of(opts)}], "images": ims} for opts, _ in variants]

    return Sample(item.id, item.category, LETTERS[item.answer], build, mc_score([o for o, _ in variants],
                                                                                [a for _, a in variants]),
                  extra=dict(item.extra), choices=[o for o, _ in variants])


def circular_groups(items: Sequence[MCItem]) -> Optional[dict[int, list[MCItem]]]:
    """The rows of each question, by `index % CIRCULAR_STRIDE` (base row first, then its copies by index),
    in the order questions first appear; None when the file holds no circular copies."""
    if not all(it.id.isdigit() for it in items) or not any(int(it.id) >= CIRCULAR_STRIDE for it in items):
        return None
    groups: dict[int, list[MCItem]] = {}
    for it in items:
        groups.setdefault(int(it.id) % CIRCULAR_STRIDE, []).append(it)
    for g, members in groups.items():
        members.sort(key=lambda it: int(it.id))
        if len({int(m.id) for m in members}) != len(members):
            raise InputError(f"MMBench index {members[0].id} appears twice; indices must be unique")
    return groups


def _mmbench_prompt(it: MCItem, options: Sequence[str]) -> str:
    return IMAGE_TOKEN + mc_prompt(it.question, options, it.hint)


def _group_sample(gid: int, rows: list[MCItem]) -> Sample:
    """One question asked once per row (its own option order): right only if every row is answered right."""
    base = rows[0]

    def build() -> list[dict]:
        return [{"messages": [{"role": "user", "content": _mmbench_prompt(r, r.options)}], "images": [r.image]}
                for r in rows]

    extra = dict(base.extra, rows=[r.id for r in rows]) if len(rows) > 1 else dict(base.extra)
    preds = [r.prediction or "" for r in rows] if base.prediction is not None else None
    return Sample(str(gid), base.category, LETTERS[base.answer], build,
                  mc_score([r.options for r in rows], [r.answer for r in rows]), extra=extra, predictions=preds,
                  choices=[list(r.options) for r in rows])


def mmbench_samples(path: str | Path, circular: bool = True) -> list[Sample]:
    """MMBench questions as samples. A file with circular copies (the published ones): CircularEval as
    published, one model call per row, a question right only if all its rows are; `circular=False`: each
    question's base row once. A file without copies: the k rotations of each question are made here
    (circular) or the row is asked once. A prediction file is scored from its `prediction` column."""
    items = load_mmbench_items(Path(path))
    groups = circular_groups(items)
    if groups is not None:
        log.info("%s: %d questions in %d rows (circular copies in the file)", path, len(groups), len(items))
        return [_group_sample(g, rows if circular else rows[:1]) for g, rows in groups.items()]
    out = []
    for it in items:
        if it.prediction is not None:  # one answer per row: nothing to rotate
            out.append(_group_sample(it.id, [it]))
            continue
        out.append(circular_sample(it, lambda opts, it=it: _mmbench_prompt(it, opts), lambda it=it: [it.image],
                                   None if circular else 1))
    if circular and items[0].prediction is not None:
        log.warning("%s: a prediction file without circular copies: each question is scored on its one answer", path)
    return out


# -- VQA --------------------------------------------------------------------------------------------------


def _vqa_sample(rid: str, category: str, q: str, img: str, answers: list, where: str) -> Sample:
    answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
    if not answers or not all(isinstance(a, (str, int, float)) for a in answers):
        raise InputError(f"{where}: 'answers' must be a non-empty list of strings or {{\"answer\": ...}} objects")
    answers = [str(a) for a in answers]
    conv = {"messages": [{"role": "user", "content": f"{IMAGE_TOKEN}{q}\n{VQA_INSTRUCTION}"}], "images": [img]}
    score = lambda preds, answers=answers: (lambda s: {"score": s, "correct": s >= 1.0})(vqa_soft_accuracy(preds[0], answers))
    return Sample(rid, category, answers, lambda conv=conv: [conv], score)


def _load_json_object(path: Path, what: str) -> Any:
    if not path.is_file():
        raise InputError(f"{what} '{path}': no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"{what} '{path}': not valid JSON ({e})") from None


def _vqav2_image(image_dir: Path, subtype: str, image_id: Any, where: str) -> str:
    """COCO file naming (COCO_val2014_000000000042.jpg), or a bare id (000000000042.jpg / 42.jpg)."""
    if not isinstance(image_id, int):
        raise InputError(f"{where}: image_id must be an integer, got {image_id!r}")
    names = ([f"COCO_{subtype}_{image_id:012d}.jpg"] if subtype else []) + [f"{image_id:012d}.jpg", f"{image_id}.jpg",
                                                                              f"{image_id}.png"]
    for n in names:
        if (image_dir / n).is_file():
            return str(image_dir / n)
    raise InputError(f"{where}: image {image_id} not found in '{image_dir}' (looked for {', '.join(names)}); "
                     f"pass the images folder with --image-dir")


def vqav2_samples(questions_path: Path, annotations: str | Path | None, image_dir: str | Path | None) -> list[Sample]:
    """The official VQAv2 pair: a questions file ({"data_subtype", "questions": [{question_id, image_id,
    question}]}) and an annotations file ({"annotations": [{question_id, answers: [{answer}], answer_type}]}),
    images named as in COCO. Categories are the answer types (yes/no, number, other)."""
    if annotations is None:
        raise InputError(f"--data '{questions_path}' is a VQAv2 questions file: also pass its annotations file "
                         f"with --annotations (e.g. v2_mscoco_val2014_annotations.json)")
    qdoc = _load_json_object(questions_path, "--data")
    adoc = _load_json_object(Path(annotations), "--annotations")
    anns = adoc.get("annotations") if isinstance(adoc, dict) else None
    if not isinstance(anns, list):
        raise InputError(f"--annotations '{annotations}': expected an object with an 'annotations' list (VQAv2 format)")
    by_qid = {a.get("question_id"): a for a in anns if isinstance(a, dict)}
    subtype = str(qdoc.get("data_subtype") or "")
    root = Path(image_dir) if image_dir else questions_path.parent
    if not root.is_dir():
        raise InputError(f"--image-dir '{root}': no such folder")
    out = []
    for i, q in enumerate(qdoc["questions"]):
        where = f"{questions_path}[questions][{i}]"
        if not isinstance(q, dict):
            raise InputError(f"{where}: a question must be a JSON object")
        qid = need(q, "question_id", where)
        ann = by_qid.get(qid)
        if ann is None:
            raise InputError(f"{where}: question_id {qid} has no entry in --annotations '{annotations}' "
                             f"(are the two files of the same split?)")
        img = _vqav2_image(root, subtype, need(q, "image_id", where), where)
        out.append(_vqa_sample(str(qid), str(ann.get("answer_type") or "default"), str(need(q, "question", where)), img,
                               need(ann, "answers", f"--annotations question_id {qid}"), where))
    return out


def vqa_samples(path: str | Path, annotations: str | Path | None = None, image_dir: str | Path | None = None) -> list[Sample]:
    """VQA records ({question, image, answers}) from JSON/JSONL, or the official VQAv2 questions +
    annotations files (detected by the questions file's "questions" list)."""
    path = Path(path)
    if path.suffix == ".json":  # parsed once: it may be the VQAv2 questions file, else a list of records
        doc = _load_json_object(path, "--data")
        if isinstance(doc, dict) and isinstance(doc.get("questions"), list):
            return vqav2_samples(path, annotations, image_dir)
        records = json_rows(path, doc)
    else:
        records = read_rows(path, "eval data")
    if annotations is not None:
        raise InputError(f"--annotations is for the official VQAv2 two-file format; '{path}' holds the answers itself")
    root = Path(image_dir) if image_dir else data_root(path)
    out = []
    for n, (where, rec) in enumerate(records, 1):
        q = str(need(rec, "question", where))
        img = media_path(root, need(rec, ("image", "image_path", "file"), where), where)
        answers = need(rec, "answers", where, "a list of reference answers (10 in VQAv2)")
        if not isinstance(answers, list):
            raise InputError(f"{where}: 'answers' must be a non-empty list")
        out.append(_vqa_sample(record_id(rec, where, n), _category(rec, "default"), q, img, answers, where))
    return out


# -- multi-image ------------------------------------------------------------------------------------------


def _images_prompt(text: str, n: int) -> str:
    """Use the question's own <image> placeholders when they match the images, else label them in front."""
    t = text.replace("<image>", IMAGE_TOKEN)
    if t.count(IMAGE_TOKEN) == n:
        return t
    t = t.replace(IMAGE_TOKEN, "")
    return "".join(f"Image {i + 1}: {IMAGE_TOKEN}\n" for i in range(n)) + t.strip()


def _bool_label(v: Any, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return v.strip().lower() in ("true", "yes", "1")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise InputError(f"{where}: label {v!r} must be true/false (or yes/no)")


def multi_image_samples(path: str | Path) -> list[Sample]:
    path = Path(path)
    out = []
    for n, (where, rec) in enumerate(read_rows(path, "eval data"), 1):
        ims = need(rec, "images", where, "a list of image paths")
        if not isinstance(ims, list) or not ims:
            raise InputError(f"{where}: 'images' must be a non-empty list of paths")
        ims = [media_path(data_root(path), p, where) for p in ims]
        rid = record_id(rec, where, n)
        if rec.get("options") is not None or rec.get("choices") is not None:
            options = _options(rec, where)
            item = MCItem(rid, _category(rec, "mc"), str(need(rec, "question", where)), strip_option_letters(options),
                          answer_index(need(rec, "answer", where), options, where), None)
            prompt = lambda opts, item=item, k=len(ims): _images_prompt(mc_prompt(item.question, opts), k)
            out.append(circular_sample(item, prompt, lambda ims=ims: ims, rotations=1))
        else:
            label = _bool_label(need(rec, ("label", "answer"), where, "true/false"), where)
            if rec.get("question"):
                text = str(rec["question"])
            else:
                text = f"Is this statement true for the images? {need(rec, ('sentence', 'statement'), where)}"
            conv = {"messages": [{"role": "user", "content": _images_prompt(f"{text}\n{YES_NO_INSTRUCTION}", len(ims))}],
                    "images": ims}

            def score(preds, label=label):
                got = parse_yes_no(preds[0])
                return {"picked": got, "score": float(got is label), "correct": got is label}

            out.append(Sample(rid, _category(rec, "yes-no"), "yes" if label else "no", lambda conv=conv: [conv], score))
    return out


# -- video multiple choice --------------------------------------------------------------------------------

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_LETTERED = re.compile(r"^\(?([A-Z])[.):]\s*")


def strip_option_letters(options: Sequence[str]) -> list[str]:
    """Options published with their letters ("A. down", "(B) up") lose them, so the prompt, which letters
    the options itself, shows "A. down" and not "A. A. down". Only when every option carries its own letter."""
    ms = [_LETTERED.match(o) for o in options]
    if all(m and m.group(1) == LETTERS[i] for i, m in enumerate(ms)) and all(o[m.end():].strip() for o, m in zip(options, ms)):
        return [o[m.end():].strip() for o, m in zip(options, ms)]
    return list(options)


def _video_records(path: Path) -> list[tuple[str, dict]]:
    """Flat records; Video-MME's per-video JSON ({video_id, duration, domain, ..., questions: [...]}, its
    results form with a `response` per question included) is flattened to one record per question."""
    out = []
    for where, rec in read_rows(path, "eval data"):
        qs = rec.get("questions")
        if isinstance(qs, list) and rec.get("question") is None:
            for j, q in enumerate(qs):
                if not isinstance(q, dict):
                    raise InputError(f"{where}[questions][{j}]: a question must be a JSON object")
                out.append((f"{where}[questions][{j}]", {**{k: v for k, v in rec.items() if k != "questions"}, **q}))
        else:
            out.append((where, rec))
    return out


def _places(roots: Sequence[Path]) -> str:
    if len(roots) == 1:
        return f"'{roots[0]}'"
    return f"'{roots[0]}' and data/, video/, videos/ there and next to it"


def _find_video(rec: dict, roots: Sequence[Path], where: str) -> str:
    """The record's video: its `video` / `video_path` (relative to the roots), or Video-MME's `videoID`
    looked up as <videoID>.mp4 (or another video suffix) in the roots."""
    value = rec.get("video") if rec.get("video") is not None else rec.get("video_path")
    if value is None and rec.get("videoID") is not None:
        vid = str(rec["videoID"])
        names = [vid + s for s in VIDEO_SUFFIXES]
        for root in roots:
            for n in names:
                if (root / n).is_file():
                    return str(root / n)
        raise InputError(f"{where}: video '{vid}' not found (looked for {vid}.mp4 etc. in {_places(roots)}); pass the "
                         f"videos' folder with --video-dir")
    if value is None:
        raise InputError(f"{where}: missing field 'video' or 'video_path' (or Video-MME's 'videoID', or 'frames')")
    if isinstance(value, str) and not Path(value).is_absolute():
        for root in roots:
            if (root / value).is_file() or (root / value).is_dir():  # a folder of frames (some MVBench tasks)
                return str(root / value)
        raise InputError(f"{where}: video '{value}' not found (looked in {_places(roots)}); pass the videos' folder "
                         f"with --video-dir")
    return str(media_path(roots[0], value, where, "video"))


def _segment(rec: dict, where: str) -> Optional[tuple[float, float]]:
    """MVBench's `start` / `end` (seconds): the clip the question is about."""
    s, e = rec.get("start"), rec.get("end")
    if s is None and e is None:
        return None
    try:
        s, e = float(0 if s is None else s), float(e)
    except (TypeError, ValueError):
        raise InputError(f"{where}: 'start' and 'end' must be numbers of seconds, got {rec.get('start')!r}, "
                         f"{rec.get('end')!r}") from None
    if not 0 <= s < e:
        raise InputError(f"{where}: segment start {s} / end {e}: need 0 <= start < end (seconds)")
    return s, e


VIDEO_MME_FIELDS = ("duration", "domain", "sub_category", "task_type", "video_id", "question_id")


def video_mc_samples(path: str | Path, max_frames: int = 16, video_dir: str | Path | None = None) -> list[Sample]:
    """Video multiple choice: {video | frames, question, options, answer} records, and the published layouts
    of Video-MME (Parquet or JSON: videoID, options lettered "A. ...", answer letter, duration, domain,
    sub_category, task_type; `response` scored as a prediction) and MVBench (one task's JSON: video,
    candidates, answer text, start/end segment; the task is the file's name)."""
    from ..processing.video import sample_frames

    path = Path(path)
    root = data_root(path)
    # the data file's folder, its video folders, and those next to it (Video-MME: videomme/*.parquet + data/)
    roots = [Path(video_dir)] if video_dir else [r / sub for r in (root, root.parent) for sub in ("", "data", "video", "videos")]
    if video_dir and not Path(video_dir).is_dir():
        raise InputError(f"--video-dir '{video_dir}': no such folder")
    task_name = path.stem if path.is_file() else path.name
    out = []
    for n, (where, rec) in enumerate(_video_records(path), 1):
        raw = _options(rec, where)
        answer = answer_index(need(rec, ("answer", "correct_choice"), where), raw, where)
        options = strip_option_letters(raw)
        frames_field = rec.get("frames")
        segment = _segment(rec, where)
        answered = rec.get("response") is not None  # Video-MME's results form: scored, no video needed
        if answered:
            video, frame_paths, k = None, [], 0
        elif isinstance(frames_field, list):
            frame_paths = [media_path(root, p, where, "frame") for p in frames_field]
            if not frame_paths:
                raise InputError(f"{where}: 'frames' is an empty list")
            video, k = None, max_frames
        else:
            if frames_field is not None and (not isinstance(frames_field, int) or frames_field < 1):
                raise InputError(f"{where}: 'frames' must be a positive number of frames or a list of frame images")
            video, frame_paths, k = _find_video(rec, roots, where), [], frames_field or max_frames
            if Path(video).is_dir():  # a video given as a folder of frame images, in name order
                frame_paths = sorted(str(f) for f in Path(video).iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
                if not frame_paths:
                    raise InputError(f"{where}: video folder '{video}' holds no frame images")
                if segment is not None:
                    log.warning("%s: a folder of frames has no timestamps: start/end not applied", where)
                video = None
        if rec.get("domain"):  # Video-MME: domain/sub_category (the summary also breaks down by duration, task)
            category = str(rec["domain"]) + (f"/{rec['sub_category']}" if rec.get("sub_category") else "")
        else:
            category = _category(rec, task_name if rec.get("candidates") is not None else "default")
        rid = str(rec["question_id"]) if rec.get("question_id") is not None else record_id(rec, where, n)
        item = MCItem(rid, category, str(need(rec, "question", where)), options, answer, None)
        extra = {f: str(rec[f]) for f in VIDEO_MME_FIELDS[:4] if rec.get(f) not in (None, "")}
        if segment is not None:
            extra["segment"] = list(segment)

        def frames(video=video, frame_paths=frame_paths, k=k, segment=segment):
            if video is not None:
                return [sample_frames(video, max_frames=k, segment=segment)]
            from ..processing.images import load_image

            m = min(k, len(frame_paths))  # m frames spread evenly over the list, first and last included
            idx = [round(i * (len(frame_paths) - 1) / max(1, m - 1)) for i in range(m)]
            return [[load_image(frame_paths[i]) for i in idx]]

        prompt = lambda opts, item=item: VIDEO_TOKEN + mc_prompt(item.question, opts)
        s = circular_sample(item, prompt, lambda: [], rotations=1)
        s.extra.update(extra)
        if answered:
            s.predictions = [str(rec["response"])]

        def build(s_build=s.build, frames=frames):
            convs = s_build()
            vids = frames()
            return [dict(c, images=[], videos=vids) for c in convs]

        s.build = build
        out.append(s)
    return out
