"""Write the tiny sample files of every `hyperowl eval` task format into this folder.

Run: python tests/data/eval/make_samples.py   (deterministic; images are drawn with PIL, the video with the
repo's synthetic .mp4 writer). The files are small on purpose: tests run each format end to end on them.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 210, 0),
           "purple": (150, 60, 190), "orange": (245, 140, 0)}


def shape_image(colour: str, kind: str = "circle", size: int = 32, bg=(255, 255, 255)) -> Image.Image:
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (d.ellipse if kind == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    return im


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    (HERE / "pool").mkdir(exist_ok=True)
    for c in ("red", "green", "blue"):
        for k in ("circle", "square"):
            shape_image(c, k).save(HERE / "images" / f"{c}_{k}.png")
    for i, c in enumerate(("yellow", "purple", "orange", "green", "blue", "red")):
        shape_image(c, "square" if i % 2 else "circle", bg=(200, 200, 200)).save(HERE / "pool" / f"pool_{i}.png")

    # MMBench TSV: base64 images; row 3 refers to row 1's image by index; row 2 has only three options.
    b64 = lambda c, k: base64.b64encode(png_bytes(shape_image(c, k))).decode()
    rows = [
        {"index": "1", "question": "What colour is the circle?", "hint": "", "A": "red", "B": "green", "C": "blue",
         "D": "yellow", "answer": "A", "image": b64("red", "circle"), "category": "colour"},
        {"index": "2", "question": "What shape is shown?", "hint": "Look carefully.", "A": "triangle", "B": "square",
         "C": "circle", "D": "", "answer": "B", "image": b64("blue", "square"), "category": "shape"},
        {"index": "3", "question": "Is the object round?", "hint": "nan", "A": "yes", "B": "no", "C": "", "D": "",
         "answer": "A", "image": "1", "category": "shape"},
    ]
    with (HERE / "mmbench.tsv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)

    vqa = [
        {"question_id": 101, "question": "What colour is the circle?", "image": "images/red_circle.png",
         "answers": ["red"] * 8 + ["dark red", "Red."], "answer_type": "other"},
        {"question_id": 102, "question": "How many squares are there?", "image": "images/blue_square.png",
         "answers": [{"answer": "one"}] * 6 + [{"answer": "1"}] * 3 + [{"answer": "2"}], "answer_type": "number"},
        {"question_id": 103, "question": "Is this a square?", "image": "images/green_square.png",
         "answers": ["yes"] * 10, "answer_type": "yes/no"},
    ]
    (HERE / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vqa))

    multi = [
        {"id": "nlvr-0", "images": ["images/red_circle.png", "images/red_square.png"],
         "sentence": "Both images contain something red.", "label": True},
        {"id": "nlvr-1", "images": ["images/blue_circle.png", "images/green_square.png"],
         "sentence": "Both images show a circle.", "label": "False"},
        {"id": "mc-0", "images": ["images/red_circle.png", "images/blue_square.png", "images/green_circle.png"],
         "question": "<image> <image> <image> Which image shows a square?",
         "options": ["the first", "the second", "the third"], "answer": "B", "category": "interleave"},
    ]
    (HERE / "multi_image.jsonl").write_text("".join(json.dumps(r) + "\n" for r in multi))

    from hyperowl.data.synthetic import write_mp4

    (HERE / "videos").mkdir(exist_ok=True)
    frames = []
    for t in range(6):  # a red circle moving right
        im = Image.new("RGB", (32, 32), (255, 255, 255))
        ImageDraw.Draw(im).ellipse((2 + 4 * t, 12, 10 + 4 * t, 20), fill=COLOURS["red"])
        frames.append(im)
    write_mp4(frames, HERE / "videos" / "move_right.mp4", fps=4)
    video = [
        {"id": "v0", "video": "videos/move_right.mp4", "question": "Which way does the red circle move?",
         "options": ["left", "right", "up", "down"], "answer": 1, "category": "direction"},
        {"id": "v1", "video": "videos/move_right.mp4", "question": "What colour is the moving object?",
         "options": ["blue", "red"], "answer": "red", "frames": 4, "category": "colour"},
        {"id": "v2", "frames": ["images/red_circle.png", "images/red_square.png"],
         "question": "What is red in both frames?", "options": ["nothing", "the object"], "answer": "B"},
    ]
    (HERE / "video_mc.json").write_text(json.dumps(video, indent=1) + "\n")

    mc = [
        {"id": "d0", "image": "images/red_circle.png", "question": "What colour is the circle?",
         "options": ["red", "green", "blue", "yellow"], "answer": 0, "category": "colour"},
        {"id": "d1", "image": "images/green_square.png", "question": "What shape is shown?",
         "options": ["circle", "square"], "answer": "B", "category": "shape"},
    ]
    (HERE / "distractor_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))

    # the official VQAv2 pair (questions + annotations), images named as in COCO
    v2 = HERE / "vqav2"
    (v2 / "val2014").mkdir(parents=True, exist_ok=True)
    shape_image("red", "circle").save(v2 / "val2014" / "COCO_val2014_000000000042.jpg", quality=95)
    shape_image("blue", "square").save(v2 / "val2014" / "COCO_val2014_000000000007.jpg", quality=95)
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "val2014",
                 "questions": [{"image_id": 42, "question": "What colour is the circle?", "question_id": 42000},
                               {"image_id": 7, "question": "Is this a square?", "question_id": 7001}]}
    annotations = {"info": {}, "license": {}, "data_subtype": "val2014", "annotations": [
        {"question_id": 7001, "image_id": 7, "answer_type": "yes/no", "question_type": "is this",
         "multiple_choice_answer": "yes", "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": i + 1}
                                                      for i in range(10)]},
        {"question_id": 42000, "image_id": 42, "answer_type": "other", "question_type": "what color is the",
         "multiple_choice_answer": "red", "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                                      for i, a in enumerate(["red"] * 9 + ["orange"])]}]}
    (v2 / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions) + "\n")
    (v2 / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(annotations) + "\n")


if __name__ == "__main__":
    main()
