"""int8 weight-only quantization (`load(..., quantize="int8")`): speed, memory and quality, side by side.

Speed: the shape-(a) model of bench_vs_llava.py (Qwen2-0.5B-shaped LLM, random weights, a small 729-token
vision tower), float32 vs int8 in the same process: LLM linear weight bytes, time to first token with N
images, decode tokens/s. Quality: a trained model (default: the embedded one) on fresh synthetic
questions, float32 vs int8: accuracy, how often the two answer the same, and the relative logit error.

    python bench/bench_quantize.py                    # shape a, N=8, 32 decode steps, 96 quality questions
    python bench/bench_quantize.py --shape tiny --questions 8 --decode 4   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_llava import IMAGE, QUESTION, SHAPES, build_ours  # noqa: E402


def build(shape: str):
    m, v = SHAPES[shape]
    torch.manual_seed(0)
    return build_ours(m, v), m


def speed(model, vocab: int, n: int, decode: int, repeats: int) -> dict:
    from hyperowl.engine import Engine, Request, SamplingParams

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (n + QUESTION,), generator=g)
    pixels = torch.randn(n, 3, IMAGE, IMAGE, generator=g)
    engine = Engine(model)
    best_ttft, best_tok = float("inf"), 0.0
    for _ in range(repeats):
        req = Request(ids, pixel_values=pixels, image_positions=torch.arange(n),
                      params=SamplingParams(max_new_tokens=decode + 1, min_new_tokens=decode + 1))
        t0 = time.perf_counter()
        stream = engine.stream([req])
        next(stream)
        best_ttft = min(best_ttft, time.perf_counter() - t0)
        t1 = time.perf_counter()
        steps = sum(1 for _ in stream)
        best_tok = max(best_tok, steps / (time.perf_counter() - t1))
    return {"ttft_s": best_ttft, "decode_tok_s": best_tok}


def linear_bytes(model) -> int:
    from hyperowl.quantize import Int8Linear

    total = 0
    for name, mod in model.named_modules():
        if name.startswith(("vision", "projector")):
            continue
        if isinstance(mod, torch.nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
        elif isinstance(mod, Int8Linear):
            total += mod.nbytes
    if getattr(model, "lm_head", None) is None:  # tied: the float embedding is the head
        total += model.decoder.embed_tokens.weight.numel() * model.decoder.embed_tokens.weight.element_size()
    return total


def quality(model_dir: str | None, questions: int) -> dict:
    import hyperowl
    from hyperowl.data.synthetic import write_dataset
    from hyperowl.eval.runner import evaluate
    from hyperowl.quantize import quantize_int8

    fp = hyperowl.load(model_dir, device="cpu")
    q = hyperowl.Pipeline(copy.deepcopy(fp.model), fp.processor)  # the pipeline holds a cache lock: copy the model
    quantize_int8(q)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        per = max(1, questions // 3)
        data = write_dataset(Path(tmp) / "d", {"test": {"single": per, "multi": per, "distractor": questions - 2 * per}},
                             seed=777, progress=False)["test"]
        rows = {}
        for name, m in (("float32", fp), ("int8", q)):
            s = evaluate(m, data, Path(tmp) / name, batch_size=16)
            out[name] = {"accuracy": s["accuracy"]}
            rows[name] = [json.loads(x) for x in (Path(tmp) / name / "predictions.jsonl").read_text().splitlines()]
        same = sum(a["prediction"] == b["prediction"] for a, b in zip(rows["float32"], rows["int8"]))
        out["same_answer"] = same / max(1, len(rows["float32"]))
        out["questions"] = len(rows["float32"])
    # relative logit error on one real prompt
    msgs = [{"role": "user", "content": "<|image|>What colour is the circle in the image?"}]
    ex = Path(__file__).resolve().parents[1] / "examples" / "example_1.png"
    with torch.no_grad():
        b = fp.processor(msgs, images=[str(ex)])
        kw = dict(pixel_values=b.pixel_values, image_positions=b.image_positions[None])
        lf = fp(b.input_ids[None], **kw).logits
        lq = q(b.input_ids[None], **kw).logits
    out["logit_rel_err"] = ((lq - lf).norm() / lf.norm()).item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="a")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per row")
    ap.add_argument("--questions", type=int, default=96, help="quality: synthetic questions (0 = skip)")
    ap.add_argument("--model", default=None, help="quality: model dir (default: the embedded model)")
    ap.add_argument("--out", default="bench/results/quantize.json")
    args = ap.parse_args()
    from hyperowl.quantize import quantize_int8

    model, m = build(args.shape)
    rows = []
    for name in ("float32", "int8"):
        if name == "int8":
            quantize_int8(model)
        r = {"weights": name, "llm_linear_bytes": linear_bytes(model), **speed(model, m["vocab"], args.images, args.decode, args.repeats)}
        rows.append(r)
    base = rows[0]
    print(f"\nshape {args.shape}, {args.images} images, {args.decode} decode steps, {torch.get_num_threads()} threads")
    print(f"{'weights':8} {'LLM MiB':>9} {'TTFT s':>8} {'decode tok/s':>13} {'TTFT x':>7} {'decode x':>9}")
    for r in rows:
        print(f"{r['weights']:8} {r['llm_linear_bytes'] / 2**20:9.0f} {r['ttft_s']:8.2f} {r['decode_tok_s']:13.2f} "
              f"{base['ttft_s'] / r['ttft_s']:7.2f} {r['decode_tok_s'] / base['decode_tok_s']:9.2f}")
    result = {"shape": args.shape, "images": args.images, "decode": args.decode, "threads": torch.get_num_threads(), "speed": rows}
    if args.questions:
        qual = quality(args.model, args.questions)
        result["quality"] = qual
        print(f"\nquality ({qual['questions']} synthetic questions): accuracy float32 {qual['float32']['accuracy']:.3f}, "
              f"int8 {qual['int8']['accuracy']:.3f}; same answer {qual['same_answer']:.3f}; logit rel. error {qual['logit_rel_err']:.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
