"""Stage 0 (dense vision-tower pretraining): patch labels against a pixel oracle, exclusion of held-out
images, the SigLIP-layout output, and a recipe that starts a preset's model from the pretrained tower."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hyperowl.checkpoint import official_state_dict
from hyperowl.config import PRESETS
from hyperowl.data import synthetic as syn
from hyperowl.errors import CheckpointError, InputError
from hyperowl.train.recipe import Recipe
from hyperowl.train.build import build
from hyperowl.train.vision_pretrain import SceneStream, pretrain_vision, read_excluded
from test_train import ENV, colour_data  # noqa: F401  (fixture)

TINY = PRESETS["tiny-240728"].vision  # 28 px, 14 px patches


def oracle_owner(scene: syn.Scene, patch: int) -> np.ndarray:
    """Independent of object_map: render the scene with one object at a time and diff against the empty
    background; a patch belongs to the object changing most of its pixels (>= MIN_PATCH_PIXELS)."""
    empty = np.asarray(syn.render(syn.Scene((), scene.background, scene.image_size, scene.bg_variant))).astype(int)
    g = scene.image_size // patch
    counts = np.zeros((g * g, len(scene.objects)), int)
    for i, o in enumerate(scene.objects):
        alone = np.asarray(syn.render(syn.Scene((o,), scene.background, scene.image_size, scene.bg_variant))).astype(int)
        covered = (alone != empty).any(-1)
        counts[:, i] = covered.reshape(g, patch, g, patch).sum((1, 3)).reshape(-1)
    return np.where(counts.max(1) >= syn.MIN_PATCH_PIXELS, counts.argmax(1) + 1, 0)


def test_patch_labels_match_a_pixel_oracle():
    rng = random.Random(3)
    checked = 0
    for _ in range(40):
        scene = syn.random_scene(rng, 64)
        labels, owner = syn.patch_labels(scene, 8)
        want = oracle_owner(scene, 8)
        # The oracle's diff misses object pixels that happen to equal the background (never: light grays vs
        # saturated colours), so owners must agree exactly.
        assert np.array_equal(owner, want)
        for p in np.flatnonzero(owner):
            o = scene.objects[owner[p] - 1]
            r, c = scene.cell(o)
            assert tuple(labels[p]) == (1 + syn.KINDS.index(o.kind), 1 + syn.COLOUR_NAMES.index(o.colour),
                                        1 + syn.SIZES.index(o.size), 1 + 3 * r + c)
            checked += 1
        assert (labels[owner == 0] == 0).all()
    assert checked > 100
    with pytest.raises(ValueError, match="multiple of patch size"):
        syn.patch_labels(scene, 7)


def test_scene_stream_never_draws_excluded_images():
    first = SceneStream(TINY, seed=11, record=True)
    first.batch(30)
    banned = set(list(first.drawn)[:10])
    stream = SceneStream(TINY, seed=11, exclude=banned, record=True)
    pixels, labels, owner = stream.batch(30)
    assert stream.skipped >= 10 and not (stream.drawn & banned)
    assert pixels.shape == (30, 3, 28, 28) and labels.shape == (30, 4, 4) and owner.shape == (30, 4)


def test_pretrain_writes_a_siglip_tower_that_a_recipe_loads(tmp_path, colour_data):  # noqa: F811
    out = tmp_path / "tower"
    summary = pretrain_vision(TINY, out, steps=30, batch_size=8, lr=3e-3, warmup=5, eval_every=15, progress=False)
    log = [json.loads(line) for line in (out / "pretrain.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [15, 30] and summary["accuracy"] == {k: log[-1][k] for k in summary["accuracy"]}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "siglip_vision_model" and cfg["num_hidden_layers"] == TINY.num_layers
    saved = load_file(str(out / "model.safetensors"))
    # Owl3 layers only (the unused last SigLIP layer is not stored), in the official key layout.
    assert {k.split(".")[3] for k in saved if ".encoder.layers." in k} == {str(i) for i in range(TINY.num_layers - 1)}

    recipe = Recipe.from_dict({"init": {"preset": "tiny-240728", "tokenizer": "train", "vocab_size": 300, "vision": str(out)},
                               "data": {"train": str(colour_data / "train.jsonl")}, "output": str(tmp_path / "run")})
    model, _, _ = build(recipe, torch.device("cpu"))
    ours = official_state_dict(model)
    for k, t in saved.items():
        assert torch.equal(ours[k], t), k
    # The LM is the preset's fresh init (same seed -> same weights as a run without init.vision).
    plain = Recipe.from_dict({**recipe.to_dict(), "init": {"preset": "tiny-240728", "tokenizer": "train", "vocab_size": 300}})
    plain_sd = official_state_dict(build(plain, torch.device("cpu"))[0])
    assert torch.equal(plain_sd["vision2text_model.weight"], ours["vision2text_model.weight"])
    assert not torch.equal(plain_sd["vision_model.embeddings.patch_embedding.weight"],
                           ours["vision_model.embeddings.patch_embedding.weight"])


def test_init_vision_shape_mismatch_and_owl2_are_clear_errors(tmp_path, colour_data):  # noqa: F811
    out = tmp_path / "tower"
    pretrain_vision(TINY, out, steps=1, batch_size=2, eval_every=1, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48}))
    recipe = Recipe.from_dict({"init": {"preset": "tiny-240728", "tokenizer": "train", "vocab_size": 300, "vision": str(out)},
                               "data": {"train": str(colour_data / "train.jsonl")}, "output": str(tmp_path / "run")})
    with pytest.raises(CheckpointError, match="hidden_size: 48 vs 32"):
        build(recipe, torch.device("cpu"))
    recipe.init.vision = str(tmp_path)  # a directory without config.json
    with pytest.raises(CheckpointError, match="no config.json; pass a checkpoint directory"):
        build(recipe, torch.device("cpu"))
    owl2 = Recipe.from_dict({"init": {"preset": "owl2-tiny", "tokenizer": "train", "vocab_size": 300, "vision": str(out)},
                             "data": {"train": str(colour_data / "train.jsonl")}, "output": str(tmp_path / "run2")})
    with pytest.raises(InputError, match="Owl3 presets only"):
        build(owl2, torch.device("cpu"))


def test_exclude_reads_the_scenes_files_data_synth_writes(tmp_path):
    """--exclude takes `hyperowl data synth`'s own <split>.scenes.txt: every test image's hash is excluded."""
    syn.write_dataset(tmp_path, {"train": {"single": 4}, "test": {"single": 6}}, seed=2, progress=False)
    scenes = tmp_path / "test.scenes.txt"
    assert read_excluded([scenes]) == syn.read_scene_hashes(scenes)[0]
    rendered = {e.scenes[0].hash for e in syn.iter_examples("test", n_single=6, seed=2, exclude_hashes=
                                                            syn.read_scene_hashes(tmp_path / "train.scenes.txt")[0])}
    assert rendered and rendered <= read_excluded([scenes])
    bad = tmp_path / "bad.scenes.txt"
    bad.write_bytes(b"\xb9\x00garbage")
    with pytest.raises(InputError, match="bad.scenes.txt: cannot read it as a scenes file"):
        read_excluded([bad])
    bad.write_text("abc\n")
    with pytest.raises(InputError, match=r"bad.scenes.txt:1: expected 'scene_hash<TAB>layout_hash'"):
        read_excluded([bad])


def test_cli_pretrain_vision(tmp_path):
    scenes = tmp_path / "test.scenes.txt"
    first = SceneStream(TINY, seed=1_000_003, record=True)  # the held-out stream of seed 0
    first.batch(5)
    scenes.write_text("".join(f"{h}\t{'0' * 16}\n" for h in sorted(first.drawn)))  # data synth's format
    r = subprocess.run([sys.executable, "-m", "hyperowl.cli", "pretrain-vision", "--preset", "tiny-240728", "--out",
                        str(tmp_path / "t"), "--steps", "4", "--batch-size", "4", "--eval-every", "2",
                        "--exclude", str(scenes)], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "held-out per-object accuracy kind" in r.stdout
    assert json.loads((tmp_path / "t" / "eval.json").read_text())["skipped_excluded"] >= 5
    bad = subprocess.run([sys.executable, "-m", "hyperowl.cli", "pretrain-vision", "--out", str(tmp_path / "u"),
                          "--exclude", str(tmp_path / "missing.txt")], capture_output=True, text=True, env=ENV, timeout=120)
    assert bad.returncode == 2 and "missing.txt: no such file" in bad.stderr and "Traceback" not in bad.stderr


def test_pair_labels_name_each_colour_kind_pair_once(tmp_path):
    from hyperowl.train.vision_pretrain import PAIR_CLASSES, with_pairs

    kinds, colours = torch.meshgrid(torch.arange(len(syn.KINDS) + 1), torch.arange(len(syn.COLOUR_NAMES) + 1), indexing="ij")
    lab = torch.stack([kinds.flatten(), colours.flatten(), torch.ones(kinds.numel(), dtype=torch.long),
                       torch.ones(kinds.numel(), dtype=torch.long)], -1)
    lab = lab[(lab[:, 0] > 0) == (lab[:, 1] > 0)]  # an object has both a kind and a colour; background neither
    pair = with_pairs(lab)[:, 4]
    obj = lab[:, 0] > 0
    assert (pair[~obj] == 0).all() and pair[obj].unique().numel() == int(obj.sum()) == PAIR_CLASSES - 1
    assert int(pair.min()) >= 0 and int(pair.max()) == PAIR_CLASSES - 1
    summary = pretrain_vision(TINY, tmp_path / "p", steps=2, batch_size=4, eval_every=2, progress=False, pairs=True)
    assert summary["pairs"] and "pair_object" in summary["accuracy"] and "kind_object" in summary["accuracy"]
