"""The LM head and loss of a training step: over every position, or only where labels are (`logits_at`).

Times forward + backward of the output head and the summed answer-token cross-entropy for one batch of
decoder outputs, the two ways side by side (alternating blocks, same tensors): the full [B, L, V] head
with `ignore_index` (what training did before) and the head at the labelled positions only (what
`train.losses.answer_losses` does now). The rest of the step is identical in both and not timed. Defaults: the
embedded recipe's shapes (batch 16, ~190 tokens, width 256, vocabulary 1024, ~14 answer tokens per row).

    python bench/bench_loss_head.py
    python bench/bench_loss_head.py --batch 8 --length 2048 --hidden 896 --vocab 151646 --answers 200

Writes a JSON (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hyperowl.train.losses import label_positions, row_losses

ROOT = Path(__file__).resolve().parent.parent


def full(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, w)  # [B, L, V]
    b, n = labels.shape[0], labels.shape[1] - 1
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="none").view(b, n).sum(1)


def answers_only(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    at = label_positions(labels)  # the trainer's own selection and loss (losses.answer_losses)
    return row_losses(F.linear(h[at], w), labels, at)  # head on [K, H] -> [K, V]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=190)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--answers", type=int, default=14, help="labelled tokens per row")
    ap.add_argument("--reps", type=int, default=10, help="timed runs per block")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench/results/loss_head.json"))
    a = ap.parse_args()
    if min(a.batch, a.length, a.hidden, a.vocab, a.reps, a.blocks) < 1 or not 0 < a.answers < a.length:
        raise SystemExit("sizes must be >= 1 and 0 < --answers < --length")
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    w = (torch.randn(a.vocab, a.hidden) * 0.02).requires_grad_()
    h0 = torch.randn(a.batch, a.length, a.hidden)
    labels = torch.full((a.batch, a.length), -100)
    for r in range(a.batch):
        pos = torch.randperm(a.length - 1)[: a.answers] + 1
        labels[r, pos] = torch.randint(0, a.vocab, (a.answers,))
    ways = {"full": full, "answers": answers_only}
    ref = {}
    for name, fn in ways.items():  # the two agree (loss and gradient) before anything is timed
        h = h0.clone().requires_grad_()
        loss = fn(h, w, labels)
        loss.sum().backward()
        ref[name] = (loss.detach(), h.grad)
    assert torch.allclose(ref["full"][0], ref["answers"][0], rtol=1e-4, atol=1e-4)
    assert torch.allclose(ref["full"][1], ref["answers"][1], atol=1e-5)
    times: dict[str, list[float]] = {n: [] for n in ways}
    for blk in range(a.blocks):
        for name in (list(ways) if blk % 2 == 0 else list(ways)[::-1]):
            for _ in range(a.reps):
                h = h0.clone().requires_grad_()
                w.grad = None
                t = time.perf_counter()
                ways[name](h, w, labels).sum().backward()
                times[name].append(time.perf_counter() - t)
    rows = [{"head": n, "median_ms": 1000 * statistics.median(t), "runs": len(t)} for n, t in times.items()]
    for r in rows:
        r["vs_full"] = r["median_ms"] / rows[0]["median_ms"]
    print(f"head + loss, forward + backward: batch {a.batch} x {a.length} tokens, width {a.hidden}, vocab {a.vocab}, "
          f"{a.answers} labelled per row, {torch.get_num_threads()} threads ({a.blocks} alternating blocks x {a.reps})")
    print(f"{'head':>8} {'median ms':>10} {'vs full':>8}")
    for r in rows:
        print(f"{r['head']:>8} {r['median_ms']:>10.2f} {r['vs_full']:>8.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({**vars(a), "threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
