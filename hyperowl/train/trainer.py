"""The training loop: one process or many (torchrun), exact resume, metrics log, checkpoints in the official layout.

Design note. One optimizer step consumes a global batch of `batch_size * grad_accum` examples whose
indices are a pure function of (seed, step), split evenly over the processes. The loss is the sum of
token losses divided by the number of target tokens in the whole global batch (counted across micro
batches and processes before any backward), so a 2-process run computes the same gradient as a
1-process run with the same global batch. Multi-process runs wrap the model in DDP (gradients averaged,
hence the loss is scaled by the world size) or, with `fsdp: true`-style use via `--fsdp`, shard it with
FSDP2 per decoder layer.

Checkpoints (`output/checkpoint-STEP/`): config.json + model.safetensors in the official mPLUG-Owl3 layout
(LoRA merged in) + the tokenizer, so `hyperowl.load` and the official loaders read them; and
`trainer_state/` (optimizer moments as safetensors, step, RNG state, LoRA adapters) for an exact resume.
No pickle anywhere. Metrics go to `output/log.jsonl`; `hyperowl plot-log` draws them.

mPLUG-Owl2 trains through the same loop (the model family follows `init`: an Owl2 checkpoint, an
`owl2-*` preset, or `init.text_llm` = a LLaMA checkpoint + `init.preset` = an Owl2 preset for the visual
side). Its processor is `Owl2Processor` (USER/ASSISTANT prompt, loss on each answer and its `</s>`). Owl2
puts each image's rows *into* the LLM sequence, so the logits cover the expanded sequence: every batch's
labels are expanded once with the model's own `expand_rows` (visual rows get -100) before the target
tokens are counted, which keeps the global-token normalisation (DDP == one process) exact. Checkpoints are
written with `save_owl2` (official mPLUG-Owl2 layout); models built from a preset or a text LLaMA start with
the modality-adaptive visual parts equal to the text ones (`upgrade.init_visual_from_text`). Stage `align`
trains the vision tower for Owl2 by default (the paper's pre-training stage), see recipe.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..checkpoint import load_any, save_owl2, save_owl3
from ..config import OWL2_PRESETS, PRESETS
from ..errors import InputError
from ..models.owl2 import Owl2Model, expand_rows
from ..models.owl3 import Owl3Model
from ..processing.owl2 import Owl2Processor
from ..processing.processor import Owl3Processor
from .data import ConversationDataset, StepBatches, collate_train, read_records, step_loader
from .lora import apply_lora, merge_lora
from .optim import lr_at, param_groups, set_lr
from .recipe import INIT_SCHEMES, LOSS_WEIGHTING, Recipe, resolve_trainable

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image|>", "<|video|>",
                  "<|start_cut|>", "<|end_cut|>", "<|start_video_frame|>", "<|end_video_frame|>"]
# LLaMA's ids first (unk 0, BOS 1, EOS 2: the Owl2Config defaults), then the media placeholders.
OWL2_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|image|>", "<|video|>"]


# -- building the model ---------------------------------------------------------------------------------------
def train_tokenizer(jsonl: Path, vocab_size: int, owl2: bool = False):
    """A byte-level BPE trained on the conversations' text, with the chat special tokens first. For Owl2: the
    LLaMA special tokens, and a BOS added to every encoding (as LLaMA's tokenizer does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    def texts():
        with jsonl.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    for m in json.loads(line).get("messages", []):
                        c = m.get("content")
                        yield c if isinstance(c, str) else " ".join(p.get("text", "") for p in c)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=OWL2_SPECIAL_TOKENS if owl2 else SPECIAL_TOKENS,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer)
    if owl2:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


# Residual-branch output projections (scaled down by depth in the fan_in scheme).
_OUT_PROJ = ("o_proj.weight", "down_proj.weight", "out_proj.weight", "mlp.fc2.weight")


def init_weights(model: Owl3Model | Owl2Model, seed: int, scheme: str = "normal") -> None:
    """Random init for training from scratch; unit norms and zero biases in both schemes.

    normal: every matrix and embedding N(0, 0.02) (GPT-2 / HF default).
    fan_in: matrices N(0, 1/fan_in), residual output projections further / sqrt(2 * layers of their stack),
        token/position embeddings N(0, 0.02) (the patch embedding is a matrix). Why it exists: in a narrow
        model (width 128-256) 0.02 is 3-4x below 1/sqrt(width), so attention logits start ~10x flatter. On the
        embedded model it measured no better (README, embedded-model probes); the shipped recipe uses normal.
    """
    if scheme not in INIT_SCHEMES:
        raise InputError(f"recipe: init.scheme {scheme!r} unknown; use one of {', '.join(INIT_SCHEMES)}")
    g = torch.Generator().manual_seed(seed)
    n_llm = max(1, len(getattr(getattr(model, "decoder", None), "layers", [])))
    n_vis = max(1, len(getattr(getattr(model, "vision", None), "layers", [])))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or ".ffn_ln." in name) and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                std = 0.02
                if scheme == "fan_in" and p.ndim >= 2 and ("embed" not in name or "patch_embed" in name) and "query" not in name:
                    std = p[0].numel() ** -0.5
                    if name.endswith(_OUT_PROJ):
                        std /= (2 * (n_vis if name.startswith("vision.") else n_llm)) ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)


def on_rank0(fn) -> None:
    """Run fn on rank 0 while the other processes wait: a file that every rank then reads (the tokenizer)
    must be written once and completely, not by several processes at the same time."""
    if dist.is_initialized():
        if dist.get_rank() == 0:
            fn()
        dist.barrier()
    else:
        fn()


def is_owl2(model: torch.nn.Module) -> bool:
    return isinstance(model, Owl2Model)


def model_type(model: torch.nn.Module) -> str:
    """config.json's model_type of the model family (keys of recipe.MODEL_DEFAULTS)."""
    return "mplug_owl2" if is_owl2(model) else "mplugowl3"


def make_processor(model: Owl3Model | Owl2Model, tok_dir: Path, recipe: Recipe) -> Owl3Processor | Owl2Processor:
    cfg = model.config
    if is_owl2(model):
        proc = Owl2Processor.from_dir(tok_dir, image_size=cfg.vision.image_size, image_aspect_ratio=cfg.image_aspect_ratio,
                                      eos_token_id=cfg.eos_token_id)
        if proc.tokenizer.token_to_id("</s>") is None:
            log.warning("%s: the tokenizer has no </s> token; answers end in the text '</s>' instead", tok_dir)
        return proc
    return Owl3Processor.from_dir(tok_dir, variant=cfg.variant, image_size=cfg.vision.image_size, cut=recipe.data.cut)


def build(recipe: Recipe, device: torch.device) -> tuple[Owl3Model | Owl2Model, Owl3Processor | Owl2Processor, Path | None]:
    """Model + processor from recipe.init; returns the tokenizer.json to ship with checkpoints."""
    init = recipe.init
    if init.from_:
        model = load_any(init.from_, dtype=torch.float32, device=device)  # Owl3 or Owl2, by config.json
        tok_file = model.checkpoint_dir / "tokenizer.json"
        if not tok_file.exists():
            raise InputError(f"init.from '{init.from_}': no tokenizer.json next to the weights")
    elif init.text_llm and init.preset in OWL2_PRESETS:
        from .upgrade import upgrade_owl2

        if init.vision or init.hyper_layers or init.tokenizer:
            raise InputError("recipe: an Owl2 upgrade takes init.text_llm (LLaMA, with its tokenizer.json) + init.preset "
                             "(the visual side's shapes); init.vision, init.hyper_layers and init.tokenizer do not apply")
        model = upgrade_owl2(init.text_llm, OWL2_PRESETS[init.preset], seed=recipe.seed).to(device)
        tok_file = Path(recipe.output) / "tokenizer.json"
        on_rank0(lambda: with_image_token(model.source_dirs[0], tok_file))
    elif init.text_llm or (init.vision and not init.preset):
        from .upgrade import upgrade, with_media_tokens

        if not (init.text_llm and init.vision and init.hyper_layers):
            raise InputError("recipe: an upgrade needs init.text_llm, init.vision and init.hyper_layers")
        model = upgrade(init.text_llm, init.vision, init.hyper_layers, seed=recipe.seed).to(device)
        tok_file = Path(recipe.output) / "tokenizer.json"
        on_rank0(lambda: with_media_tokens(model.source_dirs[0], tok_file))
    elif init.preset:
        owl2 = init.preset in OWL2_PRESETS
        if init.preset not in PRESETS and not owl2:
            raise InputError(f"recipe: unknown preset {init.preset!r}; known: {', '.join([*PRESETS, *OWL2_PRESETS])}")
        preset = OWL2_PRESETS[init.preset] if owl2 else PRESETS[init.preset]
        if owl2 and init.vision:
            raise InputError("recipe: init.vision (a pretrained SigLIP tower) applies to Owl3 presets only")
        Path(recipe.output).mkdir(parents=True, exist_ok=True)
        tok_file = Path(recipe.output) / "tokenizer.json"
        if init.tokenizer == "train":
            def make_tokenizer() -> None:
                if not tok_file.exists():  # a resumed run keeps the tokenizer it started with
                    vocab = init.vocab_size or preset.vocab_size
                    train_tokenizer(Path(recipe.data.train), vocab, owl2=owl2).save(str(tok_file))

            on_rank0(make_tokenizer)  # every rank calls it: the barrier inside must be reached by all
        elif init.tokenizer:
            on_rank0(lambda: shutil.copy(init.tokenizer, tok_file))
        else:
            raise InputError("recipe: init.preset needs init.tokenizer (a tokenizer.json path, or 'train')")
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_file))
        vocab = max(tok.get_vocab_size(), init.vocab_size or 0)
        if owl2:
            from .upgrade import init_visual_from_text

            ids = {k: tok.token_to_id(t) for k, t in (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<unk>"))}
            try:
                cfg = preset.replace(vocab_size=vocab, **{k: v for k, v in ids.items() if v is not None}, **(init.llm or {}))
            except ValueError as e:
                raise InputError(f"recipe: init.llm: {e}") from None
            model = Owl2Model(cfg).to(device)
            init_weights(model, recipe.seed, recipe.init.scheme)
            init_visual_from_text(model)  # the modality-adaptive visual side starts as the LLM's own norms/K/V
        else:
            # init.hyper_layers with a preset: the preset's shapes, these layers as hyper layers
            hyper = {"hyper_layers": tuple(init.hyper_layers)} if init.hyper_layers else {}
            try:
                cfg = preset.replace(vocab_size=vocab, cut_enable=recipe.data.cut, **hyper, **(init.llm or {}))
            except ValueError as e:
                raise InputError(f"recipe: init.hyper_layers / init.llm: {e}") from None
            model = Owl3Model(cfg).to(device)
            init_weights(model, recipe.seed, recipe.init.scheme)
            if init.vision:  # a pretrained tower (e.g. `hyperowl pretrain-vision`) under a fresh LM
                from .upgrade import load_vision_tower

                load_vision_tower(model, init.vision)
    else:
        raise InputError("recipe: init needs 'from', 'preset', 'text_llm' + 'vision' (Owl3) or 'text_llm' + an Owl2 'preset'")
    processor = make_processor(model, tok_file.parent, recipe)
    return model, processor, tok_file


def with_image_token(src_dir: Path, dst: Path) -> Path:
    """A LLaMA tokenizer.json plus `<|image|>` as a special token (the Owl2 placeholder; its id is never embedded)."""
    from tokenizers import AddedToken, Tokenizer

    src = Path(src_dir) / "tokenizer.json"
    if not src.exists():
        raise InputError(f"init.text_llm '{src_dir}': no tokenizer.json; the Owl2 model needs the LLaMA's tokenizer")
    tok = Tokenizer.from_file(str(src))
    from ..processing.chat import IMAGE_TOKEN

    if tok.token_to_id(IMAGE_TOKEN) is None:
        tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    dst.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst))
    return dst


def expand_labels(model: torch.nn.Module, batch: dict) -> dict:
    """Owl2: labels aligned to the expanded sequence the logits cover (each image placeholder -> the image's
    Q + 1 rows, labelled -100), computed by the model's own `expand_rows` on width-1 dummy rows. Owl3: as is."""
    pos = batch["image_positions"]
    if not is_owl2(model) or pos is None:
        return batch
    labels, valid = batch["labels"], batch["attention_mask"].bool()
    n = int((pos >= 0).sum())
    _, _, _, expanded = expand_rows(torch.zeros(*labels.shape, 1), valid, pos, torch.zeros(n, model.config.tokens_per_image, 1),
                                    labels)
    return {**batch, "labels": expanded}


def pad_id(model: torch.nn.Module, processor) -> int:
    if is_owl2(model):
        return model.config.pad_token_id
    return processor.tokenizer.token_to_id("<|endoftext|>") or 0


def save_weights(model: torch.nn.Module, out: Path, params: dict[str, torch.Tensor] | None = None) -> Path:
    """config.json + model.safetensors in the model family's official layout; `params` overrides the model's
    own tensors (merged LoRA weights, a gathered FSDP state dict)."""
    if is_owl2(model):
        from types import SimpleNamespace

        src = model if params is None else SimpleNamespace(config=model.config, named_parameters=lambda: iter(params.items()))
        return save_owl2(src, out)
    return save_owl3(model, out, params=params)


# -- checkpoints ----------------------------------------------------------------------------------------------
def save_checkpoint(model: Owl3Model, opt: torch.optim.Optimizer, step: int, out: Path, tok_file: Path | None,
                    lora: bool, recipe: Recipe) -> Path:
    d = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    state = tmp / "trainer_state"
    state.mkdir(parents=True)
    if lora:  # the official layout gets the merged weights; the adapters are kept for resuming
        from peft.tuners.lora import LoraLayer

        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if "lora_" in n}, str(state / "adapters.safetensors"))
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        for m in layers:
            m.merge()
        merged = {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        for m in layers:
            m.unmerge()
        save_weights(model, tmp, params=merged)
    else:
        save_weights(model, tmp)
    if tok_file is not None and tok_file.exists():
        shutil.copy(tok_file, tmp / "tokenizer.json")
    osd = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, s in osd["state"].items() for k, v in s.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()} | {"rng": torch.get_rng_state()}, str(state / "optimizer.safetensors"))
    groups = [{k: v for k, v in g.items()} for g in osd["param_groups"]]
    (state / "state.json").write_text(json.dumps({"step": step, "param_groups": groups, "recipe": recipe.to_dict()}, indent=1))
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)  # atomic: a kill mid-save never leaves a half checkpoint under the real name
    return d


def checkpoint(model, opt, step, out, tok_file, lora, recipe, rank, sharded) -> Path:
    """Save on rank 0; a sharded (FSDP2) model is first gathered by all ranks (model weights only)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        d = out / f"checkpoint-{step}"
        if rank == 0:
            save_weights(model, d, params=full)
            if tok_file is not None and tok_file.exists():
                shutil.copy(tok_file, d / "tokenizer.json")
        return d
    if rank == 0:
        return save_checkpoint(model, opt, step, out, tok_file, lora, recipe)
    return out / f"checkpoint-{step}"


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
    return steps[-1][1] if steps else None


def restore(model: Owl3Model | Owl2Model, opt: torch.optim.Optimizer, ckpt: Path, lora: bool) -> int:
    state = ckpt / "trainer_state"
    meta = json.loads((state / "state.json").read_text())
    if lora:
        adapters = load_file(str(state / "adapters.safetensors"))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in adapters.items():
                params[k].copy_(v)
    else:
        loaded = load_any(ckpt, dtype=torch.float32, device="cpu")
        src = dict(loaded.named_parameters())
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(src[n].to(p.device))
    tensors = load_file(str(state / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng"))
    st: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        i, name = k.split(".", 1)
        st.setdefault(int(i), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": st, "param_groups": groups})
    return meta["step"]


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the positions whose next token has a label (position t predicts token t + 1)."""
    at = torch.zeros_like(labels, dtype=torch.bool)
    at[:, :-1] = labels[:, 1:] != -100
    return at


def row_losses(logits: torch.Tensor, labels: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """[K, V] logits at the `at` positions (row-major) -> summed cross-entropy of each row [B] (0 if unlabelled)."""
    tok = F.cross_entropy(logits.float(), labels[:, 1:][at[:, :-1]], reduction="none")  # [K]
    return tok.new_zeros(labels.shape[0]).index_add(0, at.nonzero(as_tuple=True)[0], tok)


def answer_losses(net: torch.nn.Module, b: dict, device) -> torch.Tensor:
    """Summed next-token cross-entropy of each row's labelled tokens [B] (0 for a row without labels).

    The head runs only where a label follows (`logits_at`): [K, V] logits instead of [B, L, V]."""
    labels = b["labels"].to(device)
    at = label_positions(labels)
    logits = net(b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                 pixel_values=None if b["pixel_values"] is None else b["pixel_values"].to(device),
                 image_positions=None if b["image_positions"] is None else b["image_positions"].to(device),
                 logits_at=at).logits  # [K, V], row-major
    return row_losses(logits, labels, at)


@torch.no_grad()
def validation_loss(model: Owl3Model | Owl2Model, val: ConversationDataset, pad: int, device, batch_size: int, limit: int = 256) -> float:
    """Per-token loss on the first `limit` validation examples (fixed, so curves are comparable)."""
    model.eval()
    total, n_tok = 0.0, 0
    idx = list(range(min(limit, len(val))))
    for i in range(0, len(idx), batch_size):
        b = expand_labels(model, collate_train([val[j] for j in idx[i : i + batch_size]], pad))
        total += float(answer_losses(model, b, device).sum())
        n_tok += int((b["labels"][:, 1:] != -100).sum())
    return total / max(n_tok, 1)


# -- the loop -------------------------------------------------------------------------------------------------
def recipe_optimizer(model: torch.nn.Module, recipe: Recipe, parts: dict[str, bool]) -> torch.optim.AdamW | None:
    """The recipe's AdamW over the trainable `parts` (sets requires_grad; see optim.param_groups), or None
    when nothing trains. Call it again after FSDP sharding: the groups must hold the sharded parameters."""
    o = recipe.optim
    groups = param_groups(model, parts, o.lr, o.weight_decay, o.layer_decay, o.part_lr)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay) if groups else None


def train(recipe: Recipe, resume: bool = False, stop_after: int | None = None, fsdp: bool = False) -> Path:
    """Run the recipe (its phases in order, if it has any). Returns the output directory (final model under
    output/final). stop_after: a testing aid, die like a killed job after that many steps (all phases counted)."""
    if not recipe.phases:
        return _train_run(recipe, resume, stop_after, fsdp)
    phases = recipe.phase_recipes()
    out = Path(recipe.output)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    _init_process_group(world)  # up front: the processes wait for rank 0's clean-up below
    # Every phase's data, checked before anything trains (a bad path in phase 9 must not cost phases 1-8),
    # once per file (the phases' datasets reuse these reads).
    checked: dict = {}
    for k, phase in enumerate(phases, 1):
        try:
            read_records(phase.data.train, phase.data.on_error, checked=checked)
        except InputError as e:
            raise InputError(f"recipe: phase {k}: {e}") from None
    done = 0
    for k, phase in enumerate(phases, 1):
        steps = phase.optim.max_steps
        finished = (Path(phase.output) / "final" / "config.json").is_file()
        if resume and finished:  # a phase is done once its final model is exported
            log.info("phase %d/%d: done before, skipped (%s)", k, len(phases), phase.output)
        else:
            if rank == 0 and (finished or (not resume and Path(phase.output).exists())):
                shutil.rmtree(phase.output)  # a new run: never continue a previous run's phase
            if world > 1:
                dist.barrier()
            log.info("phase %d/%d: %d steps -> %s", k, len(phases), steps, phase.output)
            _train_run(phase, resume, None if stop_after is None else stop_after - done, fsdp,
                       last=False, desc=f"train phase {k}/{len(phases)}", checked=checked)
        done += steps
        if rank == 0:
            _join_phase_logs(phases, out)
    if rank == 0:
        export = out / "final"
        shutil.rmtree(export, ignore_errors=True)
        shutil.copytree(Path(phases[-1].output) / "final", export)
        (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1))
        _plot_loss(out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


def _init_process_group(world: int) -> None:
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _plot_loss(out: Path) -> None:
    try:
        from .plot import plot_log

        plot_log(out / "log.jsonl", out / "loss.png")
    except ImportError:
        log.info("matplotlib not installed: no loss.png (pip install matplotlib)")


def _join_phase_logs(phases: list[Recipe], out: Path) -> None:
    """<out>/log.jsonl: the phases' logs in order, steps counted across phases, each record with its phase."""
    offset, lines = 0, []
    for k, phase in enumerate(phases, 1):
        f = Path(phase.output) / "log.jsonl"
        if f.is_file():
            for line in f.read_text().splitlines():
                rec = json.loads(line)
                lines.append(json.dumps({**rec, "step": rec["step"] + offset, "phase": k}))
        offset += phase.optim.max_steps
    (out / "log.jsonl").write_text("".join(line + "\n" for line in lines))


def _train_run(recipe: Recipe, resume: bool, stop_after: int | None, fsdp: bool, last: bool = True,
               desc: str = "train", checked: dict | None = None) -> Path:
    """One training run (a recipe without phases, or one phase). last=False keeps the process group up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    _init_process_group(world)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny Adam moments/gradients turn denormal and slow x86 float math ~100x
    if recipe.batch_size % world:
        raise InputError(f"batch_size {recipe.batch_size} must divide by the number of processes {world}")
    torch.manual_seed(recipe.seed)
    out = Path(recipe.output)
    out.mkdir(parents=True, exist_ok=True)

    model, processor, tok_file = build(recipe, device)
    model.decoder.activation_checkpointing = recipe.activation_checkpointing
    trainable_parts = resolve_trainable(recipe.trainable, model_type(model))
    log.info("training parts: %s", ", ".join(k for k, v in trainable_parts.items() if v) or "LoRA adapters only")
    use_lora = recipe.lora.r > 0
    if use_lora:
        apply_lora(model, recipe.lora)
        model.to(device)
    opt = recipe_optimizer(model, recipe, trainable_parts)
    if opt is None:
        raise InputError("recipe: nothing to train (all parts frozen and no LoRA)")
    net: torch.nn.Module = model
    sharded = world > 1 and fsdp
    if sharded:  # FSDP2 replaces the parameters by sharded DTensors: build the optimizer groups afterwards
        if resume or use_lora:
            raise InputError("--fsdp: resuming and LoRA are not supported with FSDP2 yet; use DDP (no --fsdp)")
        from torch.distributed.fsdp import fully_shard

        for layer in model.decoder.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = recipe_optimizer(model, recipe, trainable_parts)
    elif world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    trainable = [p for g in opt.param_groups for p in g["params"]]

    start = 0
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        start = restore(model, opt, ckpt, use_lora)
        log.info("resumed from %s at step %d", ckpt, start)
    if rank == 0:
        (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1))

    rows = model.config.tokens_per_image if is_owl2(model) else 1  # Owl2 images become Q + 1 sequence rows
    data = ConversationDataset(recipe.data.train, processor, recipe.data.on_error, recipe.data.max_frames,
                               recipe.data.cut, recipe.data.max_length, rows_per_image=rows, checked=checked)
    val = None
    if recipe.data.val and recipe.eval_every and rank == 0:
        val = ConversationDataset(recipe.data.val, processor, "skip", recipe.data.max_frames, recipe.data.cut,
                                  recipe.data.max_length, rows_per_image=rows, checked=checked)
    pad = pad_id(model, processor)
    group = recipe.data.group_by_length
    lengths = data.lengths() if group > 0 else None

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if recipe.bf16 and device.type == "cuda"
                else contextlib.nullcontext())

    model.train()
    total = recipe.optim.max_steps
    logf = (out / "log.jsonl").open("a") if rank == 0 else None
    bar = tqdm(total=total, initial=start, desc=desc, disable=rank != 0, dynamic_ncols=True)
    t_last, tok_count = time.perf_counter(), 0
    power = LOSS_WEIGHTING[recipe.loss_weighting]
    workers = recipe.data.workers if recipe.data.workers is not None else (4 if device.type == "cuda" else 0)
    batches = iter(step_loader(StepBatches(data, start, total, recipe.seed, recipe.batch_size, recipe.grad_accum,
                                           rank, world, lengths, group, pad), workers))
    for step in range(start, total):
        lr = lr_at(step, recipe.optim.lr, recipe.optim.warmup_steps, total, recipe.optim.min_lr_ratio)
        set_lr(opt, lr)
        micro = [next(batches) for _ in range(recipe.grad_accum)]
        bad = next((b["error"] for b in micro if "error" in b), None)
        if bad is not None:
            raise InputError(bad)
        micro = [expand_labels(model, b) for b in micro]
        # Per-row answer tokens; a row's tokens weigh rows_n ** -power; the normaliser is the global sum of the
        # weights, so N processes compute the gradient of one (power 0: the mean over all answer tokens).
        rows_n = [(b["labels"][:, 1:] != -100).sum(1).double() for b in micro]
        n_tok = torch.stack([n.sum() for n in rows_n]).sum()
        norm = torch.stack([(n.clamp(min=1) ** (1 - power) * (n > 0)).sum() for n in rows_n]).sum()
        if world > 1:
            dist.all_reduce(n_tok)
            dist.all_reduce(norm)
        loss_sum = torch.zeros((), dtype=torch.float64)
        tok_sum = torch.zeros((), dtype=torch.float64)
        for m, b in enumerate(micro):
            sync = m == len(micro) - 1 or not isinstance(net, torch.nn.parallel.DistributedDataParallel)
            with (contextlib.nullcontext() if sync else net.no_sync()), autocast:
                row = answer_losses(net, b, device)  # [B]: summed over each row's answer tokens
                tok_loss = row.sum()
                obj = tok_loss if power == 0 else (row * rows_n[m].clamp(min=1).to(row) ** -power).sum()
            (obj / norm.clamp(min=1).to(obj) * world).backward()  # DDP and FSDP average gradients over processes
            loss_sum += obj.detach().cpu().double()
            tok_sum += tok_loss.detach().cpu().double()
            tok_count += int(b["attention_mask"].sum())
            if b["image_positions"] is not None and rows > 1:  # Owl2: the images' rows are sequence tokens too
                tok_count += int((b["image_positions"] >= 0).sum()) * (rows - 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, recipe.optim.grad_clip) if recipe.optim.grad_clip else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(loss_sum)
            dist.all_reduce(tok_sum)
        loss = float(loss_sum / norm.clamp(min=1))
        token_loss = float(tok_sum / n_tok.clamp(min=1))
        done = step + 1
        bar.update(1)
        if rank == 0 and (done % recipe.log_every == 0 or done == total or done == start + 1):
            now = time.perf_counter()
            rec = {"step": done, "loss": loss, **({"token_loss": token_loss} if power else {}), "lr": lr,
                   "grad_norm": None if grad_norm is None else float(grad_norm),
                   "tokens_per_s": tok_count * world / max(now - t_last, 1e-9), "time": time.time()}
            t_last, tok_count = now, 0
            if val is not None and (done % recipe.eval_every == 0 or done == total):
                rec["val_loss"] = validation_loss(model, val, pad, device, recipe.batch_size)
                model.train()
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if recipe.save_every and done % recipe.save_every == 0 and done < total:
            checkpoint(model, opt, done, out, tok_file, use_lora, recipe, rank, sharded)
        if stop_after is not None and done >= stop_after:  # testing aid: die like a killed job
            os._exit(3)
    bar.close()
    final = checkpoint(model, opt, total, out, tok_file, use_lora, recipe, rank, sharded)
    if rank == 0:
        export = out / "final"
        shutil.rmtree(export, ignore_errors=True)
        export.mkdir()
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            if (final / name).exists():
                shutil.copy(final / name, export / name)
        logf.close()
        _plot_loss(out)
    if world > 1:
        dist.barrier()  # the next phase (or the caller) reads this run's final model
        if last:
            dist.destroy_process_group()
    return out
