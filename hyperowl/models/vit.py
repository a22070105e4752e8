"""mPLUG-Owl2's CLIP-style vision transformer.

Design note: patch conv (no bias) -> prepend CLS -> add the learned absolute position table ->
`pre_layernorm` -> pre-LN blocks -> `post_layernorm` on *all* tokens (the abstractor reads every token,
CLS included). The official fused `query_key_value` projection groups its output channels as
(head, {q, k, v}, head_dim); we keep that weight unchanged (checkpoints load as is) and split with one
view, then run attention through `attend` (SDPA) instead of the official eager matmul-softmax.
Images run in chunks so activation memory is bounded whatever the image count. Parameter names mirror
the official ones under `vision.` so the checkpoint key map is a prefix rename.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ClipVitConfig
from .layers import attend


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class VitEmbeddings(nn.Module):
    def __init__(self, cfg: ClipVitConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.use_cls = cfg.use_cls_token
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c)) if cfg.use_cls_token else None
        self.patch_embed = nn.Conv2d(3, c, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.tokens_per_image, c))
        self.pre_layernorm = nn.LayerNorm(c, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # [N, C, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, g*g, C], row-major patches
        if self.use_cls:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [N, 1+g*g, C]
        return self.pre_layernorm(x + self.position_embedding[:, : x.shape[1]])


class VitAttention(nn.Module):
    def __init__(self, cfg: ClipVitConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        qkv = self.query_key_value(x).view(n, t, self.heads, 3, c // self.heads)  # official (head, qkv, d) layout
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [N, heads, T, d]
        o = attend(q, k, v)
        return self.dense(o.transpose(1, 2).reshape(n, t, c))


class VitMLP(nn.Module):
    def __init__(self, cfg: ClipVitConfig) -> None:
        super().__init__()
        self.act = _ACTS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VitLayer(nn.Module):
    def __init__(self, cfg: ClipVitConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VitAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VitMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class ClipVit(nn.Module):
    """pixels [N, 3, S, S] -> last hidden state [N, 1 + (S/patch)^2, C] (after post_layernorm)."""

    def __init__(self, cfg: ClipVitConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in _ACTS:
            raise ValueError(f"unsupported vision hidden_act {cfg.hidden_act!r}")
        self.config = cfg
        self.embeddings = VitEmbeddings(cfg)
        self.layers = nn.ModuleList(VitLayer(cfg) for _ in range(cfg.num_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.use_post_layernorm else None

    def forward(self, pixels: Tensor, chunk: int | None = None) -> Tensor:
        if chunk and pixels.shape[0] > chunk:
            return torch.cat([self(p) for p in pixels.split(chunk)], dim=0)
        x = self.embeddings(pixels)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x) if self.post_layernorm is not None else x
