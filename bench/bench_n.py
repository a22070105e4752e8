"""n answers from one prompt: one prefill shared by the n rows vs the rows prefilled side by side (no server).

One prompt with --images images (hashed, as the server hashes them) and text around them; each row samples
--new tokens (temperature 1, its own seed, no stop) on `ContinuousEngine`, all rows added in one step, as the
server's continuous scheduler adds the n jobs of one request (or a burst of separate requests with the same
prompt: the engine sees the same thing). Modes:
- n=1: one row;
- n=8 shared: the engine as it is (the first row is prefilled, the others wait for its blocks and reuse them);
- n=8 side by side: the admission without waiting (`_follows` off), as before: every row prefills the prompt.
Reported: time to the first row's first token, to every row's first token, total, and the engine's
`prefill_tokens` / `cached_tokens`. Outputs of the two n=8 modes are checked equal (same seeds). Image
features are random (the engine takes features; the tower is not measured).

    python bench/bench_n.py                     # the embedded model, 16 images, n=8, 16 new tokens
    python bench/bench_n.py --n 4 --out bench/results/n.json

--server: the same question through the real server (uvicorn in this process, the continuous scheduler, the
embedded model, streamed chat requests over HTTP with httpx): one request with n=8 against eight separate
requests (seeds 0..7) sent at once, for a prompt of --images distinct 64x64 PNG data URLs (n=1 as the
baseline). Reported: time to the first content chunk of any choice / of every choice, total (to the last
[DONE]), and the engine's prefill / cached tokens (/health). The feature cache is warm in every mode (a
warm-up request first), so the difference is the prefill and the scheduling, not the vision tower; each timed
run's prompt starts with its own line, so none reuses an earlier run's K/V. The answers are checked equal on one
more prompt, untimed (choice i of n=8 is the single answer seeded i).

    python bench/bench_n.py --server --out bench/results/n_server.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def prompt(model, images: int, text: int, seed: int):
    from hyperowl.engine import Request

    g = torch.Generator().manual_seed(seed)
    t, h = model.config.vision.tokens_per_image, model.config.hidden_size
    ids = torch.randint(10, 1000, (text + images,), generator=g)
    pos = torch.arange(8, 8 + 2 * images, 2)  # a placeholder every other token after a short preamble
    return Request(ids, 0.5 * torch.randn(images, t, h, generator=g), pos,
                   media_hashes=tuple(f"image{i}" for i in range(images)))


def run(model, base, n: int, new: int, share: bool):
    import dataclasses

    from hyperowl.batching import ContinuousEngine
    from hyperowl.engine import SamplingParams

    eng = ContinuousEngine(model)
    if not share:
        eng._follows = lambda x, prefilling: False  # the admission before the change
    t0 = time.perf_counter()
    for i in range(n):
        eng.add(i, dataclasses.replace(base, params=SamplingParams(max_new_tokens=new, temperature=1.0, seed=i)))
    first, toks = {}, {}
    while eng.has_work():
        for e in eng.step():
            if e.token is not None:
                first.setdefault(e.request_id, time.perf_counter() - t0)
                toks.setdefault(e.request_id, []).append(e.token)
    total = time.perf_counter() - t0
    st = eng.stats()
    return [toks[i] for i in range(n)], dict(ttft_first_s=min(first.values()), ttft_all_s=max(first.values()),
                                              total_s=total, prefill_tokens=st["prefill_tokens"],
                                              cached_tokens=st["cached_tokens"])


def server_mode(a) -> None:
    import base64
    import io
    import threading

    import httpx
    from PIL import Image

    import hyperowl
    from hyperowl.serve import ServeConfig, ServerThread, create_app

    pipe = hyperowl.load(device="cpu")
    urls = []
    for i in range(a.images):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), ((37 * i) % 256, (91 * i) % 256, (151 * i + 60) % 256)).save(buf, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    def body_of(run: int) -> dict:
        # a run-specific first line: no timed run reuses an earlier run's prompt blocks from the prefix cache (the
        # images' features do come from the feature cache: it is the prefill and scheduling that are compared)
        content = [{"type": "text", "text": f"Request {run}: look at these pictures."}]
        content += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        content.append({"type": "text", "text": "Describe each of them in a few words."})
        return dict(model="owl", messages=[{"role": "user", "content": content}], max_tokens=a.new,
                    min_tokens=a.new, temperature=1.0, stream=True)

    def stream(url: str, req: dict, t0: float, firsts: dict, texts: dict, key: int) -> None:
        with httpx.stream("POST", url, json=req, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for c in json.loads(line[6:]).get("choices", []):
                    piece = c["delta"].get("content")
                    if piece:
                        k = key + c["index"]
                        firsts.setdefault(k, time.perf_counter() - t0)
                        texts[k] = texts.get(k, "") + piece

    with ServerThread(create_app(pipe, pipe.processor, ServeConfig(model_name="owl"))) as srv:
        url = srv.url + "/v1/chat/completions"

        def counters() -> dict:
            return httpx.get(srv.url + "/health", timeout=30).json()["scheduler"]["prefix_cache"]

        def measure(n: int, separate: bool, run: int) -> tuple[list[str], dict]:
            before, firsts, texts, body = counters(), {}, {}, body_of(run)
            t0 = time.perf_counter()
            if separate:
                threads = [threading.Thread(target=stream, args=(url, dict(body, seed=i), t0, firsts, texts, i))
                           for i in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            else:
                stream(url, dict(body, n=n, seed=0), t0, firsts, texts, 0)
            total = time.perf_counter() - t0
            after = counters()
            return [texts.get(i, "") for i in range(n)], dict(
                ttft_first_s=min(firsts.values()), ttft_all_s=max(firsts.values()), total_s=total,
                prefill_tokens=after["prefill_tokens"] - before["prefill_tokens"],
                cached_tokens=after["cached_tokens"] - before["cached_tokens"])

        measure(1, False, 0)  # warm-up: the images' features go into the feature cache
        modes = {"n=1": (1, False), f"n={a.n}, one request": (a.n, False), f"{a.n} separate requests": (a.n, True)}
        runs = {k: [] for k in modes}
        run = 0
        for _ in range(a.repeat):
            for k, (n, sep) in modes.items():
                run += 1
                runs[k].append(measure(n, sep, run)[1])
        # the answers (untimed, one prompt for all three): choice i of n is the single answer seeded i
        outs = [measure(n, sep, run + 1)[0] for n, sep in modes.values()]
    best = {k: {m: min(r[m] for r in rs) for m in rs[0]} for k, rs in runs.items()}
    same = outs[1] == outs[2] and outs[0][0] == outs[1][0]
    print(f"server (uvicorn, continuous scheduler), embedded model, {a.images} images, {a.new} new tokens a choice, "
          f"cpu fp32, {torch.get_num_threads()} threads, best of {a.repeat}; answers equal: {same}")
    report(best, 22, a.out, dict(server=True, images=a.images, n=a.n, new_tokens=a.new,
                                 threads=torch.get_num_threads(), repeat=a.repeat, outputs_equal=same))
    if not same:
        sys.exit("the modes' answers differ")


def report(best: dict, width: int, out: str, meta: dict) -> None:
    """The table of the best run of each mode, and the JSON (meta + modes)."""
    print(f"{'mode':{width}} {'TTFT first s':>12} {'TTFT all s':>11} {'total s':>8} {'prefill tok':>12} {'cached tok':>11}")
    for k, r in best.items():
        print(f"{k:{width}} {r['ttft_first_s']:12.3f} {r['ttft_all_s']:11.3f} {r['total_s']:8.3f} "
              f"{r['prefill_tokens']:12d} {r['cached_tokens']:11d}")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta, modes=best), indent=1))
    print(f"\nwrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--text", type=int, default=64, help="text tokens besides the image placeholders")
    ap.add_argument("--new", type=int, default=16, help="new tokens per row")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each mode (alternated; best reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="JSON (default bench/results/n.json; --server: n_server.json)")
    ap.add_argument("--server", action="store_true", help="through the real server: n=8 vs 8 separate requests")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out = a.out or str(ROOT / "bench/results" / ("n_server.json" if a.server else "n.json"))
    if a.server:
        return server_mode(a)
    import hyperowl

    model = hyperowl.load(device="cpu", feature_cache_mb=0).model
    base = prompt(model, a.images, a.text, 0)
    modes = {"n=1": (1, True), f"n={a.n} shared": (a.n, True), f"n={a.n} side by side": (a.n, False)}
    with torch.no_grad():
        run(model, base, 2, 2, True)  # warm-up
        runs = {k: [] for k in modes}
        outs = {}
        for _ in range(a.repeat):  # alternated, best of each: a shared machine's load moves between runs
            for k, (n, share) in modes.items():
                outs[k], r = run(model, base, n, a.new, share)
                runs[k].append(r)
    best = {k: {m: min(r[m] for r in rs) for m in rs[0]} for k, rs in runs.items()}
    names = list(modes)
    same = outs[names[1]] == outs[names[2]] and outs[names[0]][0] == outs[names[1]][0]
    print(f"embedded model, one prompt of {len(base.input_ids)} tokens with {a.images} images, {a.new} new tokens a "
          f"row, cpu fp32, {torch.get_num_threads()} threads, best of {a.repeat}; outputs equal: {same}")
    report(best, 18, a.out, dict(prompt_tokens=len(base.input_ids), images=a.images, n=a.n, new_tokens=a.new,
                                 threads=torch.get_num_threads(), repeat=a.repeat, outputs_equal=same))
    if not same:
        sys.exit("the modes' outputs differ")


if __name__ == "__main__":
    main()
