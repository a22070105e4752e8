"""Write tiny files in the layouts benchmarks and training tools publish, into tests/data/formats/.

Run: PYTHONPATH=. python scripts/make_format_samples.py   (deterministic; needs pyarrow, and `datasets` for the
save_to_disk folder, which is skipped without it). Every layout is written from its published field list
(what the files contain), with our own drawn images and videos, so the tests read files shaped exactly like
the ones users download:

* MMBench (VLMEvalKit's MMBench_DEV_EN.tsv): index, question, hint, A-D, answer, category, image (base64),
  source, l2-category, comment, split. Circular copies are rows index + k * 1e6 with the options rotated by
  k, and their image cell holds the base row's index. A VLMEvalKit prediction file: the same rows without
  the image column, plus `prediction`. lmms-lab's Parquet: image as a {"bytes", "path"} struct, int64 index.
* Video-MME (lmms-lab/Video-MME videomme/test-00000-of-00001.parquet): video_id, duration, domain,
  sub_category, url, videoID, question_id, task_type, question, options ("A. ..."), answer (letter); videos
  as data/<videoID>.mp4. Its JSON: the same records flat, and the official per-video results form
  ({video_id, duration, domain, sub_category, questions: [{question_id, task_type, question, options,
  answer, response}]}).
* MVBench (json/<task>.json): video, question, candidates, answer (option text), start/end (seconds) for
  the tasks asked about a clip; videos in their own tree (video/star/...).
* LLaVA (llava_v1_5_mix665k.json): a JSON list of {id, image, conversations: [{from: human|gpt, value}]}
  with `<image>` tags; text-only and multi-image records too.
* ms-swift: JSONL of {messages, images} with `<image>` tags, and its {query, response, history, images}
  form; the same records as Parquet.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "formats"
STRIDE = 1_000_000
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 210, 0)}


def shape(colour: str, kind: str = "circle", size: int = 32, at: tuple[int, int] | None = None) -> Image.Image:
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    x, y = at if at is not None else (size // 4, size // 4)
    box = (x, y, x + size // 2, y + size // 2)
    (d.ellipse if kind == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    return im


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def rotated(options: list[str], answer: int, k: int) -> tuple[list[str], int]:
    n = len(options)
    return options[k:] + options[:k], (answer - k) % n


MMB_QUESTIONS = [  # (index, question, hint, options, answer, image, category, l2-category)
    (1, "What colour is the circle?", "", ["red", "green", "blue", "yellow"], 0, ("red", "circle"),
     "attribute_recognition", "finegrained_perception (instance-level)"),
    (2, "What shape is shown?", "Look carefully.", ["triangle", "square", "circle"], 1, ("blue", "square"),
     "object_localization", "finegrained_perception (instance-level)"),
    (3, "Is the object round?", "", ["yes", "no"], 0, ("green", "circle"), "physical_property_reasoning",
     "attribute_reasoning"),
]
MMB_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
               "l2-category", "comment", "split"]
# A prediction file's answers, per row index: question 1 right in every copy, question 2 wrong in its last
# copy, question 3 wrong in its base row. CircularEval: 1 of 3; base rows only (--no-circular): 2 of 3.
MMB_PREDICTIONS = {1: "A", 1000001: "D", 2000001: "(C)", 3000001: "B. red",
                   2: "B", 1000002: "A. square", 2000002: "A",
                   3: "no", 1000003: "B"}


def mmbench_rows() -> list[dict]:
    rows = []
    for k in range(4):  # base rows first, then each copy round, as in the published file
        for idx, q, hint, opts, ans, (colour, kind), cat, l2 in MMB_QUESTIONS:
            if k >= len(opts):
                continue
            o, a = rotated(opts, ans, k)
            row = {"index": idx + k * STRIDE, "question": q, "hint": hint,
                   **{L: (o[i] if i < len(o) else "") for i, L in enumerate("ABCD")}, "answer": "ABCD"[a],
                   "category": cat, "image": base64.b64encode(png(shape(colour, kind))).decode() if k == 0 else str(idx),
                   "source": "hyperowl-sample", "l2-category": l2, "comment": "", "split": "dev"}
            rows.append(row)
    return rows


def write_tsv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def mmbench() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = mmbench_rows()
    write_tsv(OUT / "MMBench_DEV_EN_sample.tsv", rows, MMB_COLUMNS)
    pred = [dict(r, prediction=MMB_PREDICTIONS[r["index"]]) for r in rows]
    write_tsv(OUT / "hyperowl_MMBench_DEV_EN_sample.tsv", pred, [c for c in MMB_COLUMNS if c != "image"] + ["prediction"])
    # lmms-lab's Parquet: every row carries its own image as an Image struct; empty cells are null
    by_idx = {r["index"]: r for r in rows}
    recs = []
    for r in rows:
        b64 = by_idx[r["index"] % STRIDE]["image"]
        recs.append({**{k: (v if v != "" else None) for k, v in r.items() if k != "image"},
                     "image": {"bytes": base64.b64decode(b64), "path": None}})
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([(k, pa.int64() if k == "index" else image_type if k == "image" else pa.string())
                        for k in recs[0]])
    pq.write_table(pa.Table.from_pylist(recs, schema=schema), OUT / "mmbench_dev_en.parquet")
    try:
        import datasets
    except ImportError:
        print("datasets not installed: mmbench_save_to_disk/ not rewritten")
        return
    folder = OUT / "mmbench_save_to_disk"
    shutil.rmtree(folder, ignore_errors=True)
    ds = datasets.Dataset.from_list(recs).cast_column("image", datasets.Image(decode=False))
    ds.save_to_disk(str(folder))


def moving_video(colour: str, kind: str, direction: str, n: int = 6) -> list[Image.Image]:
    frames = []
    for t in range(n):
        x, y = (2 + 3 * t, 8) if direction == "right" else (8, 2 + 3 * t)
        frames.append(shape(colour, kind, at=(x, y)))
    return frames


VIDEO_MME = [  # the videos: (video_id, videoID, duration, domain, sub_category, frames)
    ("001", "fFjv93ACGo8", "short", "Knowledge", "Astronomy", ("red", "circle", "right")),
    ("002", "Zx-3Qy4Lk2M", "medium", "Life Record", "Pet & Animal", ("blue", "square", "down")),
]
VIDEO_MME_QUESTIONS = {  # video_id -> [(task_type, question, options, answer, response)]
    "001": [("Action Recognition", "Which way does the circle move?", ["left", "right", "up", "down"], "B", "B"),
            ("Attribute Perception", "What colour is the moving object?", ["blue", "green", "red", "yellow"], "C",
             "The answer is A.")],
    "002": [("Action Recognition", "Which way does the square move?", ["left", "right", "up", "down"], "D",
             "(D) down")],
}


def video_mme() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hyperowl.data.synthetic import write_mp4

    root = OUT / "videomme"
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "videomme").mkdir(exist_ok=True)
    flat, nested = [], []
    for vid, yt, duration, domain, sub, (colour, kind, direction) in VIDEO_MME:
        write_mp4(moving_video(colour, kind, direction), root / "data" / f"{yt}.mp4", fps=4)
        qs = []
        for j, (task, q, opts, ans, resp) in enumerate(VIDEO_MME_QUESTIONS[vid], 1):
            lettered = [f"{'ABCD'[i]}. {o}." for i, o in enumerate(opts)]  # as published: "A. left."
            rec = {"video_id": vid, "duration": duration, "domain": domain, "sub_category": sub,
                   "url": f"https://www.youtube.com/watch?v={yt}", "videoID": yt, "question_id": f"{vid}-{j}",
                   "task_type": task, "question": q, "options": lettered, "answer": ans}
            flat.append(rec)
            qs.append({"question_id": rec["question_id"], "task_type": task, "question": q, "options": lettered,
                       "answer": ans, "response": resp})
        nested.append({"video_id": vid, "duration": duration, "domain": domain, "sub_category": sub, "questions": qs})
    schema = pa.schema([(k, pa.list_(pa.string()) if k == "options" else pa.string()) for k in flat[0]])
    pq.write_table(pa.Table.from_pylist(flat, schema=schema), root / "videomme" / "test-00000-of-00001.parquet")
    (root / "videomme.json").write_text(json.dumps(flat, indent=1) + "\n")
    (root / "videomme_results.json").write_text(json.dumps(nested, indent=1) + "\n")


def mvbench() -> None:
    from hyperowl.data.synthetic import write_mp4

    root = OUT / "mvbench"
    videos = root / "video" / "star" / "Charades_v1_480"
    videos.mkdir(parents=True, exist_ok=True)
    (root / "json").mkdir(exist_ok=True)
    # 2 s at 4 fps: a red circle for the first second, then a blue square (a question about the clip 1-2 s
    # is answered by the second half only)
    frames = [shape("red", "circle")] * 4 + [shape("blue", "square")] * 4
    write_mp4(frames, videos / "R2D2A.mp4", fps=4)
    write_mp4(moving_video("green", "circle", "right"), videos / "M0V3R.mp4", fps=4)
    recs = [
        {"video": "R2D2A.mp4", "question": "What is shown in this part of the video?",
         "candidates": ["A red circle.", "A blue square.", "A green circle."], "answer": "A blue square.",
         "start": 1.0, "end": 2.0},
        {"video": "M0V3R.mp4", "question": "Which way does the circle move?",
         "candidates": ["Left.", "Right."], "answer": "Right."},
    ]
    (root / "json" / "action_sequence.json").write_text(json.dumps(recs, indent=1) + "\n")


def llava_and_swift() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    llava = OUT / "llava"
    (llava / "coco" / "train2017").mkdir(parents=True, exist_ok=True)
    shape("red", "circle").save(llava / "coco" / "train2017" / "000000000009.png")
    shape("blue", "square").save(llava / "coco" / "train2017" / "000000000025.png")
    recs = [
        {"id": "000000000009", "image": "coco/train2017/000000000009.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "And its shape?"}, {"from": "gpt", "value": "A circle."}]},
        {"id": "sharegpt_0", "conversations": [  # text-only, as the ShareGPT part of the mix
            {"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello."}]},
        {"id": "interleave_0", "image": ["coco/train2017/000000000009.png", "coco/train2017/000000000025.png"],
         "conversations": [{"from": "human", "value": "<image> <image>\nWhich image shows a square?"},
                           {"from": "gpt", "value": "The second."}]},
    ]
    (llava / "llava_v1_5_mix_sample.json").write_text(json.dumps(recs, indent=1) + "\n")

    swift = OUT / "swift"
    (swift / "images").mkdir(parents=True, exist_ok=True)
    shape("green", "circle").save(swift / "images" / "a.png")
    shape("yellow", "square").save(swift / "images" / "b.png")
    recs = [
        {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "<image>What colour is the circle?"},
                      {"role": "assistant", "content": "Green."}], "images": ["images/a.png"]},
        {"query": "<image>What shape is it?", "response": "A square.", "history": [["Hello.", "Hi."]],
         "images": ["images/b.png"]},
        {"messages": [{"role": "user", "content": "<image><image>Are these the same colour?"},
                      {"role": "assistant", "content": "No."}], "images": ["images/a.png", "images/b.png"]},
    ]
    (swift / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    msgs = [r for r in recs if "messages" in r]
    pq.write_table(pa.Table.from_pylist(msgs), swift / "train.parquet")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    mmbench()
    video_mme()
    mvbench()
    llava_and_swift()


if __name__ == "__main__":
    main()
