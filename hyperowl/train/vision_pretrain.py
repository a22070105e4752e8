"""Stage 0 for models trained from scratch: dense supervised pretraining of the vision tower.

Design note: the official Owl3 starts from a SigLIP tower pretrained on billions of image-text pairs; a model
trained from nothing on this project's synthetic world has no such tower, and end-to-end training through
a language model teaches it only a few answer tokens per image. There, shape and position stayed at chance
for the whole 60-minute budget (README, "The embedded default model"). This stage gives the tower what
SigLIP pretraining gives a real one, cheaply: scenes are generated on the fly (never the same twice), and
every patch token is classified - the kind, colour, size and grid cell of the object covering it, or
background - by one linear head on the features an Owl3 model reads (the penultimate SigLIP layer).
That is ~64 labels per image instead of one answer, and it trains the tower in minutes on a CPU.

Output: a SigLIP-layout checkpoint (config.json with `model_type: siglip_vision_model`, model.safetensors
with `vision_model.*` keys) holding the layers an Owl3 model uses - as in Owl3 checkpoints, the last SigLIP
layer, unused by Owl3, is not stored - plus `pretrain.jsonl` (the log) and `eval.json` (held-out accuracy per
label, per patch and per object). A recipe starts a model from it with
`init: {preset: ..., tokenizer: ..., vision: <this dir>}`.
Scenes whose image hash is listed in an `exclude` file (`<split>.scenes.txt` of `hyperowl data synth`) are
never drawn, so the tower never sees a validation or test image.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from ..checkpoint import official_state_dict
from ..config import SiglipConfig
from ..data import synthetic as syn
from ..errors import InputError
from ..models.siglip import SiglipTower
from ..processing.images import image_to_tensor
from .optim import lr_at, set_lr

log = logging.getLogger(__name__)

# Optional fifth label: the object's colour-kind pair as one class. Why: a text token that pools a scene's
# patches keeps which pairs are present only if each patch codes its pair linearly; separate colour and kind
# codes sum to a bag of colours and a bag of kinds ("a red circle and a blue square" ~ "a blue circle and a
# red square").
PAIR_CLASSES = 1 + len(syn.KINDS) * len(syn.COLOUR_NAMES)


def head_sizes(pairs: bool) -> dict[str, int]:
    return {**syn.PATCH_LABELS, **({"pair": PAIR_CLASSES} if pairs else {})}


def with_pairs(labels: torch.Tensor) -> torch.Tensor:
    """[..., 4] labels -> [..., 5]: the pair class (kind - 1) * colours + colour, 0 on background."""
    kind, colour = labels[..., 0], labels[..., 1]
    pair = torch.where(kind > 0, (kind - 1) * len(syn.COLOUR_NAMES) + colour, torch.zeros_like(kind))
    return torch.cat([labels, pair[..., None]], -1)


EVAL_SCENES = 256


def read_excluded(files: Iterable[str | Path]) -> set[str]:
    """Scene hashes of `<split>.scenes.txt` files (as `hyperowl data synth` writes them)."""
    out: set[str] = set()
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise InputError(f"--exclude {p}: no such file (a <split>.scenes.txt written by `hyperowl data synth`)")
        out |= syn.read_scene_hashes(p)[0]
    return out


class SceneStream:
    """Random scenes (seeded) as tower inputs and per-patch labels, skipping excluded image hashes."""

    def __init__(self, cfg: SiglipConfig, seed: int, exclude: set[str] = frozenset(), record: bool = False,
                 pairs: bool = False, drawn: float = 0.0, free: float = 0.0) -> None:
        self.cfg, self.rng, self.exclude, self.skipped, self.pairs = cfg, random.Random(seed), exclude, 0, pairs
        # Share of scenes in the drawn look (issue 31: the pictures people draw). Its own RNG, so a stream with
        # drawn=0 draws the scenes it always drew. free: the share of drawn scenes laid out anywhere (world.FREE_TASKS).
        self.drawn_share, self.drawn_rng = drawn, random.Random(f"drawn/{seed}")
        self.free_share, self.free_rng = free, random.Random(f"free/{seed}")
        self.drawn: set[str] | None = set() if record else None  # hashes produced (held-out stream only)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixels [n, 3, S, S], labels [n, P, 4] (kind, colour, size, cell as syn.PATCH_LABELS; 0 = background;
        [n, P, 5] with the pair class when the stream has `pairs`), owner [n, P] (object index + 1)."""
        px, lab, own = [], [], []
        while len(px) < n:
            drawn = self.drawn_share > 0 and self.drawn_rng.random() < self.drawn_share
            free = drawn and self.free_share > 0 and self.free_rng.random() < self.free_share
            scene = syn.random_scene(self.drawn_rng if drawn else self.rng, self.cfg.image_size, drawn=drawn, free=free)
            if scene.hash in self.exclude:
                self.skipped += 1
                continue
            if self.drawn is not None:
                self.drawn.add(scene.hash)
            # A drawn scene's labels: where its objects land after the processor's resize to the tower's size.
            y, o = syn.patch_labels(scene.scaled(self.cfg.image_size), self.cfg.patch_size)
            px.append(image_to_tensor(scene.render(syn.DRAWN_RENDER_SIDE), self.cfg.image_size))
            lab.append(torch.from_numpy(y))
            own.append(torch.from_numpy(o))
        labels = torch.stack(lab)
        return torch.stack(px), with_pairs(labels) if self.pairs else labels, torch.stack(own)


class PatchHead(nn.Module):
    """One linear classifier per label over each patch token: [N, P, C] -> {label: [N, P, classes]}."""

    def __init__(self, width: int, pairs: bool = False) -> None:
        super().__init__()
        self.sizes = head_sizes(pairs)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, sum(self.sizes.values()))

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.proj(self.norm(feats)).split(list(self.sizes.values()), dim=-1)
        return dict(zip(self.sizes, logits))


def dense_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Sum over the heads of the mean cross-entropy over all patches (background is a class). labels [..., 4]
    (or [..., 5] with the pair column, when the head has a pair classifier)."""
    return sum(F.cross_entropy(logits[h].flatten(0, 1), labels[..., i].flatten()) for i, h in enumerate(logits))


@torch.no_grad()
def evaluate(tower: SiglipTower, head: PatchHead, pixels: torch.Tensor, labels: torch.Tensor,
             owner: torch.Tensor) -> dict[str, float]:
    """Held-out accuracy per head: over object patches (`<h>_patch`), and per object (`<h>_object`: the
    object's patches vote by summed log-probabilities, background excluded) - what a question about one
    object needs."""
    logits = head(tower(pixels))
    out: dict[str, float] = {}
    n_obj = int(owner.max())
    onehot = F.one_hot(owner, n_obj + 1)[..., 1:].float()  # [N, P, n_obj]: patch -> object
    has = onehot.sum(1) > 0  # [N, n_obj]
    fg = owner > 0
    for i, h in enumerate(logits):
        y = labels[..., i]
        out[f"{h}_patch"] = float((logits[h].argmax(-1)[fg] == y[fg]).float().mean())
        lp = logits[h].log_softmax(-1)[..., 1:]  # [N, P, K-1], background dropped
        votes = torch.einsum("npk,npo->nok", lp, onehot)  # [N, n_obj, K-1]
        pred = votes.argmax(-1) + 1
        truth = torch.einsum("np,npo->no", y.float(), onehot) / onehot.sum(1).clamp(min=1)  # patches agree
        out[f"{h}_object"] = float((pred[has] == truth[has].round().long()).float().mean())
    return {k: round(v, 4) for k, v in out.items()}


def save_tower(tower: SiglipTower, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**tower.config.to_hf_dict(), "architectures": ["SiglipVisionModel"],
           "hyperowl_note": "Owl3 tower layers only: the last SigLIP layer (unused by Owl3) is not stored"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    # The Owl3 checkpoint map names the tower's tensors: `vision.*` -> `vision_model.embeddings.*` / `...encoder.layers.i.*`.
    params = official_state_dict({f"vision.{n}": p for n, p in tower.named_parameters()})
    save_file({k: v.cpu() for k, v in params.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})


def pretrain_vision(cfg: SiglipConfig, out: str | Path, steps: int = 3000, batch_size: int = 32, lr: float = 1e-3,
                    warmup: int = 100, min_lr_ratio: float = 0.05, weight_decay: float = 0.05, seed: int = 0,
                    exclude: Iterable[str | Path] = (), eval_every: int = 500, progress: bool = True,
                    pairs: bool = False, drawn: float = 0.0, free: float = 0.0) -> dict:
    """Train a fresh tower of shape `cfg` on dense synthetic labels; write it to `out`. Returns the final eval.
    pairs: also classify each patch's colour-kind pair (see PAIR_CLASSES). drawn: share of scenes in the drawn
    look (`hyperowl data synth --drawn`), in training and in the held-out scenes alike; free: share of those laid
    out anywhere (`Scene.free`)."""
    if not 0 <= drawn <= 1 or not 0 <= free <= 1:
        raise InputError(f"pretrain-vision: --drawn {drawn} and --free {free} are shares: each from 0 to 1")
    if steps < 1 or batch_size < 1 or eval_every < 1:
        raise InputError("pretrain-vision: --steps, --batch-size and --eval-every must be >= 1")
    if cfg.image_size % cfg.patch_size:
        raise InputError(f"pretrain-vision: image size {cfg.image_size} is not a multiple of patch size {cfg.patch_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tower, head = SiglipTower(cfg), PatchHead(cfg.hidden_size, pairs)
    excluded = read_excluded(exclude)
    # Held-out scenes: their own seed stream; the training stream also skips them by hash.
    held = SceneStream(cfg, seed + 1_000_003, excluded, record=True, pairs=pairs, drawn=drawn, free=free)
    test = held.batch(EVAL_SCENES)
    train = SceneStream(cfg, seed, excluded | held.drawn, pairs=pairs, drawn=drawn, free=free)
    params = [*tower.parameters(), *head.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    logf = (out / "pretrain.jsonl").open("w")
    t0, result = time.time(), {}
    bar = tqdm(range(steps), desc="pretrain-vision", disable=not progress)
    for step in bar:
        set_lr(opt, lr_at(step, lr, warmup, steps, min_lr_ratio))
        pixels, labels, _ = train.batch(batch_size)
        loss = dense_loss(head(tower(pixels)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        done = step + 1
        if done % eval_every == 0 or done == steps:
            tower.eval()
            result = evaluate(tower, head, *test)
            tower.train()
            row = {"step": done, "loss": round(loss.item(), 4), "lr": opt.param_groups[0]["lr"],
                   "seconds": round(time.time() - t0, 1), **result}
            logf.write(json.dumps(row) + "\n")
            logf.flush()
            bar.set_postfix(loss=f"{loss.item():.3f}", kind=f"{result['kind_object']:.3f}")
    logf.close()
    save_tower(tower, out)
    summary = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "pairs": pairs,
               **({"drawn": drawn} if drawn else {}), **({"free": free} if free else {}), "held_out_scenes": EVAL_SCENES,
               "skipped_excluded": train.skipped + held.skipped, "seconds": round(time.time() - t0, 1),
               "vision_config": cfg.to_hf_dict(), "accuracy": result}
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("pretrain-vision: %d steps in %.0f s; held-out per-object accuracy %s", steps, summary["seconds"],
             {h: result[f"{h}_object"] for h in head.sizes})
    return summary

