"""What every mPLUG-Owl model class shares: device/dtype, the explicit cache, the LM head and the loss.

Design note: Owl3 and Owl2 differ in how images reach the decoder (hyper-attention K/V vs rows in the
sequence) but not in how text comes out. That common tail lives here once: the output head (tied or an
own Linear, possibly an Int8Linear after quantization), logits at all / the last / selected positions,
and the shifted cross-entropy. A model is a pure function of its inputs and an explicit `KVCache`:
nothing is attached to it after construction (the processor, checkpoint folder, etc. live on the
`hyperowl.pipeline.Pipeline` that pairs it with a processor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import KVCache


class OwlModel(nn.Module):
    """Base of `Owl3Model` and `Owl2Model`: subclasses set `config`, `decoder` (with `embed_tokens`) and
    `lm_head` (None = tied to the embeddings) and implement `encode_images` and `forward`."""

    config: object
    decoder: nn.Module
    lm_head: nn.Module | None

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.config.num_layers, capacity)

    def output_head(self, h: Tensor) -> Tensor:
        if self.lm_head is None:  # tied embeddings
            return F.linear(h, self.decoder.embed_tokens.weight)
        return self.lm_head(h)  # nn.Linear, or an Int8Linear after quantize_int8

    def head_and_loss(self, h: Tensor, labels: Tensor | None, last_logits_only: bool,
                      logits_at: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Decoder output h [B, L, H] -> (logits, loss or None).

        logits_at: bool [B, L]: logits only at these positions, packed [K, V] in row-major order (training
        needs them only where labels are: the full [B, L, V] head and loss cost a third of a small model's step).
        """
        if logits_at is not None:
            if labels is not None or last_logits_only:
                raise ValueError("logits_at cannot be combined with labels or last_logits_only")
            logits = self.output_head(h[logits_at.to(h.device)])
        else:
            logits = self.output_head(h[:, -1:] if last_logits_only else h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(h.device),
                                   ignore_index=-100)
        return logits, loss
