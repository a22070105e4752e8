"""Training: data validation, labels, stages, resume after a kill, 2-process DDP == 1 process, LoRA, upgrade."""

import importlib.util
import json
import random
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import hyperowl
from conftest import make_tokenizer
from hyperowl.errors import InputError
from hyperowl.processing.processor import Owl3Processor
from hyperowl.train.data import ConversationDataset, batch_indices, collate_train
from hyperowl.train.recipe import Recipe
from hyperowl.train.trainer import train

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "img").mkdir()
    names = list(COLOURS)
    with open(d / "train.jsonl", "w") as f:
        for i in range(48):
            c = names[i % 4]
            Image.new("RGB", (28, 28), COLOURS[c]).save(d / f"img/{i}.png")
            if i % 3 == 0:  # two-image examples too, so every hyper-attention path trains
                f.write(json.dumps({"messages": [{"role": "user", "content": "<|image|><|image|>Second colour?"},
                                                 {"role": "assistant", "content": names[(i + 1) % 4]}],
                                    "images": [f"img/{i}.png", f"img/{i - 2 if i >= 2 else 1}.png"]}) + "\n")
            else:
                f.write(json.dumps({"messages": [{"role": "user", "content": "<|image|>What colour is it?"},
                                                 {"role": "assistant", "content": c}], "images": [f"img/{i}.png"]}) + "\n")
    return d


@pytest.fixture(scope="module")
def turns_data(colour_data, tmp_path_factory):
    """Conversations of 1 to 3 answers (so rows differ in answer tokens), on colour_data's images."""
    d = tmp_path_factory.mktemp("turns")
    names = list(COLOURS)
    with open(d / "train.jsonl", "w") as f:
        for i in range(16):
            turns = [{"role": "user", "content": "<|image|>What colour is it?"},
                     {"role": "assistant", "content": names[i % 4]}]
            turns += [{"role": "user", "content": "And again?"}, {"role": "assistant", "content": names[i % 4]}] * (i % 3)
            f.write(json.dumps({"messages": turns, "images": [str(colour_data / f"img/{i}.png")]}) + "\n")
    return d


def recipe_for(data_dir, out, **over):
    d = {"init": {"preset": "tiny-240728", "tokenizer": "train", "vocab_size": 300},
         "data": {"train": str(data_dir / "train.jsonl")}, "stage": "instruct",
         "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 8}, "batch_size": 4, "output": str(out),
         "log_every": 1, "save_every": 4}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return Recipe.from_dict(d)


def processor():
    return Owl3Processor(make_tokenizer(), image_size=28, cut=False)


def test_bad_lines_are_reported_with_line_numbers(tmp_path, colour_data):
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "<|image|>Hi"}, {"role": "assistant", "content": "red"}],
                    "images": [str(colour_data / "img/0.png")]}),
        "{broken json",
        json.dumps({"messages": [{"role": "user", "content": "<|image|>Hi"}, {"role": "assistant", "content": "x"}],
                    "images": ["missing.png"]}),
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}],
                    "images": [str(colour_data / "img/0.png")]}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"d\.jsonl:2:"):
        ConversationDataset(tmp_path / "d.jsonl", processor())
    ds = ConversationDataset(tmp_path / "d.jsonl", processor(), on_error="skip")
    assert len(ds) == 1 and [n for n, _ in ds.bad] == [2, 3, 4]
    assert "missing.png" in ds.bad[1][1] and "placeholder" in ds.bad[2][1]


def test_loss_only_on_assistant_tokens(colour_data):
    p = processor()
    ds = ConversationDataset(colour_data / "train.jsonl", p)
    ex = ds[1]
    kept = [t for t in ex.labels.tolist() if t != -100]
    assert p.tokenizer.decode(kept, skip_special_tokens=False) == "green<|im_end|>"
    batch = collate_train([ds[0], ds[1]], pad_id=0)
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_batch_indices_cover_each_example_once_per_epoch():
    seen = [i for s in range(3) for r in range(2) for i in batch_indices(12, 0, s, 0, 4, 1, r, 2)]
    assert sorted(seen) == list(range(12))


def test_group_by_length_keeps_epochs_and_ranks_and_groups_lengths():
    n, bs = 960, 16
    rng = random.Random(0)
    lengths = tuple(rng.choice([50, 100, 400, 900]) + i % 7 for i in range(n))
    steps = n // bs
    plain = [batch_indices(n, 0, s, 0, bs, 1, 0, 1) for s in range(steps)]
    grouped = [batch_indices(n, 0, s, 0, bs, 1, 0, 1, lengths, 10) for s in range(steps)]
    assert sorted(i for b in grouped for i in b) == list(range(n))  # still every example once per epoch
    assert grouped != plain and grouped == [batch_indices(n, 0, s, 0, bs, 1, 0, 1, lengths, 10) for s in range(steps)]
    # The same global batch split over two ranks (what DDP runs see) and over two micro-batches.
    for s in range(3):
        ranks = [i for r in range(2) for i in batch_indices(n, 0, s, 0, bs, 1, r, 2, lengths, 10)]
        micro = [i for m in range(2) for i in batch_indices(n, 0, s, m, bs // 2, 2, 0, 1, lengths, 10)]
        assert ranks == grouped[s] == micro
    padded = [sum(max(lengths[i] for i in b) for b in bb) for bb in (plain, grouped)]
    assert padded[1] < 0.7 * padded[0], padded  # batches padded to their longest row: much less padding
    # Second epoch: another order, still a permutation.
    second = [i for s in range(steps, 2 * steps) for i in batch_indices(n, 0, s, 0, bs, 1, 0, 1, lengths, 10)]
    assert sorted(second) == list(range(n)) and second != [i for b in grouped for i in b]


def test_train_converges_saves_official_layout_and_chats(tmp_path, colour_data):
    out = train(recipe_for(colour_data, tmp_path / "run", optim={"max_steps": 30}, eval_every=10,
                           data={"val": str(colour_data / "train.jsonl")}))
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0]
    names = set(load_file(str(out / "final" / "model.safetensors")))
    assert "language_model.model.layers.0.self_attn.v_kv_proj.weight" in names and "vision2text_model.weight" in names
    assert (out / "loss.png").stat().st_size > 1000
    model = hyperowl.load(out / "final", device="cpu")
    answer = model.chat([{"role": "user", "content": "<|image|>What colour is it?"}],
                        images=[str(colour_data / "img/0.png")], max_new_tokens=3)
    assert isinstance(answer, str)


def test_loader_workers_train_exactly_like_the_loop(tmp_path, colour_data):
    """data.workers: micro-batches prepared in loader processes are the ones the loop would read (same losses,
    same weights, with gradient accumulation and a resume offset); a bad example raised in a worker is the
    same one-line InputError; bad values are refused."""
    over = {"optim": {"max_steps": 5}, "grad_accum": 2, "batch_size": 2, "save_every": 0, "num_threads": 1}
    a = train(recipe_for(colour_data, tmp_path / "loop", data={"workers": 0}, **over))
    b = train(recipe_for(colour_data, tmp_path / "workers", data={"workers": 2}, **over))
    la, lb = ([json.loads(l)["loss"] for l in (d / "log.jsonl").read_text().splitlines()] for d in (a, b))
    assert len(la) == 5 and la == lb
    wa, wb = (load_file(str(d / "final" / "model.safetensors")) for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    from hyperowl.train.data import StepBatches, step_loader
    data = ConversationDataset(colour_data / "train.jsonl", processor())
    from_3 = list(step_loader(StepBatches(data, 3, 6, 0, 4, 2, 0, 1, None, 0, 0), 2))
    loop = [collate_train([data[i] for i in batch_indices(len(data), 0, s, m, 4, 2, 0, 1)]) for s in (3, 4, 5)
            for m in (0, 1)]
    assert len(from_3) == 6 and all(torch.equal(x["input_ids"], y["input_ids"]) and
                                    torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(from_3, loop))

    with pytest.raises(InputError, match="max_length 5") as e:
        train(recipe_for(colour_data, tmp_path / "long", data={"workers": 1, "max_length": 5}, **over))
    assert "Traceback" not in str(e.value)
    for bad in (-1, "two", True):
        with pytest.raises(InputError, match="data.workers"):
            recipe_for(colour_data, tmp_path / "x", data={"workers": bad})


def test_loss_weighting_weighs_conversations_as_configured(tmp_path, turns_data):
    """loss_weighting: the logged loss of step 1 (the initial weights) is the token mean (token), the mean of
    the conversations' own means (sample) or their 1/sqrt(n)-weighted mean (square), recomputed here from the
    model and batch; bad values are refused."""
    import torch.nn.functional as F
    from hyperowl.train.data import StepBatches
    from hyperowl.train.build import build
    from hyperowl.train.losses import expand_labels

    over = {"optim": {"max_steps": 1}, "batch_size": 8, "save_every": 0, "num_threads": 1}
    for mode, power in (("token", 0.0), ("square", 0.5), ("sample", 1.0)):
        recipe = recipe_for(turns_data, tmp_path / mode, loss_weighting=mode, **over)
        out = train(recipe)
        logged = json.loads((out / "log.jsonl").read_text().splitlines()[0])
        torch.manual_seed(recipe.seed)
        model, proc, _ = build(recipe, torch.device("cpu"))
        data = ConversationDataset(turns_data / "train.jsonl", proc)
        b = expand_labels(model, StepBatches(data, 0, 1, recipe.seed, 8, 1, 0, 1, None, 0, 0)[0])
        with torch.no_grad():
            logits = model(b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                           image_positions=b["image_positions"]).logits
        labels = b["labels"][:, 1:]
        per_tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
        n = (labels != -100).sum(1).double()
        assert len(set(n.tolist())) > 1  # rows differ in answer tokens, so the modes differ
        w = n ** -power
        want = float((per_tok.sum(1).double() * w).sum() / (n * w).sum())
        assert abs(logged["loss"] - want) < 1e-4 * want, (mode, logged, want)
        if power:
            assert abs(logged["token_loss"] - float(per_tok.sum() / n.sum())) < 1e-4 * want
    with pytest.raises(InputError, match="loss_weighting"):
        recipe_for(turns_data, tmp_path / "x", loss_weighting="row")


def test_align_stage_freezes_llm_and_vision(tmp_path, colour_data):
    r = recipe_for(colour_data, tmp_path / "a", stage="align", optim={"max_steps": 3})
    out = train(r)
    final = load_file(str(out / "final" / "model.safetensors"))
    from hyperowl.train.build import build

    init_model, _, _ = build(r, torch.device("cpu"))
    from hyperowl.checkpoint import official_state_dict

    init = official_state_dict(init_model)
    assert torch.equal(final["language_model.model.layers.1.mlp.up_proj.weight"], init["language_model.model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(final["vision_model.embeddings.patch_embedding.weight"], init["vision_model.embeddings.patch_embedding.weight"])
    assert not torch.equal(final["vision2text_model.weight"], init["vision2text_model.weight"])
    assert not torch.equal(final["language_model.model.layers.0.self_attn.v_kv_proj.weight"],
                           init["language_model.model.layers.0.self_attn.v_kv_proj.weight"])


def test_layer_wise_lr_decay_groups():
    from conftest import random_owl3
    from hyperowl.train.optim import param_groups

    model = random_owl3("240728")
    groups = param_groups(model, {"projector": True, "fusion": True, "llm": True, "vision": True}, 1.0, 0.0, 0.9)
    scales = sorted({round(g["lr_scale"], 6) for g in groups})
    assert scales == [round(0.9 ** 2, 6), round(0.9, 6), 1.0]  # embeddings, the one built layer, the rest
    # part_lr multiplies whole parts, on top of the vision decay
    fusion = set(model.fusion_parameters())
    groups = param_groups(model, {"projector": True, "fusion": True, "llm": True, "vision": True}, 1.0, 0.0, 0.9,
                          {"vision": 3.0, "fusion": 2.0})
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["vision.embeddings.patch_embedding.weight"])] == pytest.approx(3.0 * 0.9 ** 2)
    assert scale[id(named[sorted(fusion)[0]])] == 2.0
    assert scale[id(named["decoder.embed_tokens.weight"])] == 1.0
    assert scale[id(named["projector.fc.weight"])] == 1.0


def test_part_lr_is_validated():
    from hyperowl.errors import InputError
    from hyperowl.train.recipe import Recipe

    with pytest.raises(InputError, match="part_lr"):
        Recipe.from_dict({"optim": {"part_lr": {"visoin": 3.0}}})
    with pytest.raises(InputError, match="part_lr"):
        Recipe.from_dict({"optim": {"part_lr": {"vision": -1}}})


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "hyperowl.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env or ENV)


def write_recipe(path, data_dir, out, **over):
    import yaml

    r = recipe_for(data_dir, out, **over).to_dict()
    path.write_text(yaml.safe_dump(r))
    return path


def test_resume_after_kill_equals_uninterrupted(tmp_path, colour_data):
    full = write_recipe(tmp_path / "full.yaml", colour_data, tmp_path / "full")
    part = write_recipe(tmp_path / "part.yaml", colour_data, tmp_path / "part")
    assert run_cli("train", str(full)).returncode == 0
    killed = run_cli("train", str(part), "--stop-after", "6")
    assert killed.returncode != 0 and (tmp_path / "part" / "checkpoint-4").exists()
    assert not (tmp_path / "part" / "final").exists()
    resumed = run_cli("train", str(part), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "full" / "log.jsonl").read_text().splitlines())}
    lb = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "part" / "log.jsonl").read_text().splitlines())}
    assert all(la[s] == lb[s] for s in la)


def torchrun_failure(r) -> str:
    """The worker's own error lines (torchrun's summary alone does not say what went wrong)."""
    lines = r.stderr.splitlines()
    errs = [l for l in lines if "Error" in l or "error:" in l]
    return "\n".join(errs[:20] + lines[-15:])


def test_two_process_ddp_and_fsdp_match_single_process(tmp_path, colour_data, turns_data):
    one = write_recipe(tmp_path / "one.yaml", colour_data, tmp_path / "one", optim={"max_steps": 4}, num_threads=1)
    two = write_recipe(tmp_path / "two.yaml", colour_data, tmp_path / "two", optim={"max_steps": 4}, num_threads=1)
    assert run_cli("train", str(one)).returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                        "-m", "hyperowl.cli", "train", str(two)], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, torchrun_failure(r)
    three = write_recipe(tmp_path / "three.yaml", colour_data, tmp_path / "fsdp", optim={"max_steps": 4}, num_threads=1)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
                        "-m", "hyperowl.cli", "train", str(three), "--fsdp"], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, torchrun_failure(r)
    la = [json.loads(l)["loss"] for l in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    lc = [json.loads(l)["loss"] for l in (tmp_path / "fsdp" / "log.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == len(lc) == 4
    assert la[-1] < la[0]
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4  # DDP
    assert max(abs(x - y) for x, y in zip(la, lc)) < 1e-4  # FSDP2
    assert (tmp_path / "fsdp" / "final" / "model.safetensors").exists()
    # loss_weighting square on rows of different answer lengths: the normaliser is summed over processes
    sq1 = write_recipe(tmp_path / "sq1.yaml", turns_data, tmp_path / "sq1", optim={"max_steps": 4}, num_threads=1,
                       loss_weighting="square")
    sq2 = write_recipe(tmp_path / "sq2.yaml", turns_data, tmp_path / "sq2", optim={"max_steps": 4}, num_threads=1,
                       loss_weighting="square")
    assert run_cli("train", str(sq1)).returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29535",
                        "-m", "hyperowl.cli", "train", str(sq2)], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, torchrun_failure(r)
    la = [json.loads(l)["loss"] for l in (tmp_path / "sq1" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "sq2" / "log.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 4 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-4
    # a phased recipe: the process group lives across the phases, each phase starts from the last's model
    phases = [{"optim": {"max_steps": 2}}, {"data": {"train": str(turns_data / "train.jsonl")}, "optim": {"max_steps": 2}}]
    ph1 = write_recipe(tmp_path / "ph1.yaml", colour_data, tmp_path / "ph1", num_threads=1, phases=phases)
    ph2 = write_recipe(tmp_path / "ph2.yaml", colour_data, tmp_path / "ph2", num_threads=1, phases=phases)
    assert run_cli("train", str(ph1)).returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29536",
                        "-m", "hyperowl.cli", "train", str(ph2)], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, torchrun_failure(r)
    la = [json.loads(l) for l in (tmp_path / "ph1" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (tmp_path / "ph2" / "log.jsonl").read_text().splitlines()]
    assert [x["phase"] for x in lb] == [1, 1, 2, 2] and (tmp_path / "ph2" / "final" / "model.safetensors").exists()
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(la, lb)) < 1e-4


def test_lora_trains_adapters_only_and_merges(tmp_path, colour_data):
    r = recipe_for(colour_data, tmp_path / "lora", stage="custom", trainable={"projector": True},
                   lora={"r": 4, "alpha": 8}, optim={"max_steps": 4})
    out = train(r)
    from hyperowl.train.build import build

    init_model, _, _ = build(recipe_for(colour_data, tmp_path / "lora"), torch.device("cpu"))
    from hyperowl.checkpoint import official_state_dict

    init = official_state_dict(init_model)
    final = load_file(str(out / "final" / "model.safetensors"))
    assert set(final) == set(init)  # merged: plain official names, no adapter tensors
    changed = [k for k in init if not torch.equal(init[k], final[k])]
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in changed  # merged adapter
    assert "language_model.model.embed_tokens.weight" not in changed  # not adapted, not trained
    adapters = load_file(str(out / "checkpoint-4" / "trainer_state" / "adapters.safetensors"))
    assert adapters and all("lora_" in k for k in adapters)


def test_upgrade_text_llm_keeps_text_behaviour(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    qcfg = transformers.Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    qwen = transformers.Qwen2ForCausalLM(qcfg).eval()
    qwen.save_pretrained(tmp_path / "qwen", safe_serialization=True)
    make_tokenizer(300).save(str(tmp_path / "qwen" / "tokenizer.json"))
    sig = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                                          num_attention_heads=2, image_size=28, patch_size=14))
    sig.save_pretrained(tmp_path / "siglip", safe_serialization=True)
    r = run_cli("upgrade", "--text-llm", str(tmp_path / "qwen"), "--vision", str(tmp_path / "siglip"),
                "--hyper-layers", "2", "--out", str(tmp_path / "owl"))
    assert r.returncode == 0, r.stderr
    model = hyperowl.load(tmp_path / "owl", device="cpu")
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert (model(ids).logits - qwen(ids).logits).abs().max() < 1e-4
        a = model.decoder.layers[1].self_attn
        w = a.v_kv_proj.weight.view(2, 2, 16, 64)  # [kv_head, {K,V}, D, H]
        assert torch.equal(w[:, 0], a.k_proj.weight.view(2, 16, 64)) and torch.equal(w[:, 1], a.v_proj.weight.view(2, 16, 64))
    assert model.processor is not None  # the media tokens were added to the text tokenizer
    with torch.no_grad():
        out = model.chat([{"role": "user", "content": "<|image|>Hi"}], images=[Image.new("RGB", (28, 28))], max_new_tokens=2)
    assert isinstance(out, str)


def test_bad_recipe_is_a_clear_error(tmp_path):
    (tmp_path / "r.yaml").write_text("optim: {lrr: 1}\n")
    r = run_cli("train", str(tmp_path / "r.yaml"))
    assert r.returncode == 2 and "lrr" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("plot-log", str(tmp_path / "nope.jsonl"))
    assert r.returncode == 2 and "nope.jsonl" in r.stderr


def test_activation_checkpointing_gives_the_same_gradients():
    from conftest import random_owl3

    model = random_owl3("240728").train()
    ids = torch.randint(10, 1000, (2, 12))
    pv, pos = torch.randn(3, 3, 28, 28), torch.tensor([[2, 5], [3, -1]])
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.decoder.activation_checkpointing = flag
        model(ids, pixel_values=pv, image_positions=pos, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_answer_losses_equal_the_full_head_loss_with_gradients():
    """The trainer's head-only-where-labelled loss == cross-entropy over the full [B, L, V] logits, per row and
    in every gradient; and logits_at picks the rows' positions in row-major order."""
    import torch.nn.functional as F
    from conftest import random_owl3
    from hyperowl.train.losses import answer_losses

    model = random_owl3("240728").train()
    ids = torch.randint(10, 1000, (3, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 4:7], labels[1, 9:], labels[2, 5] = ids[0, 4:7], ids[1, 9:], ids[2, 5]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    b = {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": torch.randn(4, 3, 28, 28),
         "image_positions": torch.tensor([[2, 5], [3, -1], [1, -1]])}
    got = answer_losses(model, b, "cpu")
    got.sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(ids, attention_mask=mask, pixel_values=b["pixel_values"], image_positions=b["image_positions"]).logits
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="none").view(3, 11).sum(1)
    want.sum().backward()
    assert torch.allclose(got, want, atol=1e-5) and bool((want > 0).all())
    assert len(fast) > 10 and all(torch.allclose(fast[n], p.grad, atol=1e-6) for n, p in model.named_parameters()
                                  if p.grad is not None)
    at = torch.zeros_like(ids, dtype=torch.bool)
    at[2, 4], at[0, 1], at[0, 8] = True, True, True
    with torch.no_grad():
        packed = model(ids, attention_mask=mask, pixel_values=b["pixel_values"], image_positions=b["image_positions"],
                       logits_at=at).logits
    assert torch.allclose(packed, logits.detach()[[0, 0, 2], [1, 8, 4]], atol=1e-5)


def test_init_schemes():
    """normal: every matrix N(0, 0.02); fan_in: N(0, 1/fan_in), residual outputs scaled down by depth."""
    from conftest import random_owl3
    from hyperowl.train.build import init_weights

    model = random_owl3("240728")
    named = dict(model.named_parameters())
    q, o = "decoder.layers.0.self_attn.q_proj.weight", "decoder.layers.0.self_attn.o_proj.weight"
    init_weights(model, 0, "normal")
    assert named[q].std().item() == pytest.approx(0.02, rel=0.1)
    assert named[o].std().item() == pytest.approx(0.02, rel=0.1)
    init_weights(model, 0, "fan_in")
    fan_in, layers = named[q].shape[1], len(model.decoder.layers)
    assert named[q].std().item() == pytest.approx(fan_in ** -0.5, rel=0.1)
    assert named[o].std().item() == pytest.approx(named[o].shape[1] ** -0.5 / (2 * layers) ** 0.5, rel=0.1)
    assert named["decoder.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert all(float(p.detach().abs().max()) == 0 for n, p in named.items() if n.endswith("bias"))
    with pytest.raises(InputError, match="scheme"):
        init_weights(model, 0, "xavier")
    with pytest.raises(InputError, match="init.scheme"):
        Recipe.from_dict({"init": {"preset": "tiny-240728", "scheme": "xavier"}})


def test_preset_hyper_layers_override(tmp_path, colour_data):
    """init.hyper_layers with a preset replaces the preset's hyper layers (bad ones: a clear recipe error)."""
    from hyperowl.train.build import build

    model, _, _ = build(recipe_for(colour_data, tmp_path / "h", init={"hyper_layers": [2, 4]}), torch.device("cpu"))
    assert model.config.hyper_layers == (2, 4)
    assert [i for i in range(4) if model.config.is_hyper(i)] == [1, 3]
    default, _, _ = build(recipe_for(colour_data, tmp_path / "d"), torch.device("cpu"))
    assert default.config.hyper_layers == (1, 3)
    with pytest.raises(InputError, match="hyper_layers"):
        build(recipe_for(colour_data, tmp_path / "b", init={"hyper_layers": [5]}), torch.device("cpu"))


def test_preset_llm_shape_override(tmp_path, colour_data):
    """init.llm changes the preset's LM shape (the tower keeps the preset's); unknown fields, bad values and
    init.llm without a preset are clear recipe errors."""
    from hyperowl.config import PRESETS
    from hyperowl.train.build import build

    over = {"num_layers": 6, "hidden_size": 96, "num_heads": 3, "num_kv_heads": 1}
    model, _, _ = build(recipe_for(colour_data, tmp_path / "l", init={"llm": over, "hyper_layers": [3, 6]}),
                        torch.device("cpu"))
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (6, 96, 3, 1)
    assert len(model.decoder.layers) == 6 and model.decoder.embed_tokens.weight.shape[1] == 96
    assert [i for i in range(6) if cfg.is_hyper(i)] == [2, 5]
    assert cfg.vision == PRESETS["tiny-240728"].vision
    for bad, match in (({"hidden": 96}, "init.llm"), ({"num_layers": 0}, "positive"), ({"num_layers": "six"}, "positive"),
                       ({"num_heads": 5}, "divide"), ({"num_layers": 2}, "hyper_layers")):
        with pytest.raises(InputError, match=match):
            build(recipe_for(colour_data, tmp_path / "b", init={"llm": bad}), torch.device("cpu"))
    with pytest.raises(InputError, match="init.llm"):
        Recipe.from_dict({"init": {"from": "x", "llm": {"num_layers": 2}}})


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_phases_are_the_runs_one_after_another_and_resume_after_kill(tmp_path, colour_data, turns_data):
    # A phased recipe must be exactly its phases run by hand, each from the previous final model with the
    # seed + k - 1 default; killed inside phase 2, --resume skips phase 1 and continues phase 2.
    phases = [{"optim": {"max_steps": 4}},
              {"data": {"train": str(turns_data / "train.jsonl")}, "optim": {"warmup_steps": 1, "max_steps": 6}}]
    # one thread everywhere: in-process runs and CLI processes must sum in the same order (bit equality)
    full = write_recipe(tmp_path / "full.yaml", colour_data, tmp_path / "full", save_every=2, phases=phases, num_threads=1)
    part = write_recipe(tmp_path / "part.yaml", colour_data, tmp_path / "part", save_every=2, phases=phases, num_threads=1)
    r = run_cli("train", str(full))
    assert r.returncode == 0, r.stderr
    train(recipe_for(colour_data, tmp_path / "h1", save_every=2, optim={"max_steps": 4}, num_threads=1))
    second = recipe_for(turns_data, tmp_path / "h2", save_every=2, seed=1, optim={"warmup_steps": 1, "max_steps": 6},
                        num_threads=1)
    train(Recipe.from_dict({**second.to_dict(), "init": {"from": str(tmp_path / "h1" / "final")}}))
    a, h = _weights(tmp_path / "full"), _weights(tmp_path / "h2")
    assert all(torch.equal(a[k], h[k]) for k in a)
    assert not all(torch.equal(a[k], _weights(tmp_path / "h1")[k]) for k in a)  # phase 2 did train
    log_full = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [(x["phase"], x["step"]) for x in log_full] == [(1, s) for s in range(1, 5)] + [(2, s) for s in range(5, 11)]
    assert (tmp_path / "full" / "loss.png").is_file() or importlib.util.find_spec("matplotlib") is None

    killed = run_cli("train", str(part), "--stop-after", "7")
    assert killed.returncode != 0 and (tmp_path / "part" / "phase-2" / "checkpoint-2").exists()
    assert not (tmp_path / "part" / "final").exists()
    resumed = run_cli("train", str(part), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "train phase 2/2" in resumed.stderr and "phase 1/2" not in resumed.stderr  # phase 1 was done
    b = _weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_part = [json.loads(x) for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert {x["step"]: x["loss"] for x in log_part} == {x["step"]: x["loss"] for x in log_full}


def test_bad_phases_are_clear_errors(tmp_path, colour_data):
    for phases, match in [([{"output": "x"}], "phase 1: 'output' cannot be set"),
                          ([{}, {"optim": {"max_step": 3}}], "phase 2: optim: unknown key 'max_step'"),
                          ([{}, {"stage": "nope"}], "phase 2: stage must be"),
                          ([3], "phases must be a list of partial recipes"),
                          ({"a": 1}, "phases must be a list")]:
        with pytest.raises(InputError, match=match):
            recipe_for(colour_data, tmp_path / "o", phases=phases)
    # phases merge onto the recipe as it is now, and a phase's stage is not overridden by the base's stage
    r = recipe_for(colour_data, tmp_path / "o", trainable={"vision": False}, phases=[{}, {"stage": "align"}])
    r.data.train = "elsewhere.jsonl"
    p1, p2 = r.phase_recipes()
    assert p1.data.train == p2.data.train == "elsewhere.jsonl" and p2.init.from_ == str(tmp_path / "o" / "phase-1" / "final")
    assert p1.trainable["llm"] and not p2.trainable["llm"] and not p2.trainable["vision"] and p2.trainable["fusion"]
    # a phase's missing data file is found before phase 1 trains, not after it
    with pytest.raises(InputError, match="phase 2: training data '.*nope.jsonl': no such file"):
        train(recipe_for(colour_data, tmp_path / "o", phases=[{}, {"data": {"train": str(tmp_path / "nope.jsonl")}}]))
    assert not (tmp_path / "o" / "phase-1").exists()
    y = write_recipe(tmp_path / "p.yaml", colour_data, tmp_path / "o", phases=[{}])
    r = run_cli("train", str(y), "--max-steps", "3")
    assert r.returncode != 0 and "set optim.max_steps in each phase" in r.stderr and "Traceback" not in r.stderr


def test_phases_check_a_data_file_once(tmp_path, colour_data, turns_data, monkeypatch):
    # Each phase builds its dataset, but a file checked in an earlier phase (unchanged) is not read again:
    # verifying 48,000 conversations' images took ~16 s per phase. Touching the file makes it read again.
    import hyperowl.train.data as data_mod

    calls = []
    check = data_mod._check_record
    monkeypatch.setattr(data_mod, "_check_record", lambda *a, **k: calls.append(1) or check(*a, **k))
    turns = str(turns_data / "train.jsonl")
    phases = [{"optim": {"max_steps": 1}}, {"data": {"train": turns}, "optim": {"max_steps": 1}},
              {"optim": {"max_steps": 1}}, {"data": {"train": turns}, "optim": {"max_steps": 1}}]
    train(recipe_for(colour_data, tmp_path / "o", save_every=0, phases=phases))
    assert len(calls) == 48 + 16
    calls.clear()
    checked = {}
    for _ in range(2):
        ds = ConversationDataset(turns, processor(), checked=checked)
    assert len(calls) == 16 and len(ds) == 16
    st = os.stat(turns)
    os.utime(turns, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    ConversationDataset(turns, processor(), checked=checked)
    assert len(calls) == 32
