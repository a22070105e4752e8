"""Training outputs other tools read: the official config fields and tokenizer/processor files, PEFT adapters."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import hyperowl
import test_train
from hyperowl.checkpoint import official_state_dict, save_checkpoint
from hyperowl.train.recipe import Recipe
from hyperowl.train.trainer import train
from test_train import recipe_for, run_cli

colour_data = test_train.colour_data  # the shared fixture
FIXTURES = Path(__file__).parent / "fixtures"


def missing_fields(ref: dict, ours: dict, at: str = "") -> list[str]:
    """Keys of the official config.json (recursively) that ours lacks or sets differently where it must match."""
    out = []
    for k, v in ref.items():
        if k not in ours:
            out.append(at + k)
        elif isinstance(v, dict) and isinstance(ours[k], dict):
            out += missing_fields(v, ours[k], f"{at}{k}.")
        elif k in ("model_type", "architectures", "auto_map") and ours[k] != v:
            out.append(f"{at}{k}={ours[k]!r}")
    return out


@pytest.mark.parametrize("fixture", ["owl3-240728-tiny", "owl2-tiny"])
def test_saved_config_has_every_official_field(tmp_path, fixture):
    """The official fixture's config.json (written by the official code) is the field list: a checkpoint we save
    has every field of it (auto_map, model_type, architectures, torch_dtype, the LLaMA/Qwen2 config fields...)."""
    model = hyperowl.load(FIXTURES / fixture, device="cpu").model
    save_checkpoint(model, tmp_path / "out")
    ref = json.loads((FIXTURES / fixture / "config.json").read_text())
    ours = json.loads((tmp_path / "out" / "config.json").read_text())
    assert missing_fields(ref, ours) == []
    assert ours["torch_dtype"] == "float32"


def test_checkpoint_tokenizer_files_load_in_transformers_and_peft_export(tmp_path, colour_data):
    """A LoRA run's final model ships tokenizer_config.json/special_tokens_map.json that transformers'
    AutoTokenizer reads as our tokenizer; `hyperowl export --peft` writes adapters that peft loads onto the
    transformers Qwen2 with the official module names, giving our merged model's text logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    r = recipe_for(colour_data, tmp_path / "run", stage="custom", lora={"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
                   optim={"max_steps": 3}, save_every=0, batch_size=2)
    out = train(r)
    final = out / "final"
    # what tokenizer_config.json names (AutoTokenizer resolves it so; here without the official remote code)
    assert json.loads((final / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(final))
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(final / "tokenizer.json"))
    text = "<|im_start|>user\n<|image|>What colour is it?<|im_end|>"
    assert tok(text)["input_ids"] == ours.encode(text).ids
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and "<|image|>" in tok.all_special_tokens

    res = run_cli("export", str(out / "checkpoint-3"), "--peft", "--out", str(tmp_path / "peft"))
    assert res.returncode == 0, res.stderr
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path / "peft"))
    assert (cfg.r, cfg.lora_alpha, cfg.peft_type.value) == (4, 8, "LORA")
    assert "language_model.model.layers.0.self_attn.q_proj" in cfg.target_modules

    # the base weights (the run's starting model) in the transformers Qwen2 under the official names
    from hyperowl.train.build import build

    base, _, _ = build(Recipe.from_dict({**r.to_dict(), "lora": {"r": 0}}), torch.device("cpu"))
    c = base.config.to_hf_dict()
    qcfg = transformers.Qwen2Config(**{k: c[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                         "num_attention_heads", "num_key_value_heads", "rope_theta",
                                                         "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")})

    class Official(torch.nn.Module):  # the official model's module tree around its LLM
        def __init__(self):
            super().__init__()
            self.language_model = transformers.Qwen2ForCausalLM(qcfg)

    official = Official()
    sd = {k: v for k, v in official_state_dict(base).items() if k.startswith("language_model.")}
    wanted = official.state_dict()
    official.load_state_dict({k: v for k, v in sd.items() if k in wanted}, strict=True)
    with_adapters = peft.PeftModel.from_pretrained(official, str(tmp_path / "peft")).eval()
    merged = hyperowl.load(final, device="cpu").model.eval()
    ids = torch.randint(10, 290, (1, 12))
    with torch.no_grad():
        want = merged(ids).logits
        got = with_adapters.base_model.model.language_model(ids).logits
    assert (got - want).abs().max() < 1e-4
    with with_adapters.disable_adapter(), torch.no_grad():
        assert (with_adapters.base_model.model.language_model(ids).logits - want).abs().max() > 1e-3  # adapters matter
    bad = run_cli("export", str(out), "--peft", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "checkpoint-STEP" in bad.stderr and "Traceback" not in bad.stderr


def test_owl2_checkpoint_preprocessor_config_matches_our_processor(tmp_path, colour_data):
    """Owl2's official loader reads CLIPImageProcessor.from_pretrained(dir): the preprocessor_config.json we write
    makes it compute our processor's pixels (the 'crop' path: shortest-edge resize + centre crop, CLIP mean/std)."""
    transformers = pytest.importorskip("transformers")
    from hyperowl.config import OWL2_PRESETS
    from hyperowl.processing.owl2 import preprocess
    from hyperowl.train.interop import write_tokenizer_files
    from hyperowl.train.tokenizer import train_tokenizer

    cfg = OWL2_PRESETS["owl2-tiny"]
    train_tokenizer(colour_data / "train.jsonl", 300, owl2=True).save(str(tmp_path / "tok.json"))
    (tmp_path / "ckpt").mkdir()
    write_tokenizer_files(cfg, tmp_path / "tok.json", tmp_path / "ckpt")
    proc = transformers.CLIPImageProcessor.from_pretrained(str(tmp_path / "ckpt"))
    img = Image.new("RGB", (50, 36))
    img.putdata([(x * 5 % 256, y * 7 % 256, (x * y) % 256) for y in range(36) for x in range(50)])
    theirs = torch.as_tensor(proc(images=img, return_tensors="np")["pixel_values"][0])
    ours = preprocess(img, cfg.vision.image_size, mode="crop")
    assert theirs.shape == ours.shape and (theirs - ours).abs().max() < 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
