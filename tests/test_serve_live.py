"""Live sessions over HTTP (hyperowl/serve/live.py) on a real uvicorn server, and the /live page in headless
Chromium with its fake camera: frames posted by the page, a question answered about them."""

from __future__ import annotations

import base64
import contextlib
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
        # a repeated stream time is the sender's bug: a 422 naming it, and nothing of the call is kept
        r = c.post(f"/v1/live/{sid}/frames", content=jpeg(frames[0]),
                   headers={"Content-Type": "image/png", "X-Stream-Time": "3.0"})
        assert r.status_code == 422 and "not after the previous frame's 3 s" in r.text
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


def test_idle_sessions_expire_and_are_freed(owl):
    import time

    app = create_app(owl, owl.processor, ServeConfig(model_name="owl", live_session_idle_s=1.0))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        sid = c.post("/v1/live").json()["id"]
        other = c.post("/v1/live").json()["id"]
        assert c.post(f"/v1/live/{sid}/frames", content=jpeg(scene(10)), headers={"Content-Type": "image/png"}).status_code == 200
        live = app.state.live.by_id[sid]
        for _ in range(3):  # requests keep a session alive past the idle time
            time.sleep(0.6)
            assert c.get(f"/v1/live/{sid}").status_code == 200
        assert other not in app.state.live.by_id  # idle for 1.8 s: freed
        deadline = time.monotonic() + 10
        while sid in app.state.live.by_id and time.monotonic() < deadline:  # no request: the reaper frees it
            time.sleep(0.1)
        assert sid not in app.state.live.by_id and live._closed
        for r in (c.get(f"/v1/live/{sid}"), c.post(f"/v1/live/{sid}/ask", json={"question": "?"})):
            err = r.json()["error"]
            assert r.status_code == 404 and sid in err["message"] and "expired" in err["message"]
            assert err["code"] == "session_expired"
        r = c.get("/v1/live/live-nope")
        assert r.status_code == 404 and "no live session 'live-nope'" in r.json()["error"]["message"]
        assert c.post("/v1/live").status_code == 200  # the freed slots are open again


@contextlib.contextmanager
def live_page(server, *chromium_args: str):
    """Headless Chromium on the server's /live page at 4 frames a second: (playwright's sync_api, the page, the
    x-stream-time header of every frame the page posts, as they are posted)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
            "--disable-dev-shm-usage", *chromium_args]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            posts = []
            page.on("request", lambda r: posts.append(r.headers.get("x-stream-time"))
                    if r.url.endswith("/frames") else None)
            page.goto(server.url + "/live")
            page.fill("#fps", "4")
            yield sync_api, page, posts
        finally:
            browser.close()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing")
def test_live_page_with_the_fake_camera(server, tmp_path):
    with live_page(server, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream") as (
            sync_api, page, posts):
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


def write_webm(images, path, fps):
    """A real VP8 WebM file (a codec every Chromium build plays)."""
    import av
    import numpy as np

    w, h = images[0].size
    with av.open(str(path), "w", format="webm") as out:
        stream = out.add_stream("libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.bit_rate = 2_000_000
        for im in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(im), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing")
def test_live_page_with_a_video_file(server, tmp_path):
    import time

    """The page's other source: a chosen video file, played and sent at N fps with its own clock (the
    video's time, not the wall clock), a question answered while it plays."""
    clip = tmp_path / "moving.webm"
    write_webm([scene(8 + k).resize((160, 160), Image.NEAREST) for k in range(36)], clip, fps=6)  # 6 s
    with live_page(server, "--autoplay-policy=no-user-gesture-required") as (sync_api, page, posts):
        page.set_input_files("#file", str(clip))
        for _ in range(300):  # until the page has sent 3 frames of the file
            if len([t for t in posts if t]) >= 3:
                break
            page.wait_for_timeout(100)
        playing = page.evaluate("!document.getElementById('video').ended")
        page.fill("#question", "Which way does the red square move?")
        page.click("#ask")  # while it plays: answered about the frames sent before the question
        done = page.locator(".msg.assistant[data-state=done]")
        sync_api.expect(done).to_have_count(1, timeout=60000)
        answer = done.inner_text()
        page.wait_for_function("document.getElementById('video').ended", timeout=30000)
        page.wait_for_timeout(500)  # the last frame's post
        errors = [e.inner_text() for e in page.locator(".msg.error").all()]
        sid = page.locator("#status").inner_text().split()[1]
        shot = tmp_path / "live_file.png"
        page.screenshot(path=str(shot))  # the clip's last frame
        vbox = page.locator("#video").bounding_box()
        duration = page.evaluate("document.getElementById('video').duration")
        page.click("#stop")
        out_dir = os.environ.get("HYPEROWL_SCREENSHOT_DIR")
        if out_dir:
            shutil.copy(shot, Path(out_dir) / "live_page_file.png")
    assert errors == [] and answer.strip() and playing
    times = [float(t) for t in posts if t]
    for _ in range(300):  # frames posted after the question may still be on their way into the cache
        state = httpx.get(f"{server.url}/v1/live/{sid}", timeout=30).json()
        if state["frames_seen"] >= len(times):
            break
        time.sleep(0.1)
    # the stream times are the file's own (its currentTime), increasing, inside the clip, about 4 a second
    assert times == sorted(set(times)) and times[-1] <= duration + 0.01 and 5.5 < duration < 6.5
    assert len(times) >= 3 * duration
    assert state["frames_seen"] == len(times) and state["prompt"].count("<|image|>") == len(times)
    assert f"[{times[1]:.1f}s]<|image|>" in state["prompt"]
    assert "Which way does the red square move?<|im_end|>\n<|im_start|>assistant\n" + answer in state["prompt"]
    # the video element shows the clip (a red square on white), not a black box
    import numpy as np

    im = Image.open(shot).convert("RGB")
    box = im.crop((int(vbox["x"]) + 4, int(vbox["y"]) + 4, int(vbox["x"] + vbox["width"]) - 4,
                   int(vbox["y"] + vbox["height"]) - 4))
    px = np.asarray(box).astype(int)
    red = ((px[..., 0] > 150) & (px[..., 1] < 90) & (px[..., 2] < 90)).mean()
    white = (px.min(-1) > 200).mean()
    assert red > 0.05 and white > 0.3
