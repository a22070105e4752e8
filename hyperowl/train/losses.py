"""The training objective: next-token cross-entropy on the answer tokens, weighted per conversation.

Design note. Position t predicts token t + 1, so a position carries a loss when the *next* label is not
-100 (`label_positions`); the LM head runs only at those positions (`logits_at`: [K, V] logits instead of
[B, L, V]) and `row_losses` sums each row's token losses. `loss_weighting` gives a row of n answer tokens
the weight n ** -power per token (power 0: every token alike; 1: every conversation alike); the
normaliser is the sum of those weights over the *global* batch (all micro batches, all processes), so
N processes compute the gradient of one (`step_normalisers`).

Families whose images take more than one LLM row (Owl2: Q + 1 rows per image, `llm_rows_per_image`) put
the rows into the sequence, so the logits cover the expanded sequence: `expand_labels` aligns the labels
with it using the model's own `expand_rows` (visual rows labelled -100) before any token is counted.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..families import family_of
from ..models.owl2 import expand_rows
from .data import ConversationDataset, collate_train


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


def expand_labels(model: torch.nn.Module, batch: dict) -> dict:
    """Labels aligned to the sequence the logits cover. Where the family puts an image's several rows into the
    LLM sequence (Owl2: each placeholder -> Q + 1 rows, labelled -100), computed by the model's own
    `expand_rows` on width-1 dummy rows; one row per image (Owl3): the batch as is."""
    pos = batch["image_positions"]
    rows = family_of(model).llm_rows_per_image(model.config)
    if rows == 1 or pos is None:
        return batch
    labels, valid = batch["labels"], batch["attention_mask"].bool()
    n = int((pos >= 0).sum())
    _, _, _, expanded = expand_rows(torch.zeros(*labels.shape, 1), valid, pos, torch.zeros(n, rows, 1), labels)
    return {**batch, "labels": expanded}


def answer_counts(micro: list[dict]) -> list[torch.Tensor]:
    """Answer tokens of each row [B] (float64) of each micro batch (labels already expanded)."""
    return [(b["labels"][:, 1:] != -100).sum(1).double() for b in micro]


def step_normalisers(rows_n: list[torch.Tensor], power: float, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer tokens, sum of the rows' weights) over the global batch: every micro batch, every process."""
    n_tok = torch.stack([n.sum() for n in rows_n]).sum()
    norm = torch.stack([(n.clamp(min=1) ** (1 - power) * (n > 0)).sum() for n in rows_n]).sum()
    if world > 1:
        dist.all_reduce(n_tok)
        dist.all_reduce(norm)
    return n_tok, norm


def weighted_loss(row: torch.Tensor, rows_n: torch.Tensor, power: float) -> torch.Tensor:
    """The rows' summed token losses [B] weighted n ** -power each (power 0: their plain sum)."""
    if power == 0:
        return row.sum()
    return (row * rows_n.clamp(min=1).to(row) ** -power).sum()


@torch.no_grad()
def validation_loss(model: torch.nn.Module, val: ConversationDataset, pad: int, device, batch_size: int,
                    limit: int = 256) -> float:
    """Per-token loss on the first `limit` validation examples (fixed, so curves are comparable)."""
    model.eval()
    total, n_tok = 0.0, 0
    idx = list(range(min(limit, len(val))))
    for i in range(0, len(idx), batch_size):
        b = expand_labels(model, collate_train([val[j] for j in idx[i : i + batch_size]], pad))
        total += float(answer_losses(model, b, device).sum())
        n_tok += int((b["labels"][:, 1:] != -100).sum())
    return total / max(n_tok, 1)
