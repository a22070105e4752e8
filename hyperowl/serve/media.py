"""Media of a chat request: URLs -> bytes (with limits) -> decoded images / sampled video frames' pixels.

Design note: three URL kinds are accepted.
  * `data:<mime>;base64,...`: size checked on the encoded length *before* decoding (413), the mime type must
    be image/* for an image part and video/* (or application/octet-stream) for a video part (415);
  * `file://` URLs (and bare absolute paths): only when the server has an `--allowed-media-dir`, and only
    for files whose *resolved* path (symlinks followed, `..` collapsed) lies inside it (403 otherwise);
  * `http(s)://`: only where the URL policy (url_policy.py: public addresses by default, the operator's
    allowlist and private networks) allows the host; the connection goes to the addresses it checked
    (`_PinnedBackend`), redirects are followed here, at most MAX_REDIRECTS, each hop checked again (403).
    Fetched with a connect/read timeout and a wall-clock limit on the whole download (DNS included), streamed
    with a byte cap so a huge file is never held (413); an answer whose Content-Type cannot be media is refused
    unread (415); no content coding is asked for, so the cap counts the bytes decoded.
    `--no-remote-media` turns http(s) off entirely.
Images larger than MAX_IMAGE_PIXELS are refused from their header, before decoding (413).
Each item gets the SHA-256 of its bytes (it names the item in logs and errors). Images are decoded here (PIL,
with a pixel limit read from the header); videos are planned and decoded by the processor (prompt.py). Both run in a worker
thread of the request handler; its InputErrors become 400 answers naming the content part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import io
import logging
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import InputError
from ..limits import MAX_IMAGE_PIXELS, MAX_MEDIA_BYTES  # one definition for the library, CLI and server
from ..processing.images import load_image
from .protocol import ApiError, MediaPart
from .url_policy import Target, UrlInvalid, UrlPolicy, UrlRefused

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)
GENERIC_TYPES = ("", "application/octet-stream", "binary/octet-stream")  # bytes of unstated type: PIL/PyAV decide
VIDEO_CONTAINERS = ("application/mp4", "application/ogg", "application/x-matroska")


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = MAX_MEDIA_BYTES  # one image or video, decoded
    fetch_timeout_s: float = 10.0  # whole http(s) download
    allowed_dir: Path | None = None  # file:// URLs only below this directory (None = refused)
    allow_remote: bool = True  # http(s) URLs
    url_policy: UrlPolicy = UrlPolicy()  # which http(s) hosts and addresses (url_policy.py)


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
    if not media_type_ok(part.kind, mime):
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


class _PinnedBackend:
    """httpcore network backend that connects only to the addresses the URL policy checked (tried in order),
    never resolving the name again: DNS rebinding cannot move the connection. TLS still uses the URL's name."""

    def __init__(self, target: Target) -> None:
        import httpcore

        self.target, self.inner = target, httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options=None):
        import httpcore

        if host.lower().rstrip(".") != self.target.host.lower().rstrip(".") or port != self.target.port:
            raise httpcore.ConnectError(f"refusing to connect to unchecked {host}:{port}")
        error: Exception | None = None
        for address in self.target.addresses:
            try:
                return await self.inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                    socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                error = e
        raise error or httpcore.ConnectError(f"{host}: no address")

    async def connect_unix_socket(self, *args, **kwargs):
        raise RuntimeError("media fetches never use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


@functools.lru_cache(maxsize=4)
def _ssl_context(cert_file: str | None, cert_dir: str | None):
    """The verifying TLS context (certifi, or SSL_CERT_FILE / SSL_CERT_DIR as httpx reads them), made once per
    trust setting: making one costs tens of milliseconds, more than a small download on a LAN."""
    import httpx

    return httpx.create_ssl_context()


def media_type_ok(kind: str, mime: str) -> bool:
    """Whether a declared media type can hold an `kind` ("image"/"video"): its own family or generic bytes."""
    mime = mime.split(";")[0].strip().lower()
    return mime.startswith(f"{kind}/") or mime in GENERIC_TYPES or (kind == "video" and mime in VIDEO_CONTAINERS)


def _refused(part: MediaPart, url: str, why: str, hop: str | None) -> ApiError:
    where = f"the redirect from {hop[:200]!r} to {url[:200]!r}" if hop else repr(url[:200])
    log.warning("%s: refused media URL %s: %s", part.param, where, why)
    return ApiError(403, f"{part.param}: {where} is not fetched: {why}", param=part.param, code="forbidden_url")


async def _get_checked(part: MediaPart, limits: MediaLimits, url: str, hop: str | None):
    """The policy's verdict on one hop's URL (a Target), as an ApiError when it is refused or invalid."""
    try:
        return await limits.url_policy.check(url)
    except UrlRefused as e:
        raise _refused(part, url, str(e), hop) from None
    except UrlInvalid as e:
        status = 403 if hop else 400  # a redirect to file:, ftp: ... is the remote server's doing
        raise ApiError(status, f"{part.param}: {(hop and 'redirect to ') or ''}{url[:200]!r}: {e}", param=part.param,
                       code="forbidden_url" if hop else "invalid_url") from None
    except OSError as e:  # the host name does not resolve
        raise ApiError(400, f"{part.param}: cannot resolve the host of {url[:200]!r} ({e})", param=part.param,
                       code="media_fetch_failed") from None


async def _from_http(part: MediaPart, limits: MediaLimits) -> MediaBlob:
    import httpcore
    import httpx

    if not limits.allow_remote:
        raise ApiError(403, f"{part.param}: http(s) media URLs are disabled on this server", param=part.param,
                       code="remote_media_disabled")
    t = limits.fetch_timeout_s
    timeouts = {"connect": t, "read": t, "write": t, "pool": t}

    async def fetch() -> bytes:
        url, hop = part.url, None
        for _ in range(MAX_REDIRECTS + 1):  # redirects by hand: every hop goes through the URL policy
            target = await _get_checked(part, limits, url, hop)
            ssl_context = _ssl_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")) \
                if target.scheme == "https" else None
            async with httpcore.AsyncConnectionPool(ssl_context=ssl_context, network_backend=_PinnedBackend(target),
                                                    max_connections=1, retries=0) as pool:
                req_url = httpcore.URL(scheme=target.scheme.encode(), host=target.host.encode(), port=target.port,
                                       target=target.target)
                headers = [(b"Host", httpx.URL(target.url).netloc),  # httpcore would not bracket an IPv6 host
                           (b"Accept", f"{part.kind}/*, application/octet-stream;q=0.5".encode()),
                           (b"Accept-Encoding", b"identity"), (b"User-Agent", b"hyperowl")]
                async with pool.stream("GET", req_url, headers=headers, extensions={"timeout": timeouts}) as r:
                    location = dict((k.lower(), v) for k, v in r.headers).get(b"location")
                    if r.status in REDIRECTS and location:
                        url, hop = str(httpx.URL(target.url).join(location.decode("latin-1"))), target.url
                        continue
                    if r.status != 200:
                        raise ApiError(400, f"{part.param}: fetching the {part.kind} URL answered HTTP {r.status}",
                                       param=part.param, code="media_fetch_failed")
                    head = httpx.Headers(r.headers)
                    mime = head.get("content-type", "")
                    if not media_type_ok(part.kind, mime):
                        raise ApiError(415, f"{part.param}: the {part.kind} URL answered with media type "
                                            f"{mime.split(';')[0]!r}, not {'an image' if part.kind == 'image' else 'a video'} type",
                                       param=part.param,
                                       code="unsupported_media_type")
                    declared = head.get("content-length")
                    if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                        raise _too_big(part, limits.max_bytes)
                    buf = bytearray()
                    async for chunk in r.aiter_stream():
                        buf += chunk
                        if len(buf) > limits.max_bytes:  # a lying or absent Content-Length
                            raise _too_big(part, limits.max_bytes)
                    return bytes(buf)
        raise ApiError(400, f"{part.param}: the {part.kind} URL redirected more than {MAX_REDIRECTS} times",
                       param=part.param, code="media_fetch_failed")

    try:
        data = await asyncio.wait_for(fetch(), timeout=limits.fetch_timeout_s)
    except (asyncio.TimeoutError, httpcore.TimeoutException):
        raise ApiError(400, f"{part.param}: fetching the {part.kind} URL took longer than {limits.fetch_timeout_s:g} s",
                       param=part.param, code="media_fetch_timeout") from None
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError) as e:
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
