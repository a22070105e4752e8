"""The server fetches http(s) media only from public addresses unless its operator says otherwise (issue 33).

Everything runs on loopback: local web servers (plain and TLS) hold the media, a real hyperowl server
(uvicorn) fetches them, requests come from the real `openai` client or httpx. "Public" hosts cannot exist
here, so a test that needs a first hop to pass uses the operator controls (`--allow-private-media-urls` with
one network, `--allowed-media-domains`) or the policy's resolver seam mapping a test name to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.parse
from contextlib import contextmanager
from functools import partial

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from hyperowl.errors import InputError  # noqa: E402
from hyperowl.serve import ServeConfig, ServerThread, UrlPolicy, create_app  # noqa: E402
from hyperowl.serve.url_policy import ALL_NETWORKS, UrlInvalid, UrlRefused, internal_reason, ip_literal  # noqa: E402

MODEL = "tiny-owl"
LOOPBACK_ONLY = (ipaddress.ip_network("127.0.0.1/32"),)  # --allow-private-media-urls 127.0.0.1/32


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 60, 10)).save(buf, "PNG")
    return buf.getvalue()


class MediaServer:
    """A local web server holding ok.png, data.bin (a PNG as octet-stream), note.txt and /redirect?to=URL;
    it records (path, Host header, TLS server name) of every request it gets."""

    def __init__(self, directory, host="127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        self.sni: list[str | None] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.seen.append((self.path, self.headers.get("Host", ""), outer.sni[-1] if outer.sni else None))
                if self.path.startswith("/redirect?"):
                    to = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)["to"][0]
                    self.send_response(302)
                    self.send_header("Location", to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # a client refusing our certificate is expected in one test

        self.srv = Server((host, 0), partial(Handler, directory=str(directory)))
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: outer.sni.append(name)
            self.srv.socket = tls.wrap_socket(self.srv.socket, server_side=True)
        self.port = self.srv.server_address[1]
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ssrf-media")
    (d / "ok.png").write_bytes(png())
    (d / "data.bin").write_bytes(png())
    (d / "note.txt").write_text("not a picture")
    return d


@pytest.fixture(scope="module")
def media(media_dir):
    s = MediaServer(media_dir)
    yield s
    s.close()


@pytest.fixture(scope="module")
def secret(tmp_path_factory):
    """A second loopback web server on 127.0.0.2, the 'internal service' a redirect points at."""
    d = tmp_path_factory.mktemp("ssrf-secret")
    (d / "secret.png").write_bytes(png())
    try:
        s = MediaServer(d, host="127.0.0.2")
    except OSError:
        pytest.skip("cannot bind 127.0.0.2 here")
    yield s
    s.close()


@pytest.fixture(scope="module")
def model(chat_checkpoint):
    import hyperowl

    return hyperowl.load(chat_checkpoint, device="cpu")


@contextmanager
def hyperowl_server(model, policy: UrlPolicy | None = None, **kw):
    cfg = ServeConfig(model_name=MODEL, fetch_timeout_s=3.0, **kw,
                      **({} if policy is None else {"media_url_policy": policy}))
    with ServerThread(create_app(model, model.processor, cfg)) as srv:
        yield srv


@pytest.fixture(scope="module")
def default_server(model):
    with hyperowl_server(model) as srv:
        yield srv


def static_resolver(table: dict[str, list[str]], calls: list[str]):
    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return table[host]
    return resolve


def chat(url: str) -> dict:
    return {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]}]}


def post(srv, url: str) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", json=chat(url), timeout=60)


def assert_refused(r: httpx.Response, url: str, status=403, code="forbidden_url") -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == "messages[0].content[0]", err
    assert url in err["message"], err  # the URL as the client gave it is named
    return err["message"]


# --- the default: loopback refused, the operator's opt-in lets it through ------------------------------------

def test_loopback_url_refused_by_default_and_fetched_with_opt_in(model, default_server, media):
    openai = pytest.importorskip("openai")
    url = f"http://127.0.0.1:{media.port}/ok.png"
    before = len(media.seen)
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.chat.completions.create(**chat(url))
    assert e.value.status_code == 403 and url in str(e.value) and "loopback" in str(e.value)
    assert len(media.seen) == before  # refused before any connection was made
    with hyperowl_server(model, UrlPolicy.from_options(allow_private="all")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(**chat(url))
        assert answer.usage.completion_tokens >= 1
    assert media.seen[before:] == [("/ok.png", f"127.0.0.1:{media.port}", None)]


INTERNAL_HOSTS = ["localhost", "127.0.0.2", "[::1]", "[::ffff:127.0.0.1]", "2130706433", "0x7f000001", "0177.0.0.1",
                  "127.1", "0.0.0.0", "[::]", "169.254.169.254", "[::ffff:169.254.169.254]", "10.1.2.3",
                  "100.64.0.1", "192.168.0.1", "[fe80::1]", "[fd00::1]", "224.0.0.1", "[64:ff9b::7f00:1]",
                  "[2002:7f00:1::1]", "LOCALHOST."]


@pytest.mark.parametrize("host", INTERNAL_HOSTS)
def test_internal_addresses_and_spellings_refused(default_server, media, host):
    url = f"http://{host}:{media.port}/ok.png"
    before = len(media.seen)
    assert_refused(post(default_server, url), url)
    assert len(media.seen) == before


def test_only_media_content_types_are_taken(model, default_server, media):
    with hyperowl_server(model, UrlPolicy(private_networks=LOOPBACK_ONLY)) as srv:
        own = f"{srv.url}/health"  # the server's own JSON endpoint: not an image, refused unread
        assert_refused(post(srv, own), "application/json", 415, "unsupported_media_type")
        assert_refused(post(srv, f"http://127.0.0.1:{media.port}/note.txt"), "text/plain", 415,
                       "unsupported_media_type")
        assert post(srv, f"http://127.0.0.1:{media.port}/data.bin").status_code == 200  # generic bytes: decoded
    for url in ("ftp://127.0.0.1/a.png", "gopher://127.0.0.1:70/", f"http://user:pw@127.0.0.1:{media.port}/ok.png"):
        assert_refused(post(default_server, url), url, 400, "invalid_url")


# --- redirects: every hop obeys the same policy ----------------------------------------------------------------

def test_redirect_to_an_internal_address_is_refused(model, media, secret):
    target = f"http://127.0.0.2:{secret.port}/secret.png"
    first = f"http://127.0.0.1:{media.port}/redirect?to={urllib.parse.quote(target)}"
    with hyperowl_server(model, UrlPolicy(private_networks=LOOPBACK_ONLY)) as srv:
        assert post(srv, f"http://127.0.0.1:{media.port}/ok.png").status_code == 200  # the first hop is allowed
        msg = assert_refused(post(srv, first), target)
        assert "redirect" in msg and "loopback" in msg
        assert secret.seen == []  # the internal service never got the request
        # allowed -> allowed redirects still work, and their number is bounded
        ok = f"http://127.0.0.1:{media.port}/ok.png"
        assert post(srv, f"http://127.0.0.1:{media.port}/redirect?to={urllib.parse.quote(ok)}").status_code == 200
        loop = f"http://127.0.0.1:{media.port}/redirect?to=" + urllib.parse.quote(
            f"/redirect?to={urllib.parse.quote('/redirect?to=' + urllib.parse.quote('/redirect?to=/ok.png'))}")
        assert_refused(post(srv, loop), "", 400, "media_fetch_failed")
        # a redirect to another scheme is refused too
        to_file = f"http://127.0.0.1:{media.port}/redirect?to={urllib.parse.quote('file:///etc/hostname')}"
        assert "/etc/hostname" in assert_refused(post(srv, to_file), "file:")


def test_allowlist_is_honoured_on_every_hop(model, media):
    ok_by_name = f"http://localhost:{media.port}/ok.png"
    by_ip = f"http://127.0.0.1:{media.port}/ok.png"
    policy = UrlPolicy.from_options(allowed_domains="localhost", allow_private="all")
    with hyperowl_server(model, policy) as srv:
        assert post(srv, ok_by_name).status_code == 200
        assert "allowed media domains" in assert_refused(post(srv, by_ip), by_ip)
        hop = f"http://localhost:{media.port}/redirect?to={urllib.parse.quote(by_ip)}"
        assert "allowed media domains" in assert_refused(post(srv, hop), by_ip)
    # the allowlist does not lift the address check: an allowlisted name on loopback still needs the opt-in
    with hyperowl_server(model, UrlPolicy.from_options(allowed_domains="localhost")) as srv:
        assert "loopback" in assert_refused(post(srv, ok_by_name), ok_by_name)


# --- the connection goes to the checked address, with the URL's name for Host, SNI and the certificate ---------

def test_connection_uses_the_checked_address_not_a_second_lookup(model, media):
    try:  # the proof needs a name the system cannot resolve: only the checked address can have been used
        socket.getaddrinfo("media.test", media.port)
        pytest.skip("media.test resolves on this machine")
    except OSError:
        pass
    calls: list[str] = []
    policy = UrlPolicy(private_networks=LOOPBACK_ONLY, resolver=static_resolver(
        {"media.test": ["127.0.0.1"], "rebind.test": ["127.0.0.1", "10.0.0.7"]}, calls))
    with hyperowl_server(model, policy) as srv:
        before = len(media.seen)
        assert post(srv, f"http://media.test:{media.port}/ok.png").status_code == 200
        assert calls == ["media.test"]  # one lookup per hop, none by the HTTP client
        assert media.seen[before:] == [("/ok.png", f"media.test:{media.port}", None)]
        bad = f"http://rebind.test:{media.port}/ok.png"
        assert "10.0.0.7" in assert_refused(post(srv, bad), bad)  # one internal address among several refuses


def _openssl(*args, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A test CA and a certificate for DNS:media.test only (not for 127.0.0.1), made with the openssl tool."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl tool is not installed")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=hyperowl test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _openssl("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=media.test", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=DNS:media.test\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                               "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "leaf.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    return d


def test_https_keeps_sni_host_and_certificate_checks_of_the_name(model, media_dir, tls_files, monkeypatch):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls_files / "leaf.pem", tls_files / "leaf.key")
    tls = MediaServer(media_dir, tls=ctx)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files / "ca.pem"))  # the fetch trusts the test CA
    calls: list[str] = []
    policy = UrlPolicy(private_networks=LOOPBACK_ONLY, resolver=static_resolver(
        {"media.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}, calls))
    try:
        with hyperowl_server(model, policy) as srv:
            assert post(srv, f"https://media.test:{tls.port}/ok.png").status_code == 200
            assert tls.seen == [("/ok.png", f"media.test:{tls.port}", "media.test")]  # Host and SNI: the name
            # the certificate is checked against the URL's name, never the address connected to
            for url in (f"https://127.0.0.1:{tls.port}/ok.png", f"https://other.test:{tls.port}/ok.png"):
                msg = assert_refused(post(srv, url), "", 400, "media_fetch_failed")
                assert "certificate" in msg.lower() or "hostname" in msg.lower(), msg
            assert len(tls.seen) == 1
    finally:
        tls.close()


# --- the address check and the policy on their own ----------------------------------------------------------

@pytest.mark.parametrize("spelling,address", [
    ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"), ("127.0.1", "127.0.0.1"), ("0", "0.0.0.0"), ("[::1]", "::1"),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1"), ("134744072", "8.8.8.8"), ("1.2.3.4", "1.2.3.4")])
def test_ip_literal_reads_what_the_c_resolver_reads(spelling, address):
    assert ip_literal(spelling) == ipaddress.ip_address(address)
    try:  # the C library (inet_aton) agrees wherever it reads IPv4 spellings
        assert socket.inet_aton(spelling) == ipaddress.IPv4Address(address).packed
    except (OSError, ipaddress.AddressValueError):
        pass


@pytest.mark.parametrize("host", ["example.com", "1.2.3.256", "08.0.0.1", "0x", "1.2.3.4.5", "a.0x7f", ""])
def test_host_names_are_not_ip_literals(host):
    assert ip_literal(host) is None


INTERNAL = ["0.0.0.0", "0.1.2.3", "127.0.0.1", "127.255.255.254", "10.0.0.1", "172.16.0.1", "172.31.255.255",
            "192.168.1.1", "100.64.0.1", "100.127.255.255", "169.254.169.254", "192.0.0.8", "192.0.2.1",
            "198.18.0.1", "198.51.100.7", "203.0.113.9", "224.0.0.1", "239.255.255.250", "240.0.0.1",
            "255.255.255.255", "::", "::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
            "::127.0.0.1", "::ffff:0:7f00:1", "64:ff9b::a00:1", "64:ff9b::7f00:1", "64:ff9b:1::1", "2002:a00:1::1",
            "2002:7f00:1::", "2002:a9fe:a9fe::1", "100::1", "2001::1", "2001:db8::1", "3fff::1", "fc00::1",
            "fd12:3456::1", "fe80::1", "fe80::1%1", "fec0::1", "ff02::1", "4000::1", "5f00::1"]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "100.63.255.255", "100.128.0.0", "172.32.0.1", "192.169.0.1",
          "2606:4700:4700::1111", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]


@pytest.mark.parametrize("address", INTERNAL)
def test_internal_addresses_are_named(address):
    why = internal_reason(ipaddress.ip_address(address))
    assert why and "address" in why


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    assert internal_reason(ipaddress.ip_address(address)) is None


def test_policy_checks_without_a_server():
    async def check(policy, url):
        return await policy.check(url)

    lo = UrlPolicy(resolver=static_resolver({"pub.test": ["8.8.8.8", "2606:4700:4700::1111"]}, []))
    t = asyncio.run(check(lo, "https://pub.test/a.png?x=1#frag"))
    assert (t.host, t.port, t.target, t.addresses) == ("pub.test", 443, b"/a.png?x=1", ("8.8.8.8", "2606:4700:4700::1111"))
    nets = UrlPolicy(private_networks=(ipaddress.ip_network("10.1.0.0/16"),))
    assert asyncio.run(check(nets, "http://10.1.2.3/x")).addresses == ("10.1.2.3",)
    mapped = str(ipaddress.ip_address("::ffff:10.1.2.3"))
    assert asyncio.run(check(nets, "http://[::ffff:10.1.2.3]/x")).addresses == (mapped,)
    with pytest.raises(UrlRefused, match="10.2.0.1"):
        asyncio.run(check(nets, "http://10.2.0.1/x"))
    with pytest.raises(UrlRefused, match="169.254.169.254"):  # the opt-in for one network opens no other
        asyncio.run(check(nets, "http://169.254.169.254/latest/meta-data/"))
    assert asyncio.run(check(UrlPolicy(private_networks=ALL_NETWORKS), "http://169.254.169.254/")).port == 80
    sub = UrlPolicy(allowed_domains=("example.com",), resolver=static_resolver(
        {"example.com": ["8.8.8.8"], "img.example.com": ["8.8.8.8"]}, []))
    assert asyncio.run(check(sub, "http://IMG.Example.COM./a.png")).host == "img.example.com."
    for url in ("http://badexample.com/", "http://example.com.evil.test/", "http://8.8.8.8/"):
        with pytest.raises(UrlRefused, match="allowed media domains"):
            asyncio.run(check(sub, url))
    for url in ("file:///etc/passwd", "http:///x", "http://a%20b/", "http://u:p@example.com/", "http://h:0/"):
        with pytest.raises(UrlInvalid):
            asyncio.run(check(sub, url))


def test_operator_options(capsys):
    p = UrlPolicy.from_options(" Example.COM ,*.cdn.test,.img.test, 127.0.0.1,[::1]", "10.0.0.0/8, fd00::/8")
    assert p.allowed_domains == ("example.com", "cdn.test", "img.test", "127.0.0.1", "::1")
    assert p.private_networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    assert UrlPolicy.from_options(None, "all").private_networks == ALL_NETWORKS
    assert UrlPolicy.from_options() == UrlPolicy()
    for domains, private in [("https://example.com/", None), ("example.com:8080", None), ("", None),
                             (None, "10.0.0.0/33"), (None, "internal")]:
        with pytest.raises(InputError):
            UrlPolicy.from_options(domains, private)
    from hyperowl.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--allow-private-media-urls", "--allowed-media-domains", "a.test"])
    assert (args.allow_private_media_urls, args.allowed_media_domains) == ("all", "a.test")
    args = build_parser().parse_args(["serve", "--allow-private-media-urls", "10.0.0.0/8"])
    assert args.allow_private_media_urls == "10.0.0.0/8" and args.allowed_media_domains is None
    # a bad value stops `hyperowl serve` with one line naming the flag, before any model is loaded
    assert main(["serve", "--model", "/nonexistent", "--allow-private-media-urls", "10.0.0.0/33"]) == 2
    err = capsys.readouterr().err
    assert "--allow-private-media-urls" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
