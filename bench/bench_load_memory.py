"""Peak memory of loading a checkpoint: hyperowl's streaming loader vs the naive load_file + load_state_dict.

Each variant runs in a fresh subprocess; peak RSS (VmHWM) minus the RSS before loading is reported
next to the checkpoint size, after every weight has been read once (safetensors maps files lazily). Prints a table and writes bench/results/load_memory.json.

    python bench/bench_load_memory.py [--hidden 1024 --layers 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import re, sys, torch
from pathlib import Path
torch.set_num_threads(1)
d, mode = Path(sys.argv[1]), sys.argv[2]
import hyperowl.checkpoint as ck
from hyperowl.config import Owl3Config
from hyperowl.keymaps import owl3_ignored
from hyperowl.models.owl3 import Owl3Model
from safetensors.torch import load_file
def status(field):  # kB -> bytes; VmHWM is this process's own peak (ru_maxrss would include the parent's)
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
base = status("VmRSS")
if mode == "hyperowl":
    m = ck.load_owl3(d)
else:  # naive: build with random init, read the whole file, copy in
    cfg = Owl3Config.from_hf_dict(__import__("json").loads((d / "config.json").read_text()), "240728")
    m = Owl3Model(cfg)
    sd = load_file(str(d / "model.safetensors"))
    mapping = ck.map_keys(sd, ck.OWL3_KEYS, owl3_ignored(cfg, cfg.tie_word_embeddings))
    m.load_state_dict({mapping[k]: v for k, v in sd.items() if k in mapping})
with torch.no_grad():  # touch every weight so lazily mapped pages are counted
    sum(float(p.sum()) for p in m.parameters())
print(status("VmHWM") - base)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default="bench/results/load_memory.json")
    a = ap.parse_args()

    from hyperowl.checkpoint import save_owl3
    from hyperowl.config import PRESETS
    from hyperowl.models.owl3 import Owl3Model

    cfg = PRESETS["tiny-240728"].replace(hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_layers=a.layers,
                                         num_heads=a.hidden // 64, num_kv_heads=2, vocab_size=32000, hyper_layers=(1,))
    with tempfile.TemporaryDirectory() as tmp:
        save_owl3(Owl3Model(cfg), tmp)
        size = (Path(tmp) / "model.safetensors").stat().st_size
        rows = []
        for mode in ("hyperowl", "naive"):
            r = subprocess.run([sys.executable, "-c", CHILD, tmp, mode], capture_output=True, text=True, check=True)
            rows.append({"loader": mode, "checkpoint_bytes": size, "peak_rss_increase_bytes": int(r.stdout.strip())})
    print(f"{'loader':<10} {'checkpoint MB':>14} {'peak RSS +MB':>13} {'ratio':>6}")
    for row in rows:
        row["ratio"] = row["peak_rss_increase_bytes"] / size
        print(f"{row['loader']:<10} {size / 2**20:>14.1f} {row['peak_rss_increase_bytes'] / 2**20:>13.1f} {row['ratio']:>6.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
