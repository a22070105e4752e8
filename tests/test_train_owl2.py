"""Training mPLUG-Owl2: answer-only labels, label expansion, a short run that learns and saves a loadable
official-layout checkpoint, the paper's two stages, layer-wise LR decay on the ViT, the modality-adaptive
init from the LLM, an upgrade from a text LLaMA, resume after a kill and 2-process DDP == 1 process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import hyperowl
from hyperowl.config import OWL2_PRESETS
from hyperowl.models.owl2 import Owl2Model
from hyperowl.processing.owl2 import Owl2Processor, render_owl2, tokenizer_image_token
from hyperowl.train.data import ConversationDataset, collate_train
from hyperowl.train.recipe import Recipe, resolve_trainable
from hyperowl.train.build import build
from hyperowl.train.losses import expand_labels
from hyperowl.train.tokenizer import train_tokenizer
from hyperowl.train.trainer import train

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("owl2data")
    (d / "img").mkdir()
    names = list(COLOURS)
    with open(d / "train.jsonl", "w") as f:
        for i in range(32):
            c = names[i % 4]
            Image.new("RGB", (28, 28), COLOURS[c]).save(d / f"img/{i}.png")
            if i % 4 == 3:  # two images, and a second turn: several answers and image rows per example
                msgs = [{"role": "user", "content": "<|image|>What colour is it?"}, {"role": "assistant", "content": c},
                        {"role": "user", "content": "And <|image|> this one?"}, {"role": "assistant", "content": names[(i + 1) % 4]}]
                f.write(json.dumps({"messages": msgs, "images": [f"img/{i}.png", f"img/{i - 2}.png"]}) + "\n")
            else:
                f.write(json.dumps({"messages": [{"role": "user", "content": "<|image|>What colour is it?"},
                                                 {"role": "assistant", "content": c}], "images": [f"img/{i}.png"]}) + "\n")
    return d


@pytest.fixture(scope="module")
def processor(colour_data):
    return Owl2Processor(train_tokenizer(colour_data / "train.jsonl", 300, owl2=True), image_size=28)


def recipe_for(data_dir, out, **over):
    d = {"init": {"preset": "owl2-tiny", "tokenizer": "train", "vocab_size": 300},
         "data": {"train": str(data_dir / "train.jsonl")}, "stage": "instruct",
         "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 8}, "batch_size": 4, "output": str(out),
         "log_every": 1, "save_every": 4, "num_threads": 1}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return Recipe.from_dict(d)


def random_owl2(seed=0):
    torch.manual_seed(seed)
    model = Owl2Model(OWL2_PRESETS["owl2-tiny"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ffn_ln" in name:
                p.copy_((1 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else 0.05 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


# -- labels -------------------------------------------------------------------------------------------------
def test_training_example_labels_exactly_the_answers(processor, colour_data):
    img = Image.new("RGB", (28, 28), COLOURS["red"])
    msgs = [{"role": "user", "content": "<|image|>What colour is it?"}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And <|image|> this one?"}, {"role": "assistant", "content": "blue"}]
    inputs, labels = processor.training_example(msgs, images=[img, img])
    tok = processor.tokenizer
    ids = inputs.input_ids.tolist()
    assert len(labels) == len(ids) and ids[0] == tok.token_to_id("<s>")
    kept = [t for t in labels.tolist() if t != -100]
    assert tok.decode(kept, skip_special_tokens=False) == " red</s> blue</s>"
    assert kept.count(tok.token_to_id("</s>")) == 2  # the end-of-turn token is a target
    # labelled positions are exactly the answer tokens, in place (label == input id there)
    lab = labels.tolist()
    assert all(lab[j] == ids[j] for j in range(len(ids)) if lab[j] != -100)
    assert all(lab[p] == -100 for p in inputs.image_positions.tolist())
    # the ids are the inference tokenisation of the whole conversation ...
    full, pos = tokenizer_image_token(render_owl2(msgs, add_generation_prompt=False), lambda t: tok.encode(t).ids,
                                      tok.token_to_id("<s>"), processor.image_token_id)
    assert ids == full and inputs.image_positions.tolist() == pos
    # ... and the context of each answer is exactly the inference prompt for that turn
    for turn in (1, 3):
        prompt = processor(msgs[:turn], images=[img, img][: (turn + 1) // 2]).input_ids.tolist()
        assert ids[: len(prompt)] == prompt
        assert labels[len(prompt) - 1] == -100 and labels[len(prompt)] != -100
    # the dataset and the batcher take the Owl2 processor as they take the Owl3 one
    ds = ConversationDataset(colour_data / "train.jsonl", processor)
    ex = ds[3]
    assert tok.decode([t for t in ex.labels.tolist() if t != -100], skip_special_tokens=False) == " yellow</s> red</s>"
    b = collate_train([ds[0], ds[3]], pad_id=0)
    assert b["labels"].shape == b["input_ids"].shape and b["image_positions"].tolist()[0][1] == -1


def test_expanded_labels_match_the_model_and_the_logits(processor, colour_data):
    ds = ConversationDataset(colour_data / "train.jsonl", processor)
    model = random_owl2()
    b = collate_train([ds[0], ds[3], ds[1]], pad_id=0)
    e = expand_labels(model, b)
    t = model.config.tokens_per_image
    n_img = int((b["image_positions"] >= 0).sum())
    assert e["labels"].shape == (3, b["labels"].shape[1] + int((b["image_positions"] >= 0).sum(1).max()) * (t - 1))
    assert int((e["labels"] != -100).sum()) == int((b["labels"] != -100).sum()) > 0  # same targets, moved
    with torch.no_grad():
        out = model(b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                    image_positions=b["image_positions"], labels=b["labels"])
    assert out.logits.shape[1] == e["labels"].shape[1] and torch.equal(out.labels, e["labels"])
    assert n_img == b["pixel_values"].shape[0]
    assert not bool((e["labels"] != -100)[out.modality_indicators.bool()].any())  # no target on an image row
    # aligned: the batched (left-padded, expanded) summed loss equals the sum over the rows run alone
    import torch.nn.functional as F

    def summed(batch):  # summed CE + the summed target logits (which tell positions apart even near-uniform)
        with torch.no_grad():
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                           image_positions=batch["image_positions"]).logits[:, :-1].flatten(0, 1)
        labels = batch["labels"][:, 1:].flatten()
        on = labels != -100
        return float(F.cross_entropy(logits, labels, reduction="sum")) + 100 * float(logits[on].gather(1, labels[on, None]).sum())

    alone = sum(summed(expand_labels(model, collate_train([ds[i]], pad_id=0))) for i in (0, 3, 1))
    assert summed(e) == pytest.approx(alone, rel=1e-4, abs=1e-3)
    shifted = {**e, "labels": torch.cat([e["labels"][:, 1:], torch.full_like(e["labels"][:, :1], -100)], 1)}
    assert summed(shifted) != pytest.approx(alone, rel=1e-4, abs=1e-1)  # a misaligned label map would be caught


# -- a short run ----------------------------------------------------------------------------------------------
def test_owl2_train_learns_saves_official_layout_and_loads(tmp_path, colour_data):
    out = train(recipe_for(colour_data, tmp_path / "run", optim={"max_steps": 30}, eval_every=15,
                           data={"val": str(colour_data / "train.jsonl")}))
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0]
    sd = load_file(str(out / "final" / "model.safetensors"))
    assert "model.layers.0.self_attn.k_proj.multiway.1.weight" in sd and "model.visual_abstractor.query_embeds" in sd
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "mplug_owl2"
    owl = hyperowl.load(out / "final", device="cpu")
    assert isinstance(owl.model, Owl2Model) and isinstance(owl.processor, Owl2Processor)
    # read back with identical weights: saving the loaded model again gives the same tensors, bit for bit
    from hyperowl.checkpoint import save_owl2

    again = load_file(str(save_owl2(owl.model, tmp_path / "again") / "model.safetensors"))
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)
    with torch.no_grad():
        answer = owl.chat([{"role": "user", "content": "<|image|>What colour is it?"}],
                            images=[str(colour_data / "img/0.png")], max_new_tokens=3)
    assert isinstance(answer, str)
    # fine-tuning goes on from the saved Owl2 checkpoint (init.from dispatches on its model_type)
    more = train(recipe_for(colour_data, tmp_path / "more", init={"from": str(out / "final"), "preset": None, "tokenizer": None,
                                                                    "vocab_size": None}, optim={"max_steps": 2}, save_every=0))
    after = load_file(str(more / "final" / "model.safetensors"))
    assert set(after) == set(sd) and not torch.equal(after["model.layers.0.mlp.up_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"])


def _official(model):
    from hyperowl.checkpoint import save_owl2
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return load_file(str(save_owl2(model, d) / "model.safetensors"))


def test_stage1_freezes_the_llm_and_trains_vision_abstractor_visual_kv(tmp_path, colour_data):
    r = recipe_for(colour_data, tmp_path / "s1", stage="align", optim={"max_steps": 3})
    assert r.trainable["vision"] is None and resolve_trainable(r.trainable, "mplug_owl2")["vision"] is True
    assert resolve_trainable(r.trainable, "mplugowl3")["vision"] is False  # Owl3's align is unchanged
    out = train(r)
    final = load_file(str(out / "final" / "model.safetensors"))
    init_model, _, _ = build(r, torch.device("cpu"))
    init = _official(init_model)
    for i in range(init_model.config.num_layers):  # the preset model starts with visual norms/K/V = the LLM's
        for part in ("self_attn.k_proj", "self_attn.v_proj", "input_layernorm", "post_attention_layernorm"):
            assert torch.equal(init[f"model.layers.{i}.{part}.multiway.1.weight"], init[f"model.layers.{i}.{part}.multiway.0.weight"])
    same = [k for k in init if torch.equal(init[k], final[k])]
    changed = [k for k in init if k not in same]
    llm = [k for k in init if not k.startswith(("model.vision_model.", "model.visual_abstractor.")) and ".multiway.1." not in k]
    assert llm and set(llm) <= set(same)  # embeddings, text norms/K/V, Q/O, MLP, final norm, lm_head: bit-identical
    for k in ("model.vision_model.embeddings.patch_embed.weight", "model.vision_model.encoder.layers.0.mlp.fc1.weight",
              "model.visual_abstractor.query_embeds", "model.visual_abstractor.visual_fc.weight",
              "model.layers.0.self_attn.k_proj.multiway.1.weight", "model.layers.3.self_attn.v_proj.multiway.1.weight",
              "model.layers.1.input_layernorm.multiway.1.weight"):
        assert k in changed, k
    # an explicit choice wins over the model default
    r2 = recipe_for(colour_data, tmp_path / "s1b", stage="align", trainable={"vision": False}, optim={"max_steps": 1})
    final2 = load_file(str(train(r2) / "final" / "model.safetensors"))
    assert torch.equal(final2["model.vision_model.embeddings.patch_embed.weight"], init["model.vision_model.embeddings.patch_embed.weight"])
    assert not torch.equal(final2["model.visual_abstractor.query_embeds"], init["model.visual_abstractor.query_embeds"])


def test_parts_and_layer_wise_lr_decay_on_the_vit():
    from hyperowl.train.optim import param_groups

    model = random_owl2()
    fusion = set(model.fusion_parameters())
    assert len(fusion) == 4 * model.config.num_layers  # 2 norms + K + V per layer (no attention bias)
    assert all(".multiway.1." in n for n in fusion)
    groups = param_groups(model, {"projector": True, "fusion": True, "llm": True, "vision": True}, 1.0, 0.0, 0.9)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    n = model.config.vision.num_layers  # 2
    assert scale[id(named["vision.embeddings.patch_embed.weight"])] == pytest.approx(0.9 ** (n + 1))
    assert scale[id(named["vision.layers.0.mlp.fc1.weight"])] == pytest.approx(0.9 ** n)
    assert scale[id(named["vision.layers.1.mlp.fc1.weight"])] == pytest.approx(0.9)
    assert scale[id(named["vision.post_layernorm.weight"])] == 1.0
    assert scale[id(named["abstractor.query_embeds"])] == 1.0 and scale[id(named["decoder.layers.0.mlp.up_proj.weight"])] == 1.0
    # stage 1: exactly abstractor + ViT + visual multiway parts train
    param_groups(model, resolve_trainable({"projector": True, "fusion": True, "llm": False, "vision": None}, "mplug_owl2"),
                 1.0, 0.0, 0.9)
    on = {k for k, p in model.named_parameters() if p.requires_grad}
    assert on == {k for k in named if k.startswith(("vision.", "abstractor."))} | fusion


def test_bf16_autocast_training_step_runs():
    """The trainer's CUDA bf16 path, on CPU autocast: fp32 weights, bf16 matmuls, bf16 image rows written
    into the fp32 token rows (expand_rows must cast, not fail on mixed dtypes)."""
    model = random_owl2().train()
    ids = torch.randint(5, 300, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, pixel_values=torch.randn(3, 3, 28, 28), image_positions=torch.tensor([[1, 4], [2, -1]]), labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits.shape[1] == 8 + 2 * (model.config.tokens_per_image - 1)
    assert model.vision.embeddings.patch_embed.weight.grad is not None
    assert model.decoder.layers[0].self_attn.k_proj.multiway[1].weight.grad.abs().sum() > 0


def test_init_visual_from_text_copies_norms_and_kv():
    from hyperowl.train.upgrade import init_visual_from_text

    model = random_owl2()
    layer = model.decoder.layers[2]
    assert not torch.equal(layer.self_attn.k_proj.multiway[1].weight, layer.self_attn.k_proj.multiway[0].weight)
    assert init_visual_from_text(model) == 4 * model.config.num_layers
    for layer in model.decoder.layers:
        for m in (layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.k_proj, layer.self_attn.v_proj):
            assert torch.equal(m.multiway[0].weight, m.multiway[1].weight)
    # with equal sides, visual rows go through the decoder exactly like text rows
    from hyperowl.models.llama import make_owl2_context

    x, visual = torch.randn(1, 6, 64), torch.tensor([[False, True, True, True, False, False]])
    ctx = make_owl2_context(model.config, torch.arange(6)[None], torch.ones(1, 6, dtype=torch.bool), 0, None)
    with torch.no_grad():
        h = model.decoder(x, ctx, None)
        assert h.abs().mean() > 0.1 and (model.decoder(x, ctx, visual) - h).abs().max() < 1e-5
        model.decoder.layers[0].input_layernorm.multiway[1].weight.mul_(2.0)
        assert (model.decoder(x, ctx, visual) - h).abs().max() > 1e-2  # the check is sensitive to the visual side


def test_upgrade_owl2_from_text_llama(tmp_path, colour_data):
    transformers = pytest.importorskip("transformers")
    from hyperowl.train.upgrade import upgrade_owl2

    torch.manual_seed(0)
    lcfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    llama = transformers.LlamaForCausalLM(lcfg).eval()
    llama.save_pretrained(tmp_path / "llama", safe_serialization=True)
    train_tokenizer(colour_data / "train.jsonl", 300, owl2=True).save(str(tmp_path / "llama" / "tokenizer.json"))
    model = upgrade_owl2(tmp_path / "llama", OWL2_PRESETS["owl2-tiny"]).model.eval()
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert (model(ids).logits - llama(ids).logits).abs().max() < 1e-4
    a = model.decoder.layers[1]
    assert torch.equal(a.self_attn.v_proj.multiway[1].weight, llama.model.layers[1].self_attn.v_proj.weight)
    assert torch.equal(a.post_attention_layernorm.multiway[1].weight, llama.model.layers[1].post_attention_layernorm.weight)
    # the recipe path: init.text_llm (LLaMA) + init.preset (the visual side), stage 1 for 2 steps
    r = recipe_for(colour_data, tmp_path / "up", init={"preset": "owl2-tiny", "text_llm": str(tmp_path / "llama"),
                                                         "tokenizer": None, "vocab_size": None},
                   stage="align", optim={"max_steps": 2}, save_every=0)
    out = train(r)
    final = load_file(str(out / "final" / "model.safetensors"))
    sd = llama.state_dict()
    assert torch.equal(final["model.layers.0.mlp.up_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(final["model.layers.0.self_attn.k_proj.multiway.0.weight"], sd["model.layers.0.self_attn.k_proj.weight"])
    assert not torch.equal(final["model.layers.0.self_attn.k_proj.multiway.1.weight"], sd["model.layers.0.self_attn.k_proj.weight"])
    assert hyperowl.load(out / "final", device="cpu").processor.image_token_id is not None


def test_owl2_lora_adapts_text_and_visual_kv_and_merges(tmp_path, colour_data):
    r = recipe_for(colour_data, tmp_path / "lora", stage="custom", trainable={"projector": True},
                   lora={"r": 4, "alpha": 8}, optim={"max_steps": 4})
    out = train(r)
    init = _official(build(recipe_for(colour_data, tmp_path / "lora"), torch.device("cpu"))[0])
    final = load_file(str(out / "final" / "model.safetensors"))
    assert set(final) == set(init)  # merged: plain official names, no adapter tensors
    changed = {k for k in init if not torch.equal(init[k], final[k])}
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.multiway.0.weight",
              "model.layers.0.self_attn.v_proj.multiway.1.weight", "model.layers.2.mlp.down_proj.weight",
              "model.visual_abstractor.query_embeds"):
        assert k in changed, k
    assert "model.embed_tokens.weight" not in changed and "model.vision_model.embeddings.patch_embed.weight" not in changed
    adapters = load_file(str(out / "checkpoint-4" / "trainer_state" / "adapters.safetensors"))
    assert adapters and all("lora_" in k for k in adapters)
    assert isinstance(hyperowl.load(out / "final", device="cpu").model, Owl2Model)


def test_max_length_counts_the_image_rows(processor, colour_data):
    rows = OWL2_PRESETS["owl2-tiny"].tokens_per_image
    n_text = len(ConversationDataset(colour_data / "train.jsonl", processor)[0].labels)
    ok = ConversationDataset(colour_data / "train.jsonl", processor, max_length=n_text + rows - 1, rows_per_image=rows)
    assert len(ok[0].labels) == n_text
    short = ConversationDataset(colour_data / "train.jsonl", processor, max_length=n_text + rows - 2, rows_per_image=rows)
    with pytest.raises(hyperowl.InputError, match=f"{n_text + rows - 1} tokens > data.max_length"):
        short[0]


# -- resume and DDP -------------------------------------------------------------------------------------------
def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hyperowl.cli", *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def write_recipe(path, data_dir, out, **over):
    import yaml

    path.write_text(yaml.safe_dump(recipe_for(data_dir, out, **over).to_dict()))
    return path


def test_owl2_resume_after_kill_equals_uninterrupted(tmp_path, colour_data):
    full = write_recipe(tmp_path / "full.yaml", colour_data, tmp_path / "full", stage="align")
    part = write_recipe(tmp_path / "part.yaml", colour_data, tmp_path / "part", stage="align")
    r = run_cli("train", str(full))
    assert r.returncode == 0, r.stderr[-2000:]
    killed = run_cli("train", str(part), "--stop-after", "6")
    assert killed.returncode != 0 and (tmp_path / "part" / "checkpoint-4").exists()
    assert not (tmp_path / "part" / "final").exists()
    resumed = run_cli("train", str(part), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    init = _official(build(recipe_for(colour_data, tmp_path / "x", stage="align"), torch.device("cpu"))[0])
    assert not torch.equal(a["model.vision_model.encoder.layers.1.mlp.fc2.weight"], init["model.vision_model.encoder.layers.1.mlp.fc2.weight"])
    la = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "full" / "log.jsonl").read_text().splitlines())}
    lb = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "part" / "log.jsonl").read_text().splitlines())}
    assert all(la[s] == lb[s] for s in la)


def test_owl2_two_process_ddp_and_fsdp_match_single_process(tmp_path, colour_data):
    one = write_recipe(tmp_path / "one.yaml", colour_data, tmp_path / "one", optim={"max_steps": 4}, save_every=0)
    two = write_recipe(tmp_path / "two.yaml", colour_data, tmp_path / "two", optim={"max_steps": 4}, save_every=0)
    r = run_cli("train", str(one))
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29543",
                        "-m", "hyperowl.cli", "train", str(two)], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    la = [json.loads(l)["loss"] for l in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 4 and la[-1] < la[0]
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4
    three = write_recipe(tmp_path / "three.yaml", colour_data, tmp_path / "fsdp", optim={"max_steps": 4}, save_every=0)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29544",
                        "-m", "hyperowl.cli", "train", str(three), "--fsdp"], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    lc = [json.loads(l)["loss"] for l in (tmp_path / "fsdp" / "log.jsonl").read_text().splitlines()]
    assert len(lc) == 4 and max(abs(x - y) for x, y in zip(la, lc)) < 1e-4  # FSDP2
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    for other in ("two", "fsdp"):
        b = load_file(str(tmp_path / other / "final" / "model.safetensors"))
        assert set(a) == set(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
