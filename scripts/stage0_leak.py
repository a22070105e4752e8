"""How many val/test scenes did the shipped stage-0 tower see, and what is the test accuracy without them?

Why this exists (review finding, 2026-12-01): the shipped runs/vision-synthetic was trained while `--exclude`
misread the scenes files, so its stream skipped only its own held-out scenes. This replays the seeded streams
exactly as they ran (held-out seed 1_000_003: 256 scenes; training seed 0: 4000 x 32 scenes, skipping held-out
hashes), finds the test questions whose media show a seen scene (pixel match of the renders against the PNGs
and decoded mp4 frames), and rescores results/embedded-test without them. Needs data/synth and
results/embedded-test from scripts/train_embedded.sh.

    .venv/bin/python scripts/stage0_leak.py
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path

import av
import numpy as np
from PIL import Image

from hyperowl.data import synthetic as syn

DATA, PREDICTIONS = Path("data/synth"), Path("results/embedded-test/predictions.jsonl")
HELD_SEED, HELD, SEED, STEPS, BATCH = 1_000_003, 256, 0, 4000, 32


def pixel_key(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def main() -> None:
    test = syn.read_scene_hashes(DATA / "test.scenes.txt")[0]
    val = syn.read_scene_hashes(DATA / "val.scenes.txt")[0]
    rng = random.Random(HELD_SEED)
    seen = [syn.random_scene(rng, 64) for _ in range(HELD)]
    held = {s.hash for s in seen}
    rng, drawn, skipped = random.Random(SEED), 0, 0
    while drawn < STEPS * BATCH:
        s = syn.random_scene(rng, 64)
        if s.hash in held:
            skipped += 1
            continue
        drawn += 1
        if s.hash in test or s.hash in val:
            seen.append(s)
    hashes = {s.hash for s in seen}
    print(f"replayed: skipped {skipped} held-out scenes (runs/vision-synthetic/eval.json: skipped_excluded)")
    print(f"test scenes seen {len(hashes & test)} of {len(test)}; val scenes seen {len(hashes & val)} of {len(val)}")

    keys = {pixel_key(np.asarray(s.render())) for s in seen if s.hash in test}
    hit = set()
    for line in (DATA / "test.jsonl").read_text().splitlines():
        r = json.loads(line)
        frames = [np.asarray(Image.open(DATA / p).convert("RGB")) for p in r["images"]]
        for v in r["videos"]:
            with av.open(str(DATA / v)) as c:
                frames += [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        if any(pixel_key(f) in keys for f in frames):
            hit.add(r["id"])
    preds = [json.loads(line) for line in PREDICTIONS.read_text().splitlines()]
    clean = [p for p in preds if p["id"] not in hit]
    groups = defaultdict(list)
    for p in clean:
        groups[p["category"].split("/")[0]].append(p["correct"])
    print(f"test questions showing a seen scene: {len(hit)}")
    print(f"accuracy all {sum(p['correct'] for p in preds) / len(preds):.3f} (n={len(preds)}); without them "
          f"{sum(p['correct'] for p in clean) / len(clean):.3f} (n={len(clean)})")
    print("without them, per group: " + ", ".join(f"{g} {sum(v) / len(v):.3f} (n={len(v)})" for g, v in sorted(groups.items())))


if __name__ == "__main__":
    main()
