"""mPLUG-Owl2's visual abstractor: a few learnable queries read the ViT tokens, then go to LLM width.

Design note: each layer normalises the queries (norm1) and the image tokens (normk); keys/values are
computed over [queries ; image tokens] so the queries also attend to themselves. Queries and keys get
fixed sin-cos position tables (1-D over the query index, 2-D over the ViT grid with a zero row for CLS);
values get none. The residual is taken from the *normalised* queries, as in the official code. The MLP is
SwiGLU with a LayerNorm on its hidden (`ffn_ln`). After the last layer `visual_fc` projects to LLM width
and the learned `vit_eos` row is appended: Q + 1 rows per image.

The sin-cos tables are deterministic, so they are non-persistent buffers recomputed at construction:
released checkpoints never stored them (the conversion script did not write them), and a checkpoint that
does carry them needs nothing from them (the key map ignores them; a test checks they are equal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AbstractorConfig
from .layers import attend


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """MAE-style table: pos [M] -> [M, dim] = [sin(pos * w) ; cos(pos * w)], w_i = 10000^(-2i/dim). float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega  # [dim/2]
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None]  # [M, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid: int, cls_token: bool) -> Tensor:
    """[(cls) + grid*grid, dim]: first half encodes the column (w) index, second half the row (h) index,
    as MAE's meshgrid(w, h) does; a zero row in front for CLS."""
    h, w = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")  # [g, g] each
    emb = torch.cat([sincos_1d(dim // 2, w.reshape(-1)), sincos_1d(dim // 2, h.reshape(-1))], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb


class AbstractorAttention(nn.Module):
    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        c, ck = cfg.hidden_size, cfg.encoder_hidden_size
        self.heads = cfg.num_heads
        self.query = nn.Linear(c, c)
        self.key = nn.Linear(ck, c)
        self.value = nn.Linear(ck, c)
        self.config = cfg
        self.init_tables()

    def init_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the fixed sin-cos tables (float32, like the official buffers); the loader calls this
        after building the model on the meta device."""
        c = self.config.hidden_size
        q = sincos_1d(c, torch.arange(self.config.num_queries)).float()
        k = sincos_2d(c, self.config.grid_size, self.config.use_cls_token).float()
        self.register_buffer("q_pos_embed", q.to(device) if device is not None else q, persistent=False)
        self.register_buffer("k_pos_embed", k.to(device) if device is not None else k, persistent=False)

    def forward(self, q: Tensor, kv: Tensor) -> Tensor:
        """q [N, Q, C] (normalised queries), kv [N, Q + T, C] = [q ; normalised image tokens] -> [N, Q, C]."""
        n, nq, c = q.shape
        pos = torch.cat([self.q_pos_embed, self.k_pos_embed], dim=0).to(kv.dtype)  # [Q + T, C]
        split = lambda y: y.view(n, -1, self.heads, c // self.heads).transpose(1, 2)  # [N, heads, *, d]
        qh = split(self.query(q + self.q_pos_embed.to(q.dtype)))
        kh = split(self.key(kv + pos[: kv.shape[1]]))
        vh = split(self.value(kv))
        return attend(qh, kh, vh).transpose(1, 2).reshape(n, nq, c)


class AbstractorMLP(nn.Module):
    """w2(ffn_ln(silu(w1 x) * w3 x))."""

    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        c, f = cfg.hidden_size, cfg.intermediate_size
        self.w1, self.w3, self.w2 = nn.Linear(c, f), nn.Linear(c, f), nn.Linear(f, c)
        self.ffn_ln = nn.LayerNorm(f, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.ffn_ln(F.silu(self.w1(x)) * self.w3(x)))


class AbstractorOutput(nn.Module):
    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-5)  # torch's default eps, as the official code builds it
        self.mlp = AbstractorMLP(cfg)

    def forward(self, ctx: Tensor, residual: Tensor) -> Tensor:
        x = residual + self.out_proj(ctx)
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        # the official code builds norm1/normk/norm2 with torch's default eps (1e-5); only ffn_ln reads the
        # config's layer_norm_eps. Matters at 1e-3 on the fixture.
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-5)
        self.normk = nn.LayerNorm(cfg.encoder_hidden_size, eps=1e-5)
        self.attention = AbstractorAttention(cfg)
        self.output = AbstractorOutput(cfg)

    def forward(self, q: Tensor, image: Tensor) -> Tensor:
        q = self.norm1(q)
        kv = torch.cat([q, self.normk(image)], dim=1)  # [N, Q + T, C]: queries attend to themselves too
        return self.output(self.attention(q, kv), q)  # residual from the normalised queries (official)


class AbstractorLayer(nn.Module):
    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        self.crossattention = CrossAttentionBlock(cfg)

    def forward(self, q: Tensor, image: Tensor) -> Tensor:
        return self.crossattention(q, image)


class VisualAbstractor(nn.Module):
    """ViT tokens [N, T, Cv] -> visual rows for the LLM [N, Q + 1, H]."""

    def __init__(self, cfg: AbstractorConfig, llm_hidden: int) -> None:
        super().__init__()
        if cfg.add_v2t_pos_emb:
            raise ValueError("visual_abstractor.add_v2t_pos_emb=true is not supported (no released checkpoint uses it)")
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // 2) % 2:
            raise ValueError("visual_abstractor.hidden_size must divide by num_heads and by 4 (sin-cos tables)")
        self.config = cfg
        self.query_embeds = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.hidden_size))
        self.layers = nn.ModuleList(AbstractorLayer(cfg) for _ in range(cfg.num_layers))
        self.visual_fc = nn.Linear(cfg.hidden_size, llm_hidden)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, llm_hidden))

    def forward(self, image: Tensor) -> Tensor:
        n = image.shape[0]
        expected = self.config.grid_size ** 2 + int(self.config.use_cls_token)
        if image.shape[1] != expected:
            raise ValueError(f"abstractor expects {expected} ViT tokens per image, got {image.shape[1]}")
        q = self.query_embeds.expand(n, -1, -1)
        for layer in self.layers:
            q = layer(q, image)
        out = self.visual_fc(q)  # [N, Q, H]
        return torch.cat([out, self.vit_eos.expand(n, -1, -1).to(out.dtype)], dim=1)  # [N, Q + 1, H]
