"""The embedded default model: it loads offline, it answers from the images (not from text priors), the
README's first command gets the right answer, and its training recipe runs (a few steps on a tiny
synthetic set: the smoke version of scripts/train_embedded.sh)."""

import json
from pathlib import Path

import pytest
import yaml

import hyperowl
from hyperowl.eval.runner import evaluate
from hyperowl.train.recipe import Recipe
from hyperowl.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "hyperowl" / "assets" / "owl3-synthetic"
# Measured on the shipped model (120 fresh single-image questions, seed 4242): 0.86 with the true images,
# 0.20 with each question given another example's image. Bounds leave margin for CPU numerics.
TRUE_MIN, GAP_MIN = 0.70, 0.40
needs_model = pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="embedded model not built yet")


@pytest.fixture(scope="module")
def model():
    m = hyperowl.load()
    assert m.checkpoint_dir.resolve() == MODEL.resolve()
    return m


@needs_model
def test_readme_first_command_answer(model):
    ex = json.loads((ROOT / "examples" / "examples.json").read_text())[0]
    answer = model.chat([{"role": "user", "content": "<|image|>" + ex["question"]}], images=[str(ROOT / "examples" / ex["file"])],
                        max_new_tokens=8)
    assert answer.strip().lower() == ex["answer"]


@needs_model
def test_answers_come_from_the_images(model, tmp_path):
    """Fresh single-image questions (a seed the training data never used): accuracy with the true images must
    be high, and must fall when each question gets another example's image (a model answering from text
    priors alone would score the same on both)."""
    from hyperowl.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "synth", {"test": {"single": 120}}, seed=4242, progress=False)["test"]
    records = [json.loads(line) for line in data.read_text().splitlines()]
    swapped = tmp_path / "synth" / "swapped.jsonl"
    swapped.write_text("".join(json.dumps({**r, "images": records[(i + 1) % len(records)]["images"]}) + "\n"
                               for i, r in enumerate(records)))
    true_acc = evaluate(model, data, tmp_path / "true", batch_size=16)["accuracy"]
    swapped_acc = evaluate(model, swapped, tmp_path / "swapped", batch_size=16)["accuracy"]
    assert true_acc >= TRUE_MIN, (true_acc, swapped_acc)
    assert true_acc - swapped_acc >= GAP_MIN, (true_acc, swapped_acc)


@pytest.mark.parametrize("recipe,drawn", [("embedded.yaml", 0.0), ("embedded-drawn.yaml", 0.5)])
def test_embedded_recipe_smoke(tmp_path, recipe, drawn):
    """scripts/train_embedded.sh in miniature (as shipped: DRAWN=0.5, and the plain DRAWN=0): stage 0 (tower pretraining) then
    the recipe from its tower."""
    from hyperowl.config import PRESETS
    from hyperowl.data.synthetic import write_dataset
    from hyperowl.train.vision_pretrain import pretrain_vision

    write_dataset(tmp_path / "synth", {"train": 24, "val": 4, "test": 4}, seed=1, drawn=drawn)  # as the script
    scenes = [tmp_path / "synth" / "val.scenes.txt", tmp_path / "synth" / "test.scenes.txt"]
    write_dataset(tmp_path / "video", {"train": 8}, seed=2, tasks=["video"], exclude=scenes, progress=False, drawn=drawn)
    pretrain_vision(PRESETS["owl3-synthetic"].vision, tmp_path / "vision", steps=2, batch_size=4, eval_every=2,
                    exclude=scenes, progress=False, drawn=drawn, free=1.0 if drawn else 0.0)
    raw = yaml.safe_load((ROOT / "recipes" / recipe).read_text())
    assert raw["init"]["vision"] == "runs/vision-synthetic"  # what scripts/train_embedded.sh writes
    # Every phase that names its own data reads a file scripts/train_embedded.sh writes (video-only conversations;
    # the drawn recipe also direction videos).
    written = {"data/synth-video/train.jsonl", "data/synth-direction/train.jsonl"}
    videos = {k for k, p in enumerate(raw["phases"]) if "train" in p.get("data", {})}
    assert videos and {raw["phases"][k]["data"]["train"] for k in videos} <= written, raw["phases"]
    raw["init"]["vision"] = str(tmp_path / "vision")
    raw["data"].update(train=str(tmp_path / "synth" / "train.jsonl"), val=str(tmp_path / "synth" / "val.jsonl"))
    raw.update(batch_size=4, log_every=1, save_every=0, output=str(tmp_path / "run"))
    phases = [{**p, "optim": {**p.get("optim", {}), "max_steps": 1, "warmup_steps": 0}} for p in raw["phases"]]
    for k in videos:  # (a checkout without data/ must not find the real files)
        phases[k]["data"] = {**phases[k]["data"], "train": str(tmp_path / "video" / "train.jsonl")}
    raw["phases"] = phases
    out = train(Recipe.from_dict(raw))
    assert (out / "final" / "model.safetensors").exists()
    assert hyperowl.load(out / "final").config.hidden_size == 256
    assert [json.loads(line)["phase"] for line in (out / "log.jsonl").read_text().splitlines()] == \
        list(range(1, len(phases) + 1))
