"""Frames of a long video into the vision tower: decode everything, then encode vs decoding overlapped with
the tower (processing/overlap.py), side by side.

Samples --frames frames of the 2-hour test video of bench_long_video.py (made once, cached in --workdir)
and turns them into image embeddings with a tower of issue 7's shape (a) (378 px, 729 tokens per image;
hidden 256, 3 layers) and its projection, each mode in a fresh process (peak RSS is that run's own):
- sequential: `processor(...)` decodes and resizes every frame, then `model.encode_images(pixel_values)`;
- overlapped: `Encoder(model, processor, chunk=..., overlap=True).encode(plan)`: chunks of --chunk frames
  decode in a thread while the tower encodes the previous chunk; only a few chunks of pixels exist at once;
- chunked: the same chunks decoded and encoded in turn in one thread (`overlap=False`, chat's CPU default).
Also times decoding alone and encoding alone (the two parts the overlap can hide behind each other).
Checks that both modes give the same embeddings. Prints a table, writes JSON and a PNG.

    python bench/bench_video_encode.py                      # 400 frames of the 2 h video
    python bench/bench_video_encode.py --frames 16 --hours 0.05   # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build():
    import torch

    from hyperowl.config import Owl3Config, SiglipConfig
    from hyperowl.models.owl3 import Owl3Model
    from hyperowl.processing.processor import Owl3Processor
    from hyperowl.train.trainer import SPECIAL_TOKENS

    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    cfg = Owl3Config(vocab_size=256, hidden_size=896, intermediate_size=256, num_layers=1, num_heads=14, num_kv_heads=2,
                     hyper_layers=(1,), vision=SiglipConfig(hidden_size=256, intermediate_size=1024, num_layers=3,
                                                            num_heads=4, image_size=378, patch_size=14),
                     vision_batch_size=16, cut_enable=False)
    model = Owl3Model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL_TOKENS + ["[UNK]"])}, unk_token="[UNK]"))
    tok.add_special_tokens(SPECIAL_TOKENS)
    return model, Owl3Processor(tok, image_size=378, cut=False)


def worker(mode: str, path: str, frames: int, chunk: int) -> dict:
    import torch

    from hyperowl.encoder import Encoder

    model, proc = build()
    messages = [{"role": "user", "content": "<|video|>What happens?"}]
    t = time.perf_counter()
    with torch.no_grad():
        if mode == "sequential":
            x = proc(messages, videos=[path], max_frames=frames, progress=False)
            embeds = model.encode_images(x.pixel_values)
        elif mode in ("overlapped", "chunked"):
            plan = proc.plan(messages, videos=[path], max_frames=frames)
            embeds = Encoder(model, proc, chunk=chunk, overlap=mode == "overlapped").encode(plan, progress=False)
        elif mode == "decode only":  # the processor's pixel path: frames resized into one tensor as they decode
            embeds = proc.video_pixels(path, max_frames=frames, progress=False)
        else:  # encode only: the tower on frames already in memory
            px = proc.video_pixels(path, max_frames=frames, progress=False)
            t = time.perf_counter()
            embeds = model.encode_images(px)
    seconds = time.perf_counter() - t
    # Peak RSS before the digest below: hashing makes rounded copies of all embeddings (it once added 2 GB here).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    h = hashlib.sha1()
    for e in embeds:  # one frame at a time
        h.update(e.float().numpy().round(4).tobytes())
    return {"seconds": seconds, "peak_rss_bytes": peak, "frames": int(embeds.shape[0]), "digest": h.hexdigest(),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--chunk", type=int, default=16, help="frames per tower call in overlapped mode")
    ap.add_argument("--repeats", type=int, default=2, help="runs per mode (fresh processes, alternating); the best counts")
    ap.add_argument("--workdir", default="/tmp/hyperowl-bench")
    ap.add_argument("--out", default="bench/results/video_encode.json")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], int(a.worker[2]), int(a.worker[3]))))
        return

    from bench_long_video import make_video

    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    video = wd / f"test_{a.hours:.3f}h_4fps_k4.mp4"  # the same file bench_long_video.py makes
    if not video.exists():
        make_video(video, a.hours * 3600, 4, 4.0)
    modes = ["decode only", "encode only", "sequential", "chunked", "overlapped"]
    best: dict[str, dict] = {}
    from tqdm import tqdm

    with tqdm(total=len(modes) * a.repeats, desc="runs", unit="run") as bar:
        for _ in range(a.repeats):
            for mode in modes:
                r = subprocess.run([sys.executable, __file__, "--worker", mode, str(video), str(a.frames), str(a.chunk)],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(r.stderr[-3000:])
                row = json.loads(r.stdout.strip().splitlines()[-1])
                if mode not in best or row["seconds"] < best[mode]["seconds"]:
                    best[mode] = {**row, "mode": mode}
                bar.update(1)
    rows = [best[m] for m in modes]
    same = best["sequential"]["digest"] == best["overlapped"]["digest"] == best["chunked"]["digest"]
    seq, ovl = best["sequential"]["seconds"], best["overlapped"]["seconds"]
    ideal = max(best["decode only"]["seconds"], best["encode only"]["seconds"])
    print(f"\n{a.frames} frames of a {a.hours:g} h video -> tower of shape (a) (378 px, 729 tokens/frame), "
          f"{rows[0]['threads']} torch threads; best of {a.repeats}")
    print(f"{'mode':>12} {'seconds':>8} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['mode']:>12} {r['seconds']:>8.2f} {r['peak_rss_bytes'] / 2 ** 20:>9.0f}")
    for m in ("chunked", "overlapped"):
        print(f"{m} vs sequential: {seq / best[m]['seconds']:.2f}x faster, peak RSS "
              f"{best[m]['peak_rss_bytes'] / best['sequential']['peak_rss_bytes']:.2f}x")
    print(f"perfect overlap would take max(decode, encode) = {ideal:.2f} s; same embeddings: {same}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"hours": a.hours, "frames": a.frames, "chunk": a.chunk, "repeats": a.repeats,
                               "same_embeddings": same, "speedup": seq / ovl,
                               "speedup_chunked": seq / best["chunked"]["seconds"], "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar([r["mode"] for r in rows], [r["seconds"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("seconds")
    axes[1].bar([r["mode"] for r in rows], [r["peak_rss_bytes"] / 2 ** 20 for r in rows], color="tab:orange")
    axes[1].set_ylabel("peak RSS (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{a.frames} frames of a {a.hours:g} h video into the vision tower (CPU)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    if not same:
        sys.exit("overlapped and sequential embeddings differ")


if __name__ == "__main__":
    main()
