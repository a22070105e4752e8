"""Loss curve PNG from a training log (log.jsonl): `hyperowl plot-log`."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError


def plot_log(log_path: str | Path, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = Path(log_path)
    if not p.is_file():
        raise InputError(f"log '{log_path}': no such file")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise InputError(f"{p}:{n}: not a JSON line") from None
    # a resumed run re-logs the steps after its last checkpoint: the later record of a step wins
    rows = sorted({r["step"]: r for r in rows if "step" in r and "loss" in r}.values(), key=lambda r: r["step"])
    if not rows:
        raise InputError(f"log '{log_path}': no step/loss records")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.5, label="train loss")
    val = [r for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, color="tab:green", label="val loss")
    ax.legend(loc="upper right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per target token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if "lr" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange", lw=1, alpha=0.6, label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title(p.parent.name or "training")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
