"""mPLUG-Owl3: SigLIP -> projection -> Qwen2 with hyper-attention layers. The drop-in forward lives here.

Design note: the model is a function of (token ids, images or their features, where each image's
placeholder is, an optional explicit KVCache). Visual features never enter the text sequence; each hyper
layer turns them into visual K/V once per request. `forward` accepts both our native image placement
(`image_positions`: token index of each image's placeholder, per row) and the official `media_offset`
(240728 tensor [B, L, 2] or 241101 list of per-row start tensors), so code written against the official
model runs unchanged. Nothing here assumes inference: no inference_mode, no hidden state on modules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import KVCache
from ..config import Owl3Config
from .attention import BIG_POS, make_context
from .base import OwlModel
from .hyper_attention import HyperAttention
from .qwen2 import Qwen2Decoder
from .siglip import SiglipTower

log = logging.getLogger(__name__)


@dataclass
class Owl3Output:
    logits: Tensor
    loss: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    image_embeds: Tensor | None = None
    past_key_values: KVCache | None = None


class Projector(nn.Module):
    """vision width -> LLM width. 240728: one Linear; 241101: Linear-GELU(erf)-Linear."""

    def __init__(self, cfg: Owl3Config) -> None:
        super().__init__()
        self.fused = cfg.variant == "241101"
        if self.fused:
            self.fc1 = nn.Linear(cfg.vision.hidden_size, cfg.hidden_size)
            self.fc2 = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        else:
            self.fc = nn.Linear(cfg.vision.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x))) if self.fused else self.fc(x)


class Owl3Model(OwlModel):
    def __init__(self, cfg: Owl3Config) -> None:
        super().__init__()
        self.config = cfg
        self.vision = SiglipTower(cfg.vision)
        self.projector = Projector(cfg)
        self.decoder = Qwen2Decoder(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    # -- parameter groups (training selects by these) -------------------------------------------------------
    def fusion_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters new to Owl3 (not in the text LLM or SigLIP): projection, visual K/V, gates."""
        out = {f"projector.{n}": p for n, p in self.projector.named_parameters()}
        for i, layer in enumerate(self.decoder.layers):
            if isinstance(layer.self_attn, HyperAttention):
                for n, p in layer.self_attn.named_parameters():
                    if n.startswith(("v_kv_proj", "gate_proj")):
                        out[f"decoder.layers.{i}.self_attn.{n}"] = p
        return out

    # -- vision ------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """[N, 3, S, S] -> image embeddings [N, T, H], the vision tower run in bounded chunks."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        n, chunk = pixel_values.shape[0], self.config.vision_batch_size
        if not chunk or n <= chunk:
            return self.projector(self.vision(pixel_values))
        out = None  # tower + projection per chunk, written into one output: no [N, T, C] tower copy, no cat
        for s in range(0, n, chunk):
            e = self.projector(self.vision(pixel_values[s : s + chunk]))
            if out is None:
                out = e.new_empty(n, *e.shape[1:])
            out[s : s + chunk] = e
        return out

    # -- the forward -------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_positions: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        media_offset: Tensor | list[Tensor] | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        past_key_values: KVCache | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool = False,
        last_logits_only: bool = False,
        logits_at: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
    ) -> Owl3Output:
        """input_ids [B, Lq] (new tokens only when a cache is given).

        attention_mask: [B, Lq] or [B, past+Lq], 1 = real token, 0 = (left) padding.
        pixel_values [N, 3, S, S] or image_embeds [N, T, H]: all rows' images, row 0's first.
        image_positions [B, N_max]: token index of each image's placeholder in its row, -1 = none;
        or media_offset in the official form instead. position_ids: optional override (default: from mask).
        logits_at: bool [B, Lq]: logits only at these positions, packed [K, V] in row-major order (training
        needs them only where labels are: the full [B, Lq, V] head and loss cost a third of a small model's step).
        """
        cfg = self.config
        cache = cache if cache is not None else past_key_values
        b, lq = input_ids.shape
        dev = input_ids.device
        past = cache.length if cache is not None else 0

        new_valid = torch.ones(b, lq, dtype=torch.bool, device=dev)
        if attention_mask is not None:
            new_valid = attention_mask[:, -lq:].to(device=dev).bool()
        if cache is not None:
            cache.begin(new_valid)
            key_valid = cache.key_valid[:, : past + lq]
        else:
            key_valid = new_valid
        if position_ids is None:
            base = cache.next_pos[:, None] if cache is not None else 0
            position_ids = (base + new_valid.long().cumsum(1) - 1).clamp(min=0)
        positions = position_ids.to(dev).long()

        if pixel_values is not None and image_embeds is None:
            image_embeds = self.encode_images(pixel_values)
        image_pos, visual_embeds, visual_slots = None, None, None
        visual_pos = None  # appending: the new images' positions (image_pos then holds old and new ones)
        if image_embeds is not None and image_embeds.shape[0] > 0:
            if media_offset is not None:
                image_positions = placeholders_from_media_offset(media_offset, image_embeds.shape[0], lq)
            if image_positions is None:
                raise ValueError("images were given without image_positions or media_offset: say where each image is")
            image_pos, visual_slots = self._place_images(image_embeds, image_positions.to(dev), positions)
            visual_embeds = image_embeds.to(device=dev, dtype=self.dtype)
            if cache is not None and (past or cache.has_visual):
                # Appending to a kept cache (a live session, a paged prefill chunk): each row's new images come
                # after its old ones, their visual K/V after the old ones' (computed now, the old ones' never
                # again). The cache joins the two lists (KVCache: equal rows; PagedView: per row).
                visual_pos = image_pos
                image_pos = cache.append_images(image_pos, ragged=visual_slots is not None)
            if cache is not None:
                cache.image_pos = image_pos
        elif cache is not None and cache.has_visual:
            image_pos = cache.image_pos

        ctx = make_context(cfg, positions, key_valid, past, cache, image_pos, visual_embeds, visual_slots,
                           visual_pos)
        hidden = [] if output_hidden_states else None
        h = self.decoder(self.decoder.embed_tokens(input_ids), ctx, hidden)
        if cache is not None:
            cache.commit(lq, positions[:, -1])
        logits, loss = self.head_and_loss(h, labels, last_logits_only, logits_at)
        return Owl3Output(
            logits=logits,
            loss=loss,
            hidden_states=tuple(hidden) if hidden is not None else None,
            image_embeds=image_embeds,
            past_key_values=cache,
        )

    def _place_images(self, embeds: Tensor, token_idx: Tensor, positions: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-row image layout. embeds [N, T, H] (rows concatenated) + token_idx [B, N_max] (-1 = none)
        -> image_pos [B, N_max] (visible-from position; BIG_POS = padding) and the slot (row * N_max + j) of
        each image [N], None when every slot is used. The features stay packed: the hyper layers project
        only real images (no [B, N_max*T, H] copy with padding)."""
        b, n_max = token_idx.shape
        n = embeds.shape[0]
        present = token_idx >= 0
        if int(present.sum()) != n:
            raise ValueError(f"{n} images were given but image_positions places {int(present.sum())}")
        shift = 1 if self.config.variant == "240728" else 0  # 240728: visible strictly after the placeholder
        image_pos = positions.gather(1, token_idx.clamp(min=0)) + shift
        image_pos = torch.where(present, image_pos, torch.full_like(image_pos, BIG_POS))
        if n == b * n_max:  # every slot used (one row, or equal image counts)
            return image_pos, None
        return image_pos, present.flatten().nonzero().squeeze(1)  # row-major = the rows' concatenation order


def placeholders_from_media_offset(media_offset: Tensor | list[Tensor], n_images: int, seq_len: int) -> Tensor:
    """Official media_offset -> image_positions [B, N_max] (token index of each placeholder, -1 = none).

    241101 form: a list (per row) of 1-D tensors with each image's placeholder index.
    240728 form: [B, L, 2]; col0 = index of the row's first image, col1 - col0 = images strictly before t.
    An image visible to no token of the prompt (placeholder at the last token) is put at the last token.
    """
    if isinstance(media_offset, (list, tuple)):
        rows = [torch.as_tensor(r).long().flatten().tolist() for r in media_offset]
    else:
        mo = media_offset.long().cpu()
        starts = mo[:, 0, 0].tolist()
        rows = []
        for r in range(mo.shape[0]):
            col0, col1 = mo[r, :, 0], mo[r, :, 1]
            nxt = starts[r + 1] if r + 1 < mo.shape[0] else n_images
            count = max(nxt - starts[r], 0) if bool((col1 >= 0).any()) else 0
            seen = (col1 - col0).clamp(min=0)
            inc = torch.diff(seen, prepend=seen.new_zeros(1))  # images becoming visible at t
            idx = [t - 1 for t in range(seq_len) for _ in range(int(inc[t]))]
            rows.append((idx + [seq_len - 1] * count)[:count])
    n_max = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), n_max), -1, dtype=torch.long)
    for r, idx in enumerate(rows):
        out[r, : len(idx)] = torch.tensor(idx, dtype=torch.long)
    return out
