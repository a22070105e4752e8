"""Serving benchmark: throughput with 1 vs N concurrent streaming clients (dynamic batching), and
time-to-first-token of a repeated image/video with the visual feature cache (first vs second request).

The server runs in this process (uvicorn in a thread, `hyperowl.serve.ServerThread`) on 127.0.0.1; clients
are threads speaking HTTP + SSE with httpx. Without `--model`, a random Owl3-shaped model is built (random
weights: answers are gibberish, which does not matter for timing) with a SigLIP-like tower big enough that
the vision encoder costs what it does in practice relative to the decoder. Every request generates exactly
`--max-tokens` tokens (`min_tokens`), so throughput compares like with like.

TTFT is measured as the latency of a streamed `max_tokens=1` request (first byte of the answer's only
token), i.e. media fetch + decode + preprocessing + vision encoding (skipped on a cache hit) + prefill.

Prints a table and writes bench/results/serve.json.

    python bench/bench_serve.py [--clients 1 8] [--requests 4] [--max-tokens 32] [--model PATH]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without an install

from hyperowl.config import Owl3Config, SiglipConfig  # noqa: E402
from hyperowl.models.owl3 import Owl3Model  # noqa: E402
from hyperowl.processing.chat import STOP_TOKENS  # noqa: E402
from hyperowl.pipeline import Pipeline  # noqa: E402
from hyperowl.processing.processor import Owl3Processor  # noqa: E402
from hyperowl.serve import ServeConfig, ServerThread, create_app  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image|>", "<|video|>", "<|start_cut|>", "<|end_cut|>",
           "<|start_video_frame|>", "<|end_video_frame|>"]


def make_tokenizer(vocab: int):
    """A byte-level BPE with the chat special tokens, trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["What happens in this video? Describe the picture in detail.", "A red circle next to a blue square."] * 50
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 2000), special_tokens=SPECIAL + list(STOP_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def random_model(a: argparse.Namespace):
    torch.manual_seed(0)
    cfg = Owl3Config(vocab_size=4096, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_layers=a.layers,
                     num_heads=max(1, a.hidden // 64), num_kv_heads=max(1, a.hidden // 128),
                     hyper_layers=tuple(range(1, a.layers + 1, 4)),
                     vision=SiglipConfig(hidden_size=a.vision_hidden, intermediate_size=4 * a.vision_hidden,
                                         num_layers=a.vision_layers, num_heads=max(1, a.vision_hidden // 64),
                                         image_size=a.image_size, patch_size=14))
    model = Owl3Model(cfg).to(a.device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return Pipeline(model, Owl3Processor(make_tokenizer(cfg.vocab_size), variant=cfg.variant,
                                         image_size=cfg.vision.image_size))


def png_url(seed: int, size=(480, 360)) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def video_url(seed: int, frames: int) -> str:
    import av

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "v.mp4")
        with av.open(path, "w") as c:
            s = c.add_stream("mpeg4", rate=10)
            s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
            rng = np.random.default_rng(seed)
            for _ in range(frames * 2):
                frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), format="rgb24")
                for pkt in s.encode(frame):
                    c.mux(pkt)
            for pkt in s.encode():
                c.mux(pkt)
        data = Path(path).read_bytes()
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def stream_request(client: httpx.Client, url: str, body: dict) -> tuple[float, int, float]:
    """(time to the first token's chunk, completion tokens, total seconds) of one streamed request."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True,
                                                                   "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                raise RuntimeError(msg["error"]["message"])
            ch = msg["choices"][0] if msg["choices"] else {}
            first = ch.get("delta", {}).get("content") or ch.get("finish_reason")
            if ttft is None and first:
                ttft = time.perf_counter() - t0
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
    return ttft or 0.0, tokens, time.perf_counter() - t0


def throughput(url: str, model_name: str, clients: int, requests: int, max_tokens: int) -> dict:
    body = {"model": model_name, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0.7}
    results: list[tuple[float, int, float]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client_loop(i: int) -> None:
        with httpx.Client(timeout=600) as c:
            barrier.wait()
            for k in range(requests):
                msgs = [{"role": "user", "content": f"Client {i} question {k}: describe the picture in detail."}]
                res = stream_request(c, url, {**body, "messages": msgs, "seed": i * 1000 + k})
                with lock:
                    results.append(res)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
            "mean_latency_s": statistics.mean(r[2] for r in results),
            "mean_ttft_s": statistics.mean(r[0] for r in results)}


def ttft_cache(url: str, model_name: str, kind: str, trials: int, frames: int) -> dict:
    first, second = [], []
    with httpx.Client(timeout=600) as c:
        for t in range(trials):
            media = png_url(1000 + t) if kind == "image" else video_url(2000 + t, frames)
            part = {"type": f"{kind}_url", f"{kind}_url": {"url": media}}

            def ask(q: str) -> float:
                msgs = [{"role": "user", "content": [part, {"type": "text", "text": q}]}]
                return stream_request(c, url, {"model": model_name, "max_tokens": 1, "messages": msgs})[0]

            first.append(ask("What is this?"))
            second.append(ask("And what happens next?"))  # a follow-up about the same media: a cache hit
    f, s = statistics.median(first), statistics.median(second)
    return {"media": kind, "trials": trials, "first_ttft_s": f, "second_ttft_s": s, "speedup": f / s if s else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a checkpoint directory (default: a random model, see --hidden)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision-hidden", type=int, default=256)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--frames", type=int, default=16, help="frames per video (server --frames)")
    ap.add_argument("--trials", type=int, default=3, help="media per TTFT measurement (median)")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default on CPU: cores - 1, like hyperowl serve)")
    ap.add_argument("--out", default="bench/results/serve.json")
    a = ap.parse_args()
    if a.threads or a.device == "cpu":  # the same default as `hyperowl serve`: one core left to the event loop
        torch.set_num_threads(a.threads or max(1, torch.get_num_threads() - 1))
    if a.model:
        import hyperowl

        model = hyperowl.load(a.model, device=a.device)
    else:
        model = random_model(a)
    name = "bench-owl"
    cfg = ServeConfig(model_name=name, batching="dynamic", max_batch_size=a.max_batch_size, batch_window_ms=10,
                      max_frames=a.frames, max_queue=max(64, 2 * max(a.clients)), max_tokens_limit=max(4096, a.max_tokens))
    with ServerThread(create_app(model, model.processor, cfg)) as srv:
        stream_request(httpx.Client(timeout=600), srv.url, {"model": name, "max_tokens": 2,  # warm-up
                                                            "messages": [{"role": "user", "content": "Hi"}]})
        tp = [throughput(srv.url, name, c, a.requests, a.max_tokens) for c in a.clients]
        cache = [ttft_cache(srv.url, name, kind, a.trials, a.frames) for kind in ("image", "video")]
        sched = srv.server.config.app.state.scheduler.stats()

    base = tp[0]["tokens_per_s"]
    print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'vs first':>8} {'latency s':>9} {'TTFT s':>7}")
    for r in tp:
        r["speedup_vs_first"] = r["tokens_per_s"] / base
        print(f"{r['clients']:>7} {r['requests']:>8} {r['completion_tokens']:>7} {r['wall_s']:>7.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['speedup_vs_first']:>8.2f} {r['mean_latency_s']:>9.3f} {r['mean_ttft_s']:>7.3f}")
    print(f"\n{'media':>6} {'1st TTFT s':>10} {'2nd TTFT s (cached)':>19} {'speedup':>7}")
    for r in cache:
        print(f"{r['media']:>6} {r['first_ttft_s']:>10.3f} {r['second_ttft_s']:>19.3f} {r['speedup']:>7.2f}")
    print(f"\nbatch sizes run: {sched['batch_sizes']}")
    conf = {k: getattr(a, k) for k in ("model", "hidden", "layers", "vision_hidden", "vision_layers", "image_size",
                                       "frames", "max_tokens", "requests", "max_batch_size", "device")}
    conf.update(tokens_per_image=model.config.vision.tokens_per_image, torch_threads=torch.get_num_threads(),
                machine=platform.machine(), cpus=os.cpu_count(),
                gpu=torch.cuda.get_device_name() if a.device.startswith("cuda") else None)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"config": conf, "throughput": tp, "feature_cache_ttft": cache,
                                       "batch_sizes": sched["batch_sizes"]}, indent=2))


if __name__ == "__main__":
    main()
