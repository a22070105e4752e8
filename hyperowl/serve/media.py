"""Media of a chat request: URLs -> bytes (with limits) -> decoded images / sampled video frames' pixels.

Design note: three URL kinds are accepted.
  * `data:<mime>;base64,...`: size checked on the encoded length *before* decoding (413), the mime type must
    be image/* for an image part and video/* (or application/octet-stream) for a video part (415);
  * `file://` URLs (and bare absolute paths): only when the server has an `--allowed-media-dir`, and only
    for files whose *resolved* path (symlinks followed, `..` collapsed) lies inside it (403 otherwise);
  * `http(s)://`: fetched with a connect/read timeout and a wall-clock limit on the whole download, streamed
    with a byte cap so a huge file is never held (413); redirects are followed at most a few times.
    `--no-remote-media` turns this off (fetching arbitrary URLs from a server is an SSRF surface).
Images larger than MAX_IMAGE_PIXELS are refused from their header, before decoding (413).
Each item gets the SHA-256 of its bytes (it names the item in logs and errors). Images are decoded here (PIL,
with a pixel limit read from the header); videos are planned and decoded by the processor (prompt.py). Both run in a worker
thread of the request handler; its InputErrors become 400 answers naming the content part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import logging
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import InputError
from ..limits import MAX_IMAGE_PIXELS, MAX_MEDIA_BYTES  # one definition for the library, CLI and server
from ..processing.images import load_image
from .protocol import ApiError, MediaPart

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = MAX_MEDIA_BYTES  # one image or video, decoded
    fetch_timeout_s: float = 10.0  # whole http(s) download
    allowed_dir: Path | None = None  # file:// URLs only below this directory (None = refused)
    allow_remote: bool = True  # http(s) URLs


@dataclass(frozen=True)
class MediaBlob:
    kind: str  # "image" | "video"
    data: bytes
    digest: str  # sha256 hex of data
    param: str  # where it was in the request


def _too_big(part: MediaPart, limit: int) -> ApiError:
    return ApiError(413, f"{part.param}: the {part.kind} is larger than the {limit} byte limit", param=part.param,
                    code="media_too_large")


def _blob(part: MediaPart, data: bytes) -> MediaBlob:
    if not data:
        raise ApiError(400, f"{part.param}: the {part.kind} is empty", param=part.param, code=f"invalid_{part.kind}")
    return MediaBlob(part.kind, data, hashlib.sha256(data).hexdigest(), part.param)


def _from_data_url(part: MediaPart, limits: MediaLimits) -> MediaBlob:
    header, sep, payload = part.url[5:].partition(",")
    if not sep:
        raise ApiError(400, f"{part.param}: malformed data URL (no ',')", param=part.param, code="invalid_url")
    mime, *params = header.split(";")
    mime = mime.strip().lower()
    ok = mime.startswith(f"{part.kind}/") or mime in ("", "application/octet-stream")
    if not ok:
        what = "an image" if part.kind == "image" else "a video"
        raise ApiError(415, f"{part.param}: media type {mime!r} is not {what} type", param=part.param,
                       code="unsupported_media_type")
    if len(payload) * 3 // 4 > limits.max_bytes + 2:  # checked before decoding anything
        raise _too_big(part, limits.max_bytes)
    if "base64" in params:
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{part.param}: the data URL is not valid base64", param=part.param,
                           code="invalid_url") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > limits.max_bytes:
        raise _too_big(part, limits.max_bytes)
    return _blob(part, data)


def _from_file(part: MediaPart, limits: MediaLimits) -> MediaBlob:
    if part.url.startswith("file:"):
        parsed = urllib.parse.urlparse(part.url)
        if parsed.netloc not in ("", "localhost"):
            raise ApiError(400, f"{part.param}: file URLs must name a local path (file:///...)", param=part.param,
                           code="invalid_url")
        raw = urllib.parse.unquote(parsed.path)
    else:
        raw = part.url
    if limits.allowed_dir is None:
        raise ApiError(403, f"{part.param}: local file URLs are disabled on this server (start it with "
                            "--allowed-media-dir to allow a directory)", param=part.param, code="forbidden_path")
    root = limits.allowed_dir.resolve()
    path = Path(raw).resolve()  # follows symlinks and collapses '..': the check is on the real target
    if not path.is_relative_to(root):
        raise ApiError(403, f"{part.param}: {raw!r} is outside the allowed media directory", param=part.param,
                       code="forbidden_path")
    if not path.is_file():
        raise ApiError(400, f"{part.param}: no such file {raw!r} in the media directory", param=part.param,
                       code="file_not_found")
    if path.stat().st_size > limits.max_bytes:
        raise _too_big(part, limits.max_bytes)
    return _blob(part, path.read_bytes())


async def _from_http(part: MediaPart, limits: MediaLimits) -> MediaBlob:
    import httpx

    if not limits.allow_remote:
        raise ApiError(403, f"{part.param}: http(s) media URLs are disabled on this server", param=part.param,
                       code="remote_media_disabled")

    async def fetch() -> bytes:
        timeout = httpx.Timeout(limits.fetch_timeout_s)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True, max_redirects=MAX_REDIRECTS) as client:
            async with client.stream("GET", part.url) as r:
                if r.status_code != 200:
                    raise ApiError(400, f"{part.param}: fetching the {part.kind} URL answered HTTP {r.status_code}",
                                   param=part.param, code="media_fetch_failed")
                declared = r.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise _too_big(part, limits.max_bytes)
                buf = bytearray()
                async for chunk in r.aiter_bytes():
                    buf += chunk
                    if len(buf) > limits.max_bytes:  # a lying or absent Content-Length
                        raise _too_big(part, limits.max_bytes)
                return bytes(buf)

    try:
        data = await asyncio.wait_for(fetch(), timeout=limits.fetch_timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise ApiError(400, f"{part.param}: fetching the {part.kind} URL took longer than {limits.fetch_timeout_s:g} s",
                       param=part.param, code="media_fetch_timeout") from None
    except httpx.HTTPError as e:
        raise ApiError(400, f"{part.param}: cannot fetch the {part.kind} URL ({type(e).__name__}: {e})",
                       param=part.param, code="media_fetch_failed") from None
    return _blob(part, data)


async def resolve(part: MediaPart, limits: MediaLimits) -> MediaBlob:
    """The bytes of one media part (see the module note for the rules per URL kind)."""
    url = part.url
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _from_data_url(part, limits)
    if scheme in ("http", "https"):
        return await _from_http(part, limits)
    if scheme == "file" or url.startswith("/"):
        return await asyncio.to_thread(_from_file, part, limits)
    raise ApiError(400, f"{part.param}: unsupported URL {url[:40]!r}; use a data:, file:// or http(s):// URL",
                   param=part.param, code="invalid_url")


def decode_image(blob: MediaBlob, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    try:
        with Image.open(io.BytesIO(blob.data)) as probe:  # header only: refuse a pixel bomb before decoding it
            w, h = probe.size
    except Exception:
        w = h = 0  # not an image PIL can open: load_image below gives the precise error
    if w * h > max_pixels:
        raise ApiError(413, f"{blob.param}: the image is {w}x{h} pixels, more than the {max_pixels} pixel limit",
                       param=blob.param, code="image_too_large")
    try:
        return load_image(blob.data, name=blob.param, max_pixels=max_pixels)
    except InputError as e:
        raise ApiError(400, str(e), param=blob.param, code="invalid_image") from None
    except Exception as e:  # a decoder failure load_image does not know: still the input's fault, not a 500
        log.warning("%s: unexpected image decode failure", blob.param, exc_info=True)
        raise ApiError(400, f"{blob.param}: cannot decode the image ({type(e).__name__})", param=blob.param,
                       code="invalid_image") from None
