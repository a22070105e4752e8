"""The embedded default model: it loads offline, answers the README's quickstart questions, and its
training recipe runs (a few steps on a tiny synthetic set: the smoke version of scripts/train_embedded.sh)."""

import json
from pathlib import Path

import pytest

import hyperowl
from hyperowl.train.recipe import Recipe
from hyperowl.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "owl3-synthetic"


@pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="embedded model not built yet")
def test_embedded_model_answers_the_examples():
    model = hyperowl.load()
    assert model.checkpoint_dir.resolve() == MODEL.resolve()
    examples = json.loads((ROOT / "examples" / "examples.json").read_text())
    right = 0
    for ex in examples:
        key = "videos" if ex["file"].endswith(".mp4") else "images"
        tag = "<|video|>" if key == "videos" else "<|image|>"
        answer = model.chat([{"role": "user", "content": tag + ex["question"]}], **{key: [str(ROOT / "examples" / ex["file"])]},
                            max_new_tokens=12)
        right += answer.strip().lower() == ex["answer"]
    assert right >= len(examples) - 1  # a trained model, not a random one


def test_embedded_recipe_smoke(tmp_path):
    from hyperowl.data.synthetic import write_dataset

    write_dataset(tmp_path / "synth", {"train": 24, "val": 4, "test": 4}, seed=1)
    r = Recipe.from_yaml(ROOT / "recipes" / "embedded.yaml")
    r.data.train = str(tmp_path / "synth" / "train.jsonl")
    r.data.val = str(tmp_path / "synth" / "val.jsonl")
    r.optim.max_steps, r.optim.warmup_steps, r.batch_size, r.log_every, r.save_every = 2, 1, 4, 1, 0
    r.output = str(tmp_path / "run")
    out = train(r)
    assert (out / "final" / "model.safetensors").exists()
    assert hyperowl.load(out / "final").config.hidden_size == 256
