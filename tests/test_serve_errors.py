"""Bad requests get OpenAI-style JSON errors with 4xx codes, never a 500, and the server keeps serving.
Also: http(s) media URLs (fetched from a local HTTP server started here) with size and time limits."""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
from functools import partial

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from hyperowl.serve import ServeConfig, ServerThread, UrlPolicy, create_app  # noqa: E402

MODEL = "tiny-owl"
MAX_MEDIA = 64 * 1024
MAX_BODY = 256 * 1024


def png(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (0, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


def durl(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _bomb() -> bytes:
    buf = io.BytesIO()  # 10000 x 8000 one-bit pixels: a few kB on the wire, 240 MB as RGB
    Image.new("1", (10000, 8000)).save(buf, "PNG")
    return buf.getvalue()


BOMB = _bomb()


def img_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(*parts, **extra) -> dict:
    return {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": list(parts) + [
        {"type": "text", "text": "What?"}]}], **extra}


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/slow"):
            time.sleep(3)  # longer than the server's fetch limit
        if self.path.startswith("/chunked-big"):  # no Content-Length: the cap must apply while reading
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            block = b"x" * 16384
            try:
                for _ in range(10):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the server under test hung up once over its limit
                pass
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "ok.png").write_bytes(png())
    (d / "big.png").write_bytes(png() + b"\0" * (MAX_MEDIA + 10))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(png())
    (d / "link.png").symlink_to(outside / "secret.png")
    return d


@pytest.fixture(scope="module")
def http_media(media_dir):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(media_dir)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    t.join(timeout=10)


@pytest.fixture(scope="module")
def server(chat_checkpoint, media_dir):
    import hyperowl

    model = hyperowl.load(chat_checkpoint, device="cpu")
    cfg = ServeConfig(model_name=MODEL, allowed_media_dir=media_dir, max_images=2, max_videos=1,
                      max_media_bytes=MAX_MEDIA, max_body_bytes=MAX_BODY, fetch_timeout_s=1.0,
                      media_url_policy=UrlPolicy.from_options(allow_private="all"))  # the media server is on loopback
    with ServerThread(create_app(model, model.processor, cfg)) as srv:
        yield srv


def post(server, body=None, content=None, headers=None):
    url = server.url + "/v1/chat/completions"
    if content is not None:
        return httpx.post(url, content=content, headers=headers or {}, timeout=60)
    return httpx.post(url, json=body, headers=headers or {}, timeout=60)


def assert_error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


BAD_CASES = {
    "malformed_json": (dict(content=b'{"model": "tiny-owl", "messages": [}'), 400, "invalid_json"),
    "json_not_object": (dict(content=b"[1, 2]"), 400, "invalid_json"),
    "not_utf8": (dict(content=b"\xff\xfe{"), 400, "invalid_json"),
    "unknown_model": (dict(body={"model": "gpt-5", "messages": [{"role": "user", "content": "Hi"}]}), 404,
                      "model_not_found"),
    "missing_messages": (dict(body={"model": MODEL}), 400, "missing_field"),
    "empty_messages": (dict(body={"model": MODEL, "messages": []}), 400, "invalid_type"),
    "bad_role": (dict(body={"model": MODEL, "messages": [{"role": "wizard", "content": "Hi"}]}), 400, "invalid_value"),
    "content_number": (dict(body={"model": MODEL, "messages": [{"role": "user", "content": 3}]}), 400, "invalid_type"),
    "last_is_assistant": (dict(body={"model": MODEL, "messages": [{"role": "assistant", "content": "x"}]}), 400,
                          "invalid_value"),
    "bad_temperature": (dict(body={**chat(), "temperature": -1}), 422, "invalid_value"),
    "bad_top_p": (dict(body={**chat(), "top_p": 0}), 422, "invalid_value"),
    "max_tokens_zero": (dict(body={**chat(), "max_tokens": 0}), 422, "invalid_value"),
    "max_tokens_string": (dict(body={**chat(), "max_tokens": "10"}), 400, "invalid_type"),
    "max_tokens_bool": (dict(body={**chat(), "max_tokens": True}), 400, "invalid_type"),
    "top_k_past_int64": (dict(body={**chat(), "top_k": 2**64, "temperature": 1.0}), 422, "invalid_value"),
    "n_nine": (dict(body={**chat(), "n": 9}), 422, None),  # n is honoured up to 8
    "top_logprobs_alone": (dict(body={**chat(), "top_logprobs": 2}), 400, "invalid_value"),  # needs logprobs: true
    "tools": (dict(body={**chat(), "tools": [{"type": "function", "function": {"name": "f"}}]}), 400,
              "unsupported_parameter"),
    "unknown_field": (dict(body={**chat(), "guided_json": {}}), 400, "unknown_parameter"),
    "too_many_stops": (dict(body={**chat(), "stop": ["a", "b", "c", "d", "e"]}), 422, "invalid_value"),
    "empty_stop": (dict(body={**chat(), "stop": [""]}), 400, "invalid_type"),
    "too_many_images": (dict(body=chat(img_part(durl(png())), img_part(durl(png())), img_part(durl(png())))), 400,
                        "too_many_images"),
    "undecodable_image": (dict(body=chat(img_part(durl(b"this is not an image")))), 400, "invalid_image"),
    "truncated_image": (dict(body=chat(img_part(durl(png()[:60])))), 400, "invalid_image"),
    "bad_base64": (dict(body=chat(img_part("data:image/png;base64,@@@not-base64@@@"))), 400, "invalid_url"),
    "text_mime_as_image": (dict(body=chat(img_part("data:text/plain;base64,aGVsbG8="))), 415, "unsupported_media_type"),
    "oversize_media": (dict(body=chat(img_part(durl(png() + b"\0" * (MAX_MEDIA + 100))))), 413, "media_too_large"),
    "oversize_body": (dict(content=b'{"model": "tiny-owl", "pad": "' + b"x" * (MAX_BODY + 1) + b'"}'), 413,
                      "payload_too_large"),
    "pixel_bomb": (dict(body=chat(img_part(durl(BOMB)))), 413, "image_too_large"),
    "unsupported_part": (dict(body=chat({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})), 415,
                         "unsupported_content_type"),
    "image_in_assistant": (dict(body={"model": MODEL, "messages": [
        {"role": "assistant", "content": [img_part(durl(png()))]}, {"role": "user", "content": "Hi"}]}), 400, None),
    "placeholder_in_text": (dict(body={"model": MODEL, "messages": [{"role": "user", "content": "<|image|> hi"}]}), 400,
                            "invalid_value"),
    "ftp_url": (dict(body=chat(img_part("ftp://example.com/a.png"))), 400, "invalid_url"),
    "empty_url": (dict(body=chat({"type": "image_url", "image_url": {"url": ""}})), 400, "invalid_type"),
    "corrupt_video": (dict(body=chat({"type": "video_url", "video_url": {"url": durl(b"\0" * 1000, "video/mp4")}})), 400,
                      "invalid_video"),
    "file_outside_dir": (dict(body=chat(img_part("file:///etc/hostname"))), 403, "forbidden_path"),
    "bare_path_outside_dir": (dict(body=chat(img_part("/etc/hostname"))), 403, "forbidden_path"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_request_gets_openai_error(server, case):
    kwargs, status, code = BAD_CASES[case]
    assert_error(post(server, **kwargs), status, code)


def test_file_url_rules(server, media_dir):
    base = media_dir.as_uri()
    assert_error(post(server, chat(img_part(f"{base}/../outside/secret.png"))), 403, "forbidden_path")
    assert_error(post(server, chat(img_part(f"{base}/link.png"))), 403, "forbidden_path")  # symlink out of the dir
    assert_error(post(server, chat(img_part(f"{base}/missing.png"))), 400, "file_not_found")
    assert_error(post(server, chat(img_part(f"{base}/big.png"))), 413, "media_too_large")
    assert_error(post(server, chat(img_part(f"{base}/broken.png"))), 400, "invalid_image")
    assert post(server, chat(img_part(f"{base}/ok.png"))).status_code == 200


def test_http_media_urls(server, http_media):
    assert post(server, chat(img_part(f"{http_media}/ok.png"))).status_code == 200
    assert_error(post(server, chat(img_part(f"{http_media}/missing.png"))), 400, "media_fetch_failed")
    assert_error(post(server, chat(img_part(f"{http_media}/big.png"))), 413, "media_too_large")
    assert_error(post(server, chat(img_part(f"{http_media}/chunked-big"))), 413, "media_too_large")
    t0 = time.monotonic()
    assert_error(post(server, chat(img_part(f"{http_media}/slow.png"))), 400, "media_fetch_timeout")
    assert time.monotonic() - t0 < 2.9  # gave up at the limit, did not wait for the slow server
    assert_error(post(server, chat(img_part("http://127.0.0.1:9/nothing.png"))), 400, "media_fetch_failed")


def test_remote_media_can_be_disabled(chat_checkpoint, http_media):
    import hyperowl

    model = hyperowl.load(chat_checkpoint, device="cpu")
    with ServerThread(create_app(model, model.processor, ServeConfig(model_name=MODEL, allow_remote_media=False))) as srv:
        assert_error(post(srv, chat(img_part(f"{http_media}/ok.png"))), 403, "remote_media_disabled")
        assert_error(post(srv, chat(img_part("file:///etc/hostname"))), 403, "forbidden_path")  # no media dir set


def test_unknown_route_and_method_are_json(server):
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.url + "/v1/chat/completions"), 405)


def test_server_keeps_serving_after_bad_requests(server):
    for kwargs, _, _ in BAD_CASES.values():  # all of them again, back to back
        assert 400 <= post(server, **kwargs).status_code < 500
    r = post(server, chat(img_part(durl(png()))))
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["scheduler"]["failed"] == 0
