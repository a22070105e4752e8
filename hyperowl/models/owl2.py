"""mPLUG-Owl2: CLIP-style ViT -> visual abstractor (65 rows per image) -> LLaMA with the
modality-adaptive module. The drop-in forward lives here.

Design note: unlike Owl3, visual rows *enter* the LLM sequence: each image's placeholder token is
replaced by the image's Q + 1 rows. The model is a function of (token ids with one placeholder position
per image, images or their features, where each placeholder is, an optional KVCache). The placeholder's
id is irrelevant: only `image_positions` ([B, N_max], token index, -1 = none) says where images go; the
official form (ids containing -200, `images=` kwarg) is converted to it.

Expansion (`expand_rows`) is vectorised: each kept token's destination slot is computed with a cumsum
over the placeholder mask and everything is written with two scatters (placeholders and absent images
go to a dummy slot that is cut off) — no per-sample loop. Rows of a batch are left-padded to the widest
expanded row, so a row's own left padding is preserved and every row ends at the last slot; position ids
come from the expanded validity mask, so a padded row gives the same result as the row alone (the
official code right-pads and loses padding information at decode time).

Cache: the KVCache holds the expanded sequence's K/V as ordinary text slots (visual rows included), so
decode steps are plain text tokens (indicator None) and the engine works unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..cache import KVCache
from ..config import Owl2Config
from ..errors import InputError
from .abstractor import AbstractorAttention, VisualAbstractor
from .base import OwlModel
from .llama import LlamaDecoder, make_owl2_context
from .vit import ClipVit

log = logging.getLogger(__name__)

IMAGE_TOKEN_INDEX = -200  # the official placeholder id inside input_ids


@dataclass
class Owl2Output:
    logits: Tensor
    loss: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    image_embeds: Tensor | None = None
    past_key_values: KVCache | None = None
    modality_indicators: Tensor | None = None  # [B, W] long, 1 = visual row (expanded sequence)
    attention_mask: Tensor | None = None  # [B, W] long, the expanded mask
    labels: Tensor | None = None  # [B, W] the given labels aligned to the expanded sequence (-100 on visual rows)


def positions_from_placeholders(input_ids: Tensor, placeholder: int = IMAGE_TOKEN_INDEX) -> Tensor:
    """ids [B, L] -> image_positions [B, N_max] (token index of each placeholder, in order; -1 = none)."""
    is_ph = input_ids == placeholder
    counts = is_ph.sum(1)
    n_max = int(counts.max()) if counts.numel() else 0
    idx = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    # placeholders first (in order), then the rest: a stable sort on "not a placeholder"
    order = torch.sort((~is_ph).to(torch.int8), dim=1, stable=True).indices[:, :n_max]  # [B, N_max]
    keep = torch.arange(n_max, device=input_ids.device)[None] < counts[:, None]
    return torch.where(keep, idx.gather(1, order), torch.full_like(order, -1))


def expand_rows(tok_embeds: Tensor, valid: Tensor, image_positions: Tensor, image_embeds: Tensor,
                labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Replace each placeholder by its image's T rows, all rows at once.

    tok_embeds [B, L, H], valid [B, L] bool, image_positions [B, N_max] (ascending per row, -1 = none),
    image_embeds [N, T, H] (rows' images concatenated in row order), labels [B, L] or None
    -> rows [B, W, H], visual [B, W] bool, valid [B, W] bool, labels [B, W] (-100 on visual rows and padding).
    """
    b, l, hdim = tok_embeds.shape
    n, t, _ = image_embeds.shape
    dev = tok_embeds.device
    present = image_positions >= 0  # [B, N_max]
    n_max = image_positions.shape[1]
    if int(present.sum()) != n:
        raise InputError(f"{n} images were given but the inputs place {int(present.sum())} image placeholder(s)")
    # (two checks: [B, N_max] and [B, N_max - 1] do not broadcast together beyond two images per row)
    outside = image_positions >= l
    unordered = (image_positions[:, 1:] <= image_positions[:, :-1]) & present[:, 1:]
    if bool(outside.any()) or bool(unordered.any()):
        raise InputError("image_positions: each row's placeholder indices must be increasing and inside the row")
    is_ph = torch.zeros(b, l + 1, dtype=torch.bool, device=dev)
    is_ph.scatter_(1, torch.where(present, image_positions, l), True)  # absent images hit the spare column
    is_ph = is_ph[:, :l]
    before = is_ph.long().cumsum(1) - is_ph.long()  # [B, L] images strictly before each token
    row_len = l + present.sum(1) * (t - 1)  # [B]
    w = int(row_len.max())
    shift = (w - row_len)[:, None]  # extra left padding per row
    ar = torch.arange(l, device=dev)[None]
    dst_tok = torch.where(is_ph, w, shift + ar + before * (t - 1))  # [B, L]; placeholders -> dummy slot w
    m = torch.arange(n_max, device=dev)[None]
    start = shift + image_positions + m * (t - 1)  # [B, N_max] first row of each image
    dst_img = torch.where(present[..., None], start[..., None] + torch.arange(t, device=dev), w)  # [B, N_max, T]
    dst_img = dst_img.view(b, n_max * t)

    vis_in = tok_embeds.new_zeros(b, n_max, t, hdim)  # in the embeddings' dtype (under autocast the rows may be bf16)
    vis_in[present] = image_embeds.to(tok_embeds.dtype)  # row-major = concatenation order of the rows' images
    rows = tok_embeds.new_zeros(b, w + 1, hdim)
    rows = rows.scatter(1, dst_tok[..., None].expand(b, l, hdim), tok_embeds)
    rows = rows.scatter(1, dst_img[..., None].expand(b, n_max * t, hdim), vis_in.view(b, n_max * t, hdim))
    visual = torch.zeros(b, w + 1, dtype=torch.bool, device=dev).scatter(1, dst_img, True)
    new_valid = torch.zeros(b, w + 1, dtype=torch.bool, device=dev).scatter(1, dst_tok, valid)
    new_valid = new_valid | visual
    new_labels = None
    if labels is not None:
        new_labels = torch.full((b, w + 1), -100, dtype=torch.long, device=dev).scatter(1, dst_tok, labels.to(dev).long())
        new_labels = new_labels[:, :w]
    return rows[:, :w], visual[:, :w], new_valid[:, :w], new_labels


class Owl2Model(OwlModel):
    def __init__(self, cfg: Owl2Config) -> None:
        super().__init__()
        self.config = cfg
        self.vision = ClipVit(cfg.vision)
        self.abstractor = VisualAbstractor(cfg.abstractor, cfg.hidden_size)
        self.decoder = LlamaDecoder(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def fusion_parameters(self) -> dict[str, nn.Parameter]:
        """The modality-adaptive module's visual side (new relative to the text LLaMA): every layer's visual
        RMSNorms (`input_layernorm` / `post_attention_layernorm` `.multiway.1`) and visual K/V projections
        (`k_proj` / `v_proj` `.multiway.1`). The text side (`multiway.0`) is the LLM's own."""
        out = {}
        for i, layer in enumerate(self.decoder.layers):
            for n, p in layer.named_parameters():
                if ".multiway.1." in f".{n}":
                    out[f"decoder.layers.{i}.{n}"] = p
        return out

    def init_tables(self, device: torch.device | str) -> None:
        """The abstractor's sin-cos position tables (non-persistent: computed, never read from a checkpoint)."""
        for m in self.modules():
            if isinstance(m, AbstractorAttention):
                m.init_tables(device)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """[N, 3, S, S] -> visual rows [N, Q + 1, H] (ViT in bounded chunks, then the abstractor)."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        return self.abstractor(self.vision(pixel_values, chunk=self.config.vision_batch_size))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_positions: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        images: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        past_key_values: KVCache | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool = False,
        last_logits_only: bool = False,
        logits_at: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        modality_indicators: Tensor | None = None,
    ) -> Owl2Output:
        """input_ids [B, L] (new tokens only when a cache is given), one placeholder per image.

        attention_mask [B, L] or [B, past+L] (1 = real token, 0 = left padding) over the *unexpanded* ids.
        pixel_values / images [N, 3, S, S] or image_embeds [N, Q+1, H]: all rows' images, row 0's first.
        image_positions [B, N_max]: token index of each image's placeholder (-1 = none); if omitted, the
        official -200 placeholders in input_ids are used. logits/hidden states cover the expanded sequence.
        logits_at: bool [B, L_expanded]: logits only at these positions, packed [K, V] in row-major order.
        """
        if output_attentions:
            raise InputError("output_attentions is not supported (attention runs in fused SDPA kernels)")
        cfg = self.config
        cache = cache if cache is not None else past_key_values
        dev = self.device
        input_ids = input_ids.to(dev)
        b, lq = input_ids.shape
        past = cache.length if cache is not None else 0
        if pixel_values is None:
            pixel_values = images
        official_ph = input_ids < 0
        if bool(official_ph.any()):
            if image_positions is None:
                image_positions = positions_from_placeholders(input_ids)
            input_ids = input_ids.masked_fill(official_ph, cfg.pad_token_id)  # never embedded anyway
        valid = torch.ones(b, lq, dtype=torch.bool, device=dev)
        if attention_mask is not None:
            valid = attention_mask[:, -lq:].to(dev).bool()

        if pixel_values is not None and image_embeds is None and pixel_values.shape[0] > 0:
            image_embeds = self.encode_images(pixel_values)
        x = self.decoder.embed_tokens(input_ids)
        visual = None
        if image_embeds is not None and image_embeds.shape[0] > 0:
            if image_positions is None:
                raise InputError("images were given without image_positions or -200 placeholders in input_ids")
            # with a cache holding earlier slots (chunked prefill, a reused prefix), the new rows go after them
            if position_ids is not None:
                raise InputError("position_ids cannot be combined with images: positions follow the expanded sequence")
            x, visual, valid, labels = expand_rows(x, valid, image_positions.to(dev).long(), image_embeds.to(dev), labels)
            if not bool(visual.any()):
                visual = None
        elif image_positions is not None and bool((image_positions >= 0).any()):
            raise InputError("image placeholders were given but no images (pixel_values/images/image_embeds)")
        lx = x.shape[1]
        if cache is not None:
            cache.begin(valid)
            key_valid = cache.key_valid[:, : past + lx]
        else:
            key_valid = valid
        if position_ids is None:
            base = cache.next_pos[:, None] if cache is not None else 0
            position_ids = (base + valid.long().cumsum(1) - 1).clamp(min=0)
        positions = position_ids.to(dev).long()

        ctx = make_owl2_context(cfg, positions, key_valid, past, cache)
        hidden = [] if output_hidden_states else None
        h = self.decoder(x, ctx, visual, hidden)
        if cache is not None:
            cache.commit(lx, positions[:, -1])
        logits, loss = self.head_and_loss(h, labels, last_logits_only, logits_at)
        ind = visual.long() if visual is not None else torch.zeros(b, lx, dtype=torch.long, device=dev)
        return Owl2Output(logits=logits, loss=loss, hidden_states=tuple(hidden) if hidden is not None else None,
                          image_embeds=image_embeds, past_key_values=cache, modality_indicators=ind,
                          attention_mask=valid.long(), labels=labels)
