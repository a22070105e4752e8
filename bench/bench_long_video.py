"""Sampling 400 frames from a 2-hour video: seek + decode forward vs decoding the whole stream.

Generates (once, cached in --workdir) a low-resolution test video of --hours hours with a keyframe every
--keyint seconds, then, each in a fresh process (so peak RSS is that run's own), measures:
- full: decode every frame of the stream (what a naive reader does), keep 400;
- exact: hyperowl's sampler (seek to the keyframe before each target, decode forward to the exact frame);
- keyframes: the sampler with keyframes=True (keep the keyframe a seek lands on);
- the exact sampler on a video 1/12 as long, to show memory does not grow with the video's length.
Reports wall time, frames decoded, frames decoded per frame kept, seeks and peak RSS; prints a table,
writes JSON and a PNG.

    python bench/bench_long_video.py                    # 2 h, 400 frames
    python bench/bench_long_video.py --hours 0.05 --frames 20   # smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_video(path: Path, seconds: float, fps: int, keyint: float, size: tuple[int, int] = (96, 64)) -> Path:
    import av
    from tqdm import tqdm

    from hyperowl.data.synthetic import video_codec

    w, h = size
    n = int(seconds * fps)
    tmp = path.with_suffix(".partial.mp4")
    with av.open(str(tmp), "w") as out:
        codec = video_codec()
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        gop = max(1, int(round(keyint * fps)))
        stream.gop_size = gop
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "keyint_min": str(gop), "sc_threshold": "0"}
        base = np.zeros((h, w, 3), np.uint8)
        for k in tqdm(range(n), desc=f"writing {seconds / 3600:.2f} h test video", unit="frame", mininterval=1):
            img = base.copy()
            img[:] = ((k // fps) * 7 % 200 + 30, (k // (fps * 60)) * 13 % 200 + 30, 120)  # changes every second / minute
            x = (k * 3) % (w - 12)
            img[20:32, x:x + 12] = (250, 250, 250)  # a moving square
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(path)
    return path


def worker(mode: str, path: str, frames: int) -> dict:
    import av

    from hyperowl.processing.video import sample_video

    t = time.perf_counter()
    if mode == "full":
        with av.open(path) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            decoded = sum(1 for _ in c.decode(s))
        res = {"frames_decoded": decoded, "seeks": 0, "kept": frames}
    else:
        v = sample_video(path, max_frames=frames, keyframes=mode == "keyframes", progress=False)
        res = {"frames_decoded": v.frames_decoded, "seeks": v.seeks, "kept": len(v.frames)}
    res["seconds"] = time.perf_counter() - t
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--fps", type=int, default=4)
    ap.add_argument("--keyint", type=float, default=4.0, help="seconds between keyframes")
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--workdir", default="/tmp/hyperowl-bench")
    ap.add_argument("--out", default="bench/results/long_video.json")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], int(a.worker[2]))))
        return

    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    videos = {}
    for name, hours in (("long", a.hours), ("short", a.hours / 12)):
        p = wd / f"test_{hours:.3f}h_{a.fps}fps_k{a.keyint:g}.mp4"
        videos[name] = p if p.exists() else make_video(p, hours * 3600, a.fps, a.keyint)
    runs = [("full", "long"), ("exact", "long"), ("keyframes", "long"), ("exact", "short")]
    rows = []
    for mode, which in runs:
        r = subprocess.run([sys.executable, __file__, "--worker", mode, str(videos[which]), str(a.frames)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(r.stderr[-3000:])
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row.update(mode=mode, video_hours=a.hours if which == "long" else a.hours / 12)
        row["decoded_per_kept"] = row["frames_decoded"] / max(1, row["kept"])
        rows.append(row)
    full = rows[0]["seconds"]
    print(f"\n{a.hours:g} h video at {a.fps} fps, keyframe every {a.keyint:g} s; {a.frames} frames kept")
    print(f"{'mode':>10} {'video h':>8} {'seconds':>8} {'vs full':>8} {'decoded':>8} {'per kept':>9} {'seeks':>6} {'peak MiB':>9}")
    for r in rows:
        r["speedup_vs_full"] = full / r["seconds"]
        print(f"{r['mode']:>10} {r['video_hours']:>8.2f} {r['seconds']:>8.2f} {r['speedup_vs_full']:>7.1f}x {r['frames_decoded']:>8} "
              f"{r['decoded_per_kept']:>9.2f} {r['seeks']:>6} {r['peak_rss_bytes'] / 2 ** 20:>9.0f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"hours": a.hours, "fps": a.fps, "keyint_s": a.keyint, "frames": a.frames, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f"{r['mode']}\n{r['video_hours']:.2g} h" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].bar(labels, [r["seconds"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("seconds to get the frames")
    axes[0].set_yscale("log")
    axes[1].bar(labels, [r["decoded_per_kept"] for r in rows], color="tab:orange")
    axes[1].axhline(2, color="k", lw=0.8, ls="--")
    axes[1].set_ylabel("frames decoded per frame kept")
    axes[1].set_yscale("log")
    fig.suptitle(f"{a.frames} frames from a {a.hours:g} h video (keyframe every {a.keyint:g} s)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
