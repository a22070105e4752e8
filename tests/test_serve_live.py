"""Live sessions over HTTP (hyperowl/serve/live.py) on a real uvicorn server, and the /live page in headless
Chromium with its fake camera: frames posted by the page, a question answered about them."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from hyperowl.serve import ServeConfig, ServerThread, create_app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def owl():
    import hyperowl

    return hyperowl.load(device="cpu")  # the embedded model: its answers are words


@pytest.fixture(scope="module")
def server(owl):
    with ServerThread(create_app(owl, owl.processor, ServeConfig(model_name="owl"))) as srv:
        yield srv


def scene(x):
    from hyperowl.data.synthetic.world import Obj, Scene

    return Scene((Obj("square", "red", "large", x, 32),), "white", 64).render()


def jpeg(im):
    buf = io.BytesIO()
    im.save(buf, "PNG")  # lossless: the library session below gets the same pixels
    return buf.getvalue()


def test_rest_round_trip_equals_the_library(server, owl):
    frames = [scene(x) for x in (10, 20, 30, 40)]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        sid = c.post("/v1/live", json={"max_tokens": 10}).json()["id"]
        for k, f in enumerate(frames[:2]):  # one image per request, its stream time in a header
            r = c.post(f"/v1/live/{sid}/frames", content=jpeg(f),
                       headers={"Content-Type": "image/png", "X-Stream-Time": str(float(k))})
            assert r.status_code == 200, r.text
        urls = ["data:image/png;base64," + base64.b64encode(jpeg(f)).decode() for f in frames[2:]]
        r = c.post(f"/v1/live/{sid}/frames", json={"frames": urls, "timestamps": [2.0, 3.0]})
        assert r.status_code == 200 and r.json()["frames_seen"] <= 4
        r = c.post(f"/v1/live/{sid}/ask", json={"question": "Which way does the red square move?"})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["frames_seen"] == 4 and got["stream_time"] == 3.0
        # streamed: deltas, then the status, then [DONE]
        events = []
        with c.stream("POST", f"/v1/live/{sid}/ask", json={"question": "What is in the video?", "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        streamed = "".join(json.loads(e)["delta"] for e in events[:-2])
        assert json.loads(events[-2])["answers"] == 2
        shown = c.get(f"/v1/live/{sid}").json()
        assert "[3.0s]<|image|>" in shown["prompt"]
        assert c.delete(f"/v1/live/{sid}").json()["deleted"] is True
        assert c.get(f"/v1/live/{sid}").status_code == 404
    live = owl.live(max_new_tokens=10)
    live.add_frames(frames, timestamps=[0.0, 1.0, 2.0, 3.0])
    assert got["answer"] == live.ask("Which way does the red square move?") and got["answer"].strip()
    assert streamed == live.ask("What is in the video?")
    assert shown["prompt"] == live.prompt()
    live.close()


def test_rest_errors(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.post("/v1/live/nope/ask", json={"question": "?"}).status_code == 404
        sid = c.post("/v1/live").json()["id"]
        r = c.post(f"/v1/live/{sid}/frames", content=b"not an image", headers={"Content-Type": "image/png"})
        assert r.status_code == 400 and "error" in r.json()
        r = c.post(f"/v1/live/{sid}/frames", json={"frames": ["http://example.com/a.png"]})
        assert r.status_code == 400 and "data URLs" in r.json()["error"]["message"]
        r = c.post(f"/v1/live/{sid}/frames", json={"frames": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "frames"
        r = c.post(f"/v1/live/{sid}/ask", json={"question": ""})
        assert r.status_code == 400 and r.json()["error"]["param"] == "question"
        r = c.post("/v1/live", json={"memory_gb": -1})
        assert r.status_code == 422 and "memory_gb" in r.json()["error"]["message"]
        # the session still answers (text-only: no frames were accepted)
        assert c.post(f"/v1/live/{sid}/ask", json={"question": "Hello?"}).status_code == 200
        c.delete(f"/v1/live/{sid}")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing")
def test_live_page_with_the_fake_camera(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
            "--disable-dev-shm-usage", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            posts = []
            page.on("request", lambda r: posts.append(r.headers.get("x-stream-time"))
                    if r.url.endswith("/frames") else None)
            page.goto(server.url + "/live")
            page.fill("#fps", "4")
            page.click("#camera")
            page.wait_for_function("Number(document.getElementById('status').dataset.frames) >= 3", timeout=30000)
            page.fill("#question", "What is in the video?")
            page.click("#ask")
            done = page.locator(".msg.assistant[data-state=done]")
            sync_api.expect(done).to_have_count(1, timeout=60000)
            answer = done.inner_text()
            errors = page.locator(".msg.error").count()
            sid = page.locator("#status").inner_text().split()[1]
            shot = tmp_path / "live.png"
            page.screenshot(path=str(shot))  # while the camera plays
            vbox = page.locator("#video").bounding_box()
            page.click("#stop")
            out_dir = os.environ.get("HYPEROWL_SCREENSHOT_DIR")
            if out_dir:
                shutil.copy(shot, Path(out_dir) / "live_page.png")
        finally:
            browser.close()
    assert errors == 0
    state = httpx.get(f"{server.url}/v1/live/{sid}", timeout=30).json()
    assert state["frames_seen"] >= 3 and len([t for t in posts if t]) >= 3
    # the page's answer is the session's: the prompt holds it right after the question
    assert "What is in the video?<|im_end|>\n<|im_start|>assistant\n" + answer in state["prompt"]
    assert state["prompt"].count("<|image|>") == state["frames_seen"]
    im = Image.open(shot).convert("RGB")
    assert im.size == (1000, 640)
    # the video element shows the fake camera's picture (a coloured test pattern), not a black box
    box = im.crop((int(vbox["x"]) + 8, int(vbox["y"]) + 8, int(vbox["x"] + vbox["width"]) - 8,
                   int(vbox["y"] + vbox["height"]) - 8))
    assert len(box.getcolors(maxcolors=1 << 16) or ()) > 50 and max(max(c) for _, c in box.getcolors(1 << 16)) > 100
