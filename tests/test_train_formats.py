"""Training data in the layouts LLaVA and ms-swift users have (tests/data/formats, written by
scripts/make_format_samples.py), read as they are: mapped onto our {messages, images, videos} records,
`<image>` tags onto our placeholders; JSON lists, Parquet and datasets folders as well as JSONL."""

import json
from pathlib import Path

import pytest

from conftest import make_tokenizer
from hyperowl.errors import InputError
from hyperowl.processing.processor import Owl3Processor
from hyperowl.train.data import ConversationDataset, read_records, to_record

FORMATS = Path(__file__).parent / "data" / "formats"


def processor():
    return Owl3Processor(make_tokenizer(), image_size=28, cut=False)


def test_llava_json_is_read_as_published():
    recs, bad = read_records(FORMATS / "llava" / "llava_v1_5_mix_sample.json")
    assert bad == [] and len(recs) == 3
    r0 = recs[0]
    assert [m["role"] for m in r0["messages"]] == ["user", "assistant", "user", "assistant"]
    assert r0["messages"][0]["content"] == "<|image|>\nWhat colour is the circle?"
    assert r0["images"] == [str(FORMATS / "llava" / "coco" / "train2017" / "000000000009.png")] and r0["videos"] == []
    assert recs[1]["images"] == [] and recs[1]["messages"][1] == {"role": "assistant", "content": "Hello."}
    assert recs[2]["messages"][0]["content"].count("<|image|>") == 2 and len(recs[2]["images"]) == 2
    ds = ConversationDataset(FORMATS / "llava" / "llava_v1_5_mix_sample.json", processor())
    ex = ds[0]
    kept = [t for t in ex.labels.tolist() if t != -100]
    text = ds.processor.tokenizer.decode(kept, skip_special_tokens=False)
    assert text == "Red.<|im_end|>A circle.<|im_end|>" and int(ex.image_positions.numel()) == 1


def test_swift_jsonl_and_parquet():
    recs, _ = read_records(FORMATS / "swift" / "train.jsonl")
    assert recs[0]["messages"][0]["role"] == "system" and recs[0]["messages"][1]["content"].startswith("<|image|>What")
    q = recs[1]["messages"]  # query / response / history
    assert [(m["role"], m["content"]) for m in q] == [("user", "Hello."), ("assistant", "Hi."),
                                                      ("user", "<|image|>What shape is it?"),
                                                      ("assistant", "A square.")]
    assert recs[1]["images"] == [str(FORMATS / "swift" / "images" / "b.png")]
    pq, _ = read_records(FORMATS / "swift" / "train.parquet")
    assert [r["messages"] for r in pq] == [recs[0]["messages"], recs[2]["messages"]]
    assert [r["images"] for r in pq] == [recs[0]["images"], recs[2]["images"]]
    ds = ConversationDataset(FORMATS / "swift" / "train.parquet", processor())
    assert len(ds) == 2 and int(ds[1].image_positions.numel()) == 2


def test_mapping_rules_and_errors(tmp_path):
    # LLaVA without a tag: the image goes in front of the first user message
    r = to_record({"image": "a.png", "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "red"}]})
    assert r["messages"][0]["content"] == "<|image|>Colour?" and r["images"] == ["a.png"]
    # ms-swift's {"path": ...} media entries and <video> tags
    r = to_record({"messages": [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "x"}],
                   "videos": [{"path": "v.mp4"}]})
    assert r["messages"][0]["content"] == "<|video|>What happens?" and r["videos"] == ["v.mp4"]
    with pytest.raises(ValueError, match="'from' 'bot' is not human, gpt or system"):
        to_record({"conversations": [{"from": "bot", "value": "x"}]})
    with pytest.raises(ValueError, match="missing 'messages' \\(or LLaVA's 'conversations'"):
        to_record({"text": "x"})
    # a bad record of a JSON list is reported by its index and skipped on request
    (tmp_path / "img.png").write_bytes((FORMATS / "swift" / "images" / "a.png").read_bytes())
    good = {"image": "img.png", "conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "x"}]}
    (tmp_path / "d.json").write_text(json.dumps([good, {"image": "gone.png", "conversations": good["conversations"]}]))
    with pytest.raises(InputError, match=r"d.json\[1\]: image '.*gone.png' not found \(fix the record"):
        read_records(tmp_path / "d.json")
    recs, bad = read_records(tmp_path / "d.json", on_error="skip")
    assert len(recs) == 1 and [n for n, _ in bad] == [2]


def test_datasets_folder_and_hub_id(monkeypatch, tmp_path):
    """A LLaVA set kept as a datasets folder (save_to_disk) or named as a hub id reads like its JSON (image
    paths then relative to the folder, or absolute)."""
    datasets = pytest.importorskip("datasets")
    src = FORMATS / "llava" / "llava_v1_5_mix_sample.json"
    recs = json.loads(src.read_text())
    for r in recs:  # absolute paths: the folder lives elsewhere
        if "image" in r:
            r["image"] = [str(src.parent / p) for p in ([r["image"]] if isinstance(r["image"], str) else r["image"])]
        else:
            r["image"] = []
    ds = datasets.Dataset.from_list(recs)
    ds.save_to_disk(str(tmp_path / "llava_ds"))
    ref, _ = read_records(src)
    got, _ = read_records(tmp_path / "llava_ds")
    assert [r["messages"] for r in got] == [r["messages"] for r in ref]
    assert [r["images"] for r in got] == [r["images"] for r in ref]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None: ds)
    hub, _ = read_records("hf:someone/llava-mix:train")
    assert [r["messages"] for r in hub] == [r["messages"] for r in ref]
