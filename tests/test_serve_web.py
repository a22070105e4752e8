"""The web chat page in headless Chromium (Debian's `chromium`, driven by Playwright; no browser download):
a real round trip with an uploaded image, a pasted image, an attached video, streamed answers, multi-turn
history sent back to the server, an error shown for a broken file, and a screenshot check."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")

from PIL import Image  # noqa: E402

from hyperowl.serve import ServeConfig, ServerThread, create_app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
RED = (220, 20, 40)
MODEL = "tiny-owl"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing (apt-get install chromium; "
                                                               "scripts/setup.sh does it when run as root)")


@pytest.fixture(scope="module")
def server(chat_checkpoint):
    import hyperowl

    model = hyperowl.load(chat_checkpoint, device="cpu")
    with ServerThread(create_app(model, model.processor, ServeConfig(model_name=MODEL))) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def test_chat_page_round_trip(server, browser, tmp_path):
    from test_video import make_video

    img_path = tmp_path / "red.png"
    Image.new("RGB", (160, 120), RED).save(img_path)
    video_path = make_video(tmp_path / "clip.mp4", n_frames=6)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")

    page = browser.new_page(viewport={"width": 1000, "height": 760})
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#model-name")).to_have_text(MODEL, timeout=15000)
    page.fill("#temperature", "1")  # sampled gibberish shows as text (greedy may decode to nothing)
    page.fill("#max-tokens", "24")

    # Turn 1: an uploaded image and a pasted one.
    page.set_input_files("#image-input", str(img_path))
    page.evaluate("""async () => {
        const c = document.createElement('canvas'); c.width = 50; c.height = 40;
        const g = c.getContext('2d'); g.fillStyle = 'rgb(20,160,60)'; g.fillRect(0, 0, 50, 40);
        const blob = await new Promise((r) => c.toBlob(r, 'image/png'));
        const dt = new DataTransfer(); dt.items.add(new File([blob], 'pasted.png', {type: 'image/png'}));
        document.querySelector('#prompt').dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));
    }""")
    sync_api.expect(page.locator("#attachments img")).to_have_count(2)
    page.fill("#prompt", "What colour is the circle?")
    page.click("#send")
    done = page.locator(".msg.assistant[data-state=done]")
    sync_api.expect(done).to_have_count(1, timeout=60000)
    meta1 = done.nth(0).locator(".meta").inner_text()
    assert "finish:" in meta1 and "visual tokens" in meta1

    # Turn 2: a video; the history (with turn 1's images) goes back to the server, whose cache has them.
    page.set_input_files("#video-input", str(video_path))
    page.fill("#prompt", "Describe this video.")
    page.keyboard.press("Enter")
    sync_api.expect(done).to_have_count(2, timeout=60000)
    meta2 = done.nth(1).locator(".meta").inner_text()
    assert "cached)" in meta2 and "(0 cached)" not in meta2, meta2

    assert len(bodies) == 2 and bodies[1]["stream"] is True
    roles = [m["role"] for m in bodies[1]["messages"]]
    assert roles == ["user", "assistant", "user"]
    kinds = [p["type"] for p in bodies[1]["messages"][0]["content"]]
    assert kinds == ["image_url", "image_url", "text"]
    assert bodies[1]["messages"][2]["content"][0]["type"] == "video_url"
    assert bodies[1]["messages"][1]["content"] == done.nth(0).locator(".text").inner_text().replace("(empty answer)", "")

    # A broken image: the server's error is shown and the attachment is given back.
    page.set_input_files("#image-input", str(broken))
    page.fill("#prompt", "And this?")
    page.click("#send")
    sync_api.expect(page.locator(".msg.error")).to_have_count(1, timeout=30000)
    error = page.locator(".msg.error").inner_text()
    assert "cannot be read" in error
    assert '"broken.png"' in error and "messages[" not in error, error  # the file as the user picked it
    sync_api.expect(page.locator("#attachments .att")).to_have_count(1)
    sync_api.expect(page.locator(".msg.user")).to_have_count(2)  # the failed turn is not in the conversation
    assert page.input_value("#prompt") == "And this?"
    page.click("#attachments .remove")

    # Screenshot check: the uploaded red image is visible in the first user bubble, the answers have text.
    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot))
    out_dir = os.environ.get("HYPEROWL_SCREENSHOT_DIR")
    if out_dir:  # keep a copy to look at
        shutil.copy(shot, Path(out_dir) / "chat_page.png")
    im = Image.open(shot).convert("RGB")
    assert im.size == (1000, 760)
    box = page.locator(".msg.user img").first.bounding_box()
    assert box is not None and box["width"] > 20
    cx, cy = int(box["x"] + box["width"] / 2), int(box["y"] + box["height"] / 2)
    assert max(abs(a - b) for a, b in zip(im.getpixel((cx, cy)), RED)) <= 12, im.getpixel((cx, cy))
    abox = page.locator(".msg.assistant").first.bounding_box()
    crop = im.crop((int(abox["x"]), int(abox["y"]), int(abox["x"] + abox["width"]), int(abox["y"] + abox["height"])))
    assert len(crop.getcolors(maxcolors=1 << 16) or ()) > 5, "the answer bubble is blank"
    page.close()


def test_stop_button_cancels_the_answer(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#model-name")).to_have_text(MODEL, timeout=15000)
    page.fill("#max-tokens", "480")  # within the tiny model's 512-token context
    page.evaluate("""() => { const f = window.fetch; window.fetch = (u, o) => {   // force a long answer
        if (o && o.body) { const b = JSON.parse(o.body); b.min_tokens = 480; o = {...o, body: JSON.stringify(b)}; }
        return f(u, o); }; }""")
    page.fill("#prompt", "Talk for a long time.")
    page.click("#send")
    sync_api.expect(page.locator("#stop")).to_be_visible()
    page.wait_for_timeout(300)
    page.click("#stop")
    sync_api.expect(page.locator(".msg.assistant[data-state=error]")).to_have_count(1, timeout=15000)
    assert "[stopped]" in page.locator(".msg.assistant").inner_text()
    page.close()
