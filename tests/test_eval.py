"""Exact-match evaluation: predictions + summary, per-group accuracy, resume, errors."""

import json

import pytest
from PIL import Image

import hyperowl
from hyperowl.errors import InputError
from hyperowl.eval.runner import evaluate, load_records, normalize


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldata")
    Image.new("RGB", (28, 28), (200, 0, 0)).save(d / "r.png")
    rows = [
        {"id": "a", "task": "single/colour", "messages": [{"role": "user", "content": "<|image|>Colour?"},
                                                          {"role": "assistant", "content": "red"}], "images": ["r.png"]},
        {"id": "b", "task": "single/shape", "messages": [{"role": "user", "content": "<|image|>Shape?"}],
         "images": ["r.png"], "answer": "square"},
        {"id": "c", "task": "multi/same", "messages": [{"role": "user", "content": "<|image|><|image|>Same?"}],
         "images": ["r.png", "r.png"], "answer": "yes"},
    ]
    (d / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d / "test.jsonl"


def test_evaluate_writes_predictions_summary_and_resumes(chat_checkpoint, eval_data, tmp_path):
    model = hyperowl.load(chat_checkpoint)
    s = evaluate(model, eval_data, tmp_path, batch_size=2, max_new_tokens=3)
    preds = [json.loads(l) for l in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == ["a", "b", "c"]
    assert s["n"] == 3 and set(s["groups"]) == {"single", "multi"}
    assert s["accuracy"] == sum(p["correct"] for p in preds) / 3
    # a fake 'correct' prediction already on disk is trusted on resume: nothing is recomputed
    fake = dict(preds[0], prediction="red", correct=True)
    (tmp_path / "predictions.jsonl").write_text("\n".join(json.dumps(p) for p in [fake] + preds[1:]) + "\n")
    s2 = evaluate(model, eval_data, tmp_path, batch_size=2, max_new_tokens=3)
    assert s2["groups"]["single"]["accuracy"] >= 0.5
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 3


def test_resume_refuses_rows_of_another_model(chat_checkpoint, eval_data, tmp_path):
    # A retrained model at the same path must not inherit the old model's predictions (this happened:
    # scripts/train_embedded.sh re-evaluated into the same --out and "resumed" all 1000 old rows).
    import torch

    model = hyperowl.load(chat_checkpoint)
    evaluate(model, eval_data, tmp_path, batch_size=2, max_new_tokens=3)
    p = next(model.parameters())
    kept = p.detach().clone()
    with torch.no_grad():
        p.mul_(1.5)  # the "retrained" model
    with pytest.raises(InputError, match="another model"):
        evaluate(model, eval_data, tmp_path, batch_size=2, max_new_tokens=3)
    with torch.no_grad():
        p.copy_(kept)
    s = evaluate(model, eval_data, tmp_path, batch_size=2, max_new_tokens=3)  # the same weights resume
    assert s["computed"] == 0 and s["n"] == 3


def test_records_and_normalization(eval_data, tmp_path):
    recs = load_records(eval_data)
    assert recs[0]["answer"] == "red" and recs[0]["messages"][-1]["role"] == "user"
    assert normalize("  Image 2. ") == "image 2"
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(InputError, match="bad.jsonl:1"):
        load_records(tmp_path / "bad.jsonl")
