"""Likelihood scoring of multiple-choice questions (`hyperowl eval --scoring likelihood|likelihood-text`):
`Engine.score` / `chat.score_batch` against log_softmax of an independent full forward (no cache) over prompt +
continuation, on the embedded model, the Owl3 fixture and random Owl3 241101 / Owl2 models (with images); a
planted off-by-one is caught by the same check; the CLI end to end, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hyperowl
from conftest import features, random_owl3
from hyperowl.chat import score_batch
from hyperowl.cli import main
from hyperowl.engine import Engine, Request
from hyperowl.eval import harness
from test_owl2 import random_owl2

DATA = Path(__file__).parent / "data" / "eval"
TOL = 1e-4


@pytest.fixture(scope="module")
def pipe():
    return hyperowl.load(device="cpu")


def full_forward(model, ids, embeds, positions, cont: list[int]) -> list[float]:
    """Each continuation token's logprob from one forward over prompt + continuation, no cache."""
    seq = torch.cat([ids, torch.tensor(cont, dtype=ids.dtype)])[None]
    kw = {} if embeds is None else dict(image_embeds=embeds, image_positions=positions[None])
    with torch.no_grad():
        logits = model(input_ids=seq, **kw).logits[0].float()
    lp = torch.log_softmax(logits, -1)[-len(cont) - 1 : -1]  # position p predicts token p + 1 (Owl2: expanded seq)
    return [float(lp[t, c]) for t, c in enumerate(cont)]


def max_error(model, reqs, conts, got) -> float:
    err = 0.0
    for r, cs, g in zip(reqs, conts, got):
        for c, vals in zip(cs, g):
            ref = full_forward(model, r.input_ids, r.image_embeds, r.image_positions, c)
            assert len(vals) == len(ref)
            err = max(err, max(abs(a - b) for a, b in zip(vals, ref)))
    return err


CONVS = [{"messages": [{"role": "user", "content": "<|image|>What colour is the circle?\nA. red\nB. green\nC. blue\n"
                                                   "Answer with the option's letter from the given choices directly."}],
          "images": [str(DATA / "images" / "red_circle.png")]},
         {"messages": [{"role": "user", "content": "What shape is it?"}]},
         {"messages": [{"role": "user", "content": "<|image|><|image|>Which is square?"}],
          "images": [str(DATA / "images" / "green_square.png"), str(DATA / "images" / "blue_circle.png")]}]
CONTS = [["A", "B", "C"], ["a red circle", "square", "green triangle to the left"], ["the first one", "B"]]


def pipeline_requests(pipe):
    plans = [pipe.processor.plan(c["messages"], images=c.get("images")) for c in CONVS]
    embeds = pipe.encoder.encode_many(plans)
    reqs = [Request(p.input_ids, e, p.image_positions) for p, e in zip(plans, embeds)]
    ids = [[pipe.processor.tokenizer.encode(t, add_special_tokens=False).ids for t in cs] for cs in CONTS]
    return reqs, ids


def test_score_batch_equals_a_full_forward_on_the_embedded_model(pipe):
    got = score_batch(pipe, CONVS, CONTS)
    reqs, ids = pipeline_requests(pipe)
    assert any(len(c) > 1 for cs in ids for c in cs) and any(len(c) == 1 for cs in ids for c in cs)
    assert max_error(pipe.model, reqs, ids, got) <= TOL
    # the chosen option (argmax of the summed logprobs) is the reference's
    for r, cs, g in zip(reqs, ids, got):
        ref = [sum(full_forward(pipe.model, r.input_ids, r.image_embeds, r.image_positions, c)) for c in cs]
        assert max(range(len(g)), key=lambda j: sum(g[j])) == max(range(len(ref)), key=ref.__getitem__)


def test_a_planted_off_by_one_is_caught(pipe, monkeypatch):
    """The check above can fail: logprobs read one token id off (the prefill) or one position off (the
    continuation forward) differ from the full forward by far more than the tolerance."""
    import hyperowl.engine as eng

    reqs, ids = pipeline_requests(pipe)

    def shifted(logits):
        x = logits.float()
        return torch.log_softmax(x.roll(1, dims=-2 if x.ndim == 3 else -1), -1)

    monkeypatch.setattr(eng, "raw_logprobs", shifted)
    bad = Engine(pipe.model).score(reqs, ids)
    monkeypatch.undo()
    assert max_error(pipe.model, reqs, ids, bad) > 100 * TOL
    assert max_error(pipe.model, reqs, ids, Engine(pipe.model).score(reqs, ids)) <= TOL


@pytest.mark.parametrize("family", ["240728-fixture", "241101", "owl2"])
def test_engine_score_equals_a_full_forward_on_each_family(family, owl3_tiny):
    model = {"240728-fixture": lambda: owl3_tiny, "241101": lambda: random_owl3("241101"),
             "owl2": lambda: random_owl2(seed=3)}[family]()
    size = model.config.vision.image_size
    g = torch.Generator().manual_seed(0)
    reqs = []
    for length, starts in [(12, [2]), (9, []), (20, [1, 5, 6])]:
        ids = torch.randint(10, 900, (length,), generator=g)
        kw = {}
        if starts:
            ids[torch.tensor(starts)] = 7
            kw = dict(image_embeds=features(model, torch.randn(len(starts), 3, size, size, generator=g)),
                      image_positions=torch.tensor(starts))
        reqs.append(Request(ids, **kw))
    conts = [[[5], [17, 30, 31], [40, 41]], [[3, 4, 5, 6]], [[11], [12], [13, 14]]]
    got = Engine(model).score(reqs, conts)
    assert [[len(v) for v in g] for g in got] == [[len(c) for c in cs] for cs in conts]
    assert max_error(model, reqs, conts, got) <= TOL
    with pytest.raises(ValueError, match="continuation"):
        Engine(model).score(reqs[:1], [[[]]])


def run_eval(tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["eval", "--task", "synthetic-distractor", "--limit", "6", "--distractors", "0,1", "--variants", "2",
                 "--cache-dir", str(tmp_path / "data"), "--out", str(out), "--max-new-tokens", "3", *extra]) == 0
    return out


def test_cli_likelihood_scoring_end_to_end(tmp_path, capsys, pipe):
    from hyperowl.eval.tasks import LETTERS, parse_choice

    for scoring in ("likelihood", "likelihood-text"):
        out = run_eval(tmp_path, scoring, "--scoring", scoring)
        rep = json.loads((out / "distractor.json").read_text())
        assert rep["scoring"] == scoring and [r["n"] for r in rep["results"]] == [6, 6]
        for n in (0, 1):
            assert json.loads((out / f"N{n}" / "summary.json").read_text())["scoring"] == scoring
            rows = [json.loads(x) for x in (out / f"N{n}" / "predictions.jsonl").read_text().splitlines()]
            assert len(rows) == 6
            for row in rows:
                assert row["scoring"] == scoring and len(row["option_scores"]) == 2 == len(row["prediction"])
                for pred, sc in zip(row["prediction"], row["option_scores"]):
                    assert len(sc) >= 2 and pred == LETTERS[max(range(len(sc)), key=sc.__getitem__)]
                assert row["picked"] == row["prediction"]
        if scoring == "likelihood":  # the row's scores are the letters' logprobs at the answer position
            from hyperowl.eval.runner import read_predictions

            row = next(iter(read_predictions(out / "N0" / "predictions.jsonl").values()))
            plan_items = {it.id: it for it in
                          harness.prepare("synthetic-distractor", None, tmp_path, limit=6,
                                                        cache_dir=str(tmp_path / "data"), distractors="0").items}
            from hyperowl.eval.distractor import distractor_samples

            s = next(x for x in distractor_samples([plan_items[row["id"]]], [], 0, variants=2))
            conv = s.build()[0]
            plan = pipe.processor.plan(conv["messages"], images=conv["images"])
            emb = pipe.encoder.encode_many([plan])[0]
            for j, letter in enumerate(LETTERS[: len(s.choices[0])]):
                tok = pipe.processor.tokenizer.encode(letter, add_special_tokens=False).ids
                ref = full_forward(pipe.model, plan.input_ids, emb, plan.image_positions, tok)[0]
                assert abs(row["option_scores"][0][j] - ref) <= 1e-3
            assert parse_choice(row["prediction"][0], s.choices[0]) == LETTERS.index(row["prediction"][0])
    # a generation run on the same set: the default, recorded as such
    out = run_eval(tmp_path, "generation")
    assert json.loads((out / "N0" / "summary.json").read_text())["scoring"] == "generation"
    # resuming a likelihood output with generation is refused (the rows were scored another way)
    assert main(["eval", "--task", "synthetic-distractor", "--limit", "6", "--distractors", "0,1", "--variants", "2",
                 "--cache-dir", str(tmp_path / "data"), "--out", str(tmp_path / "likelihood")]) == 2
    capsys.readouterr()


def test_cli_scoring_errors_are_one_line(tmp_path, capsys):
    for argv, msg in [(["--task", "synthetic-distractor", "--scoring", "best"], "--scoring 'best': choose one of"),
                      (["--task", "synthetic-single", "--scoring", "likelihood"], "is for multiple-choice tasks"),
                      (["--task", "synthetic-distractor", "--scoring", "likelihood", "--prompt-style", "open"],
                       "use --scoring likelihood-text")]:
        assert main(["eval", "--out", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hyperowl: error:") and msg in err and "\n" not in err


def test_mmbench_circular_and_multi_image_rows(chat_checkpoint, tmp_path):
    """On the Owl3 fixture (a tokenizer made here): MMBench's circular rotations each get their options scored
    (in the order each rotation shows them); multi-image yes/no rows, which have no options, are generated."""
    from hyperowl.eval.runner import read_predictions
    from hyperowl.eval.tasks import LETTERS

    model = hyperowl.load(chat_checkpoint)
    plan = harness.prepare("mmbench", str(DATA / "mmbench.tsv"), tmp_path)
    s = harness.run(model, plan, tmp_path / "mmb", max_new_tokens=2, scoring="likelihood-text")
    assert s["scoring"] == "likelihood-text"
    rows = read_predictions(tmp_path / "mmb" / "predictions.jsonl")
    for sample in plan.samples:
        row = rows[sample.id]
        assert len(sample.choices) > 1 and [len(x) for x in row["option_scores"]] == [len(c) for c in sample.choices]
        assert row["prediction"] == [LETTERS[max(range(len(x)), key=x.__getitem__)] for x in row["option_scores"]]
    plan = harness.prepare("multi-image", str(DATA / "multi_image.jsonl"), tmp_path)
    harness.run(model, plan, tmp_path / "mi", max_new_tokens=2, scoring="likelihood")
    rows = read_predictions(tmp_path / "mi" / "predictions.jsonl")
    assert rows["mc-0"]["scoring"] == "likelihood" and len(rows["mc-0"]["option_scores"][0]) == 3
    assert rows["nlvr-0"]["scoring"] == "generation" and "option_scores" not in rows["nlvr-0"]
