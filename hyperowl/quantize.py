"""int8 weight-only quantization of a loaded model (an inference option, `load(..., quantize="int8")`).

Design: every `nn.Linear` of the LLM (and, optionally, the vision tower and projector) is swapped for an
`Int8Linear` holding an int8 weight [out, in] and one float scale per output row (symmetric, absmax / 127).
Activations stay in the model's dtype; the matmul is `torch._weight_int8pack_mm` where that kernel exists
(CPU and CUDA builds of recent torch: the int8 weight is read straight from memory, which is what matters
for decoding, a memory-bound loop), else the weight is dequantized on the fly. With tied embeddings the
output head is the embedding matrix; `head=True` adds an int8 copy of it as the head (the embedding stays in
float for lookups), the largest single read per decoded token for small LLMs with big vocabularies.

A quantized model is for inference only: it cannot be trained or saved back as a checkpoint.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

_HAS_KERNEL = hasattr(torch, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """y = x @ (int8 W * scale[:, None]).T + b, with W stored as int8 (4x smaller than float32)."""

    def __init__(self, weight_int8: Tensor, scales: Tensor, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        self.register_buffer("weight_int8", weight_int8)  # [out, in] int8
        self.register_buffer("scales", scales)  # [out], the activation dtype
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None) -> "Int8Linear":
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [out]
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scales.to(weight.dtype), None if bias is None else bias.detach().clone())

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight and its scales (the bias is not counted: it is not quantized)."""
        return self.weight_int8.numel() + self.scales.numel() * self.scales.element_size()

    def dequantized(self) -> Tensor:
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [tokens, in]
        y = None
        if _HAS_KERNEL and x2.dtype == self.scales.dtype and x2.numel() > 0:
            try:
                y = torch._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scales)
            except (RuntimeError, NotImplementedError):  # a device/dtype the kernel lacks: dequantize instead
                y = None
        if y is None:
            y = F.linear(x2, self.dequantized().to(x2.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def is_quantized(model: nn.Module) -> bool:
    """Whether `quantize_int8` swapped any of the model's layers (read from the modules, never a flag)."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


def quantize_int8(model: nn.Module, vision: bool = False, head: bool = True) -> dict:
    """Swap the model's Linear layers for Int8Linear, in place. Returns {"layers": n, "bytes_before": ...,
    "bytes_after": ...} for the swapped weights. vision: also the vision tower and projector (off by default:
    the tower runs once per image, compute-bound, where int8 weight-only saves memory but no time)."""
    skip_prefixes = () if vision else ("vision.", "projector.", "abstractor.", "visual")
    n, before, after = 0, 0, 0
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not name.startswith(skip_prefixes)]
    for name, lin in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = Int8Linear.from_weight(lin.weight, lin.bias)
        before += lin.weight.numel() * lin.weight.element_size()
        after += q.nbytes
        setattr(parent, attr, q)
        n += 1
    if head and getattr(model, "lm_head", "absent") is None:  # tied: an int8 copy of the embedding as the head
        emb = model.decoder.embed_tokens.weight
        model.lm_head = Int8Linear.from_weight(emb)
        after += model.lm_head.nbytes
        n += 1
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("int8 weight-only: %d linear layers, %.1f MiB -> %.1f MiB", n, before / 2**20, after / 2**20)
    return {"layers": n, "bytes_before": before, "bytes_after": after}
