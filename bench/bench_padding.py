"""Padding of training batches with and without `data.group_by_length`, on a real training JSONL.

A training batch is padded to its longest conversation, so the LM computes on batch_size x max_len tokens
whatever the real lengths. This counts, for the same seeded order the trainer uses (`batch_indices`),
the real and the padded tokens of every step of one epoch, for several `group_by_length` windows. The
counts are exact (no timing, so no CPU noise): a row's length is its ChatML text tokenized by the given
tokenizer, with one token per image and `--frames` per video (Owl3 keeps visual tokens out of the text).

    python bench/bench_padding.py                                   # data/synth/train.jsonl, groups 0,4,16,64
    python bench/bench_padding.py --data my.jsonl --batch-size 8 --groups 0,16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tokenizers import Tokenizer  # noqa: E402

from hyperowl.processing.chat import render_chatml  # noqa: E402
from hyperowl.train.data import batch_indices, conversation_length  # noqa: E402

IMAGE, VIDEO = "<|image|>", "<|video|>"


def row_tokens(messages: list[dict], tok: Tokenizer, frames: int) -> int:
    text = render_chatml(messages, add_generation_prompt=False)
    n_visual = text.count(IMAGE) + frames * text.count(VIDEO)
    pieces = text.replace(VIDEO, IMAGE).split(IMAGE)
    return n_visual + sum(len(e.ids) for e in tok.encode_batch(pieces, add_special_tokens=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data/synth/train.jsonl"))
    ap.add_argument("--tokenizer", default=str(ROOT / "hyperowl/assets/owl3-synthetic/tokenizer.json"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--groups", default="0,4,16,64", help="group_by_length values (0 = off)")
    ap.add_argument("--frames", type=int, default=8, help="text tokens of a video (one per frame)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/padding.json"))
    a = ap.parse_args()
    for path, what in ((a.data, "--data"), (a.tokenizer, "--tokenizer")):
        if not Path(path).is_file():
            sys.exit(f"{what} {path}: no such file (the default data comes from scripts/train_embedded.sh)")
    try:
        groups = [int(x) for x in a.groups.split(",")]
    except ValueError:
        sys.exit(f"--groups {a.groups}: expected comma-separated integers, e.g. 0,16")
    tok = Tokenizer.from_file(a.tokenizer)
    rows = []
    with open(a.data, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row.get("messages"), list) or not all("content" in m for m in row["messages"]):
                    raise ValueError("no messages list with contents")
            except (ValueError, AttributeError) as e:
                sys.exit(f"{a.data}:{n}: not a training conversation ({e}); see README, 'Training data'")
            rows.append(row)
    if not rows:
        sys.exit(f"{a.data}: no conversations")
    tokens = [row_tokens(r["messages"], tok, a.frames) for r in rows]
    lengths = tuple(conversation_length(r["messages"]) for r in rows)  # what the trainer sorts by
    n, steps = len(rows), len(rows) // a.batch_size
    results = []
    for g in groups:
        real = padded = 0
        for s in range(steps):
            batch = [tokens[i] for i in batch_indices(n, a.seed, s, 0, a.batch_size, 1, 0, 1, lengths, g)]
            real += sum(batch)
            padded += len(batch) * max(batch)
        results.append({"group_by_length": g, "steps": steps, "real_tokens": real, "padded_tokens": padded,
                        "efficiency": round(real / padded, 4)})
    base = results[0]["padded_tokens"]
    print(f"{a.data}: {n} rows, batch {a.batch_size}, {steps} steps (one epoch), mean {sum(tokens) / n:.1f} "
          f"tokens/row, max {max(tokens)}")
    print(f"{'group_by_length':>15} {'padded tokens':>14} {'real/padded':>12} {'padded vs first row':>20}")
    for r in results:
        print(f"{r['group_by_length']:>15} {r['padded_tokens']:>14} {r['efficiency']:>12.3f} "
              f"{r['padded_tokens'] / base:>19.3f}x")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": a.data, "rows": n, "batch_size": a.batch_size, "mean_tokens": sum(tokens) / n,
                               "max_tokens": max(tokens), "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
