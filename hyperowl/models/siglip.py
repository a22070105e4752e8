"""SigLIP vision tower, as mPLUG-Owl3 uses it.

Design note: Owl3 reads `hidden_states[-2]` of SigLIP, the output of the penultimate encoder layer, with no
post-layernorm and no pooling head. So we build only the first `num_layers - 1` encoder layers; the last
layer, `post_layernorm` and `head` of an official checkpoint are declared ignored in the checkpoint key map.
Images run in chunks (`chunk` images at a time) so activation memory is bounded whatever the image count.
Parameter names follow HF SigLIP under `vision.` so the key map stays a prefix rename.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SiglipConfig
from .layers import attend


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.tokens_per_image, cfg.hidden_size)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [N, C, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, g*g, C], row-major patches
        return x + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        c = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        split = lambda y: y.view(n, t, self.heads, c // self.heads).transpose(1, 2)  # [N, heads, T, d]
        o = attend(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(o.transpose(1, 2).reshape(n, t, c))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipTower(nn.Module):
    """pixels [N, 3, S, S] -> penultimate-layer features [N, (S/patch)^2, C]."""

    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.num_layers - 1))

    def forward(self, pixels: Tensor, chunk: int | None = None) -> Tensor:
        if chunk and pixels.shape[0] > chunk:
            return torch.cat([self(p) for p in pixels.split(chunk)], dim=0)
        x = self.embeddings(pixels)
        for layer in self.layers:
            x = layer(x)
        return x
