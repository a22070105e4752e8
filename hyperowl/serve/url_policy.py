"""Which http(s) media URLs the server may fetch for a client (the SSRF guard), decided once per URL.

Design note: a server that fetches URLs its clients name can be made to send requests into the network it
sits in (loopback services, private ranges, cloud metadata at 169.254.169.254) and to report whether they
answer. So, by default, a URL is fetched only when *every* address its host resolves to is a public one:
loopback, private (RFC 1918, IPv6 unique-local), link-local, carrier-grade NAT (100.64/10), multicast,
unspecified, documentation/benchmark/reserved ranges and IPv6 outside global unicast (2000::/3) are refused.
IPv6 forms that carry an IPv4 address (IPv4-mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96, 6to4 2002::/16) are
judged by the IPv4 address inside; the deprecated IPv4-compatible ::/96 and SIIT ::ffff:0:0:0/96, the
local-use NAT64 prefix and Teredo (inside 2001::/23) are refused outright.

`check` resolves the host *once* and returns the checked addresses in a `Target`; the fetch (media.py)
connects only to those addresses (a network backend that ignores any other name), so a DNS answer that
changes between the check and the connection (DNS rebinding) cannot redirect it. The URL keeps its host
name, so the Host header, TLS SNI and certificate verification are still those of the name. Redirects are
followed by media.py hop by hop, and each hop goes through `check` again.

Host literals are read as the C resolver reads them (inet_aton): `2130706433`, `0x7f000001`, `0177.0.0.1`
and `127.1` are all 127.0.0.1, and are judged as such without asking DNS.

Operator controls (`hyperowl serve` flags): `allowed_domains` (--allowed-media-domains) limits fetching to
these host names, each with its subdomains; `private_networks` (--allow-private-media-urls [NETS]) lets
internal addresses through, all of them or only those in the given networks. The two combine: an allowlisted
host on an internal address needs both. `--no-remote-media` (media.py) turns http(s) fetching off entirely.
Proxies from the environment are not used: a proxy would resolve the name again itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Union

from ..errors import InputError

log = logging.getLogger(__name__)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Resolver = Callable[[str, int], Awaitable[list[str]]]

SCHEMES = {"http": 80, "https": 443}

_N = ipaddress.ip_network
# (network, why it is not fetched). Order matters only for the wording (first match names the reason).
_BLOCKED_V4: list[tuple[IPNetwork, str]] = [
    (_N("0.0.0.0/8"), "an unspecified ('this network') address"),
    (_N("127.0.0.0/8"), "a loopback address"),
    (_N("10.0.0.0/8"), "a private address"),
    (_N("172.16.0.0/12"), "a private address"),
    (_N("192.168.0.0/16"), "a private address"),
    (_N("100.64.0.0/10"), "a carrier-grade NAT (shared) address"),
    (_N("169.254.0.0/16"), "a link-local address (cloud metadata services live here)"),
    (_N("192.0.0.0/24"), "a reserved (IETF protocol assignment) address"),
    (_N("192.0.2.0/24"), "a documentation address"),
    (_N("198.51.100.0/24"), "a documentation address"),
    (_N("203.0.113.0/24"), "a documentation address"),
    (_N("192.88.99.0/24"), "a reserved (6to4 relay) address"),
    (_N("198.18.0.0/15"), "a reserved (benchmarking) address"),
    (_N("224.0.0.0/4"), "a multicast address"),
    (_N("240.0.0.0/4"), "a reserved address"),  # includes the broadcast address 255.255.255.255
]
_BLOCKED_V6: list[tuple[IPNetwork, str]] = [
    (_N("::/128"), "an unspecified address"),
    (_N("::1/128"), "a loopback address"),
    (_N("::/96"), "a reserved (IPv4-compatible) address"),
    (_N("::ffff:0:0:0/96"), "a reserved (IPv4-translated) address"),
    (_N("64:ff9b:1::/48"), "a local-use NAT64 address"),
    (_N("100::/64"), "a reserved (discard-only) address"),
    (_N("2001::/23"), "a reserved (IETF protocol assignment, Teredo) address"),
    (_N("2001:db8::/32"), "a documentation address"),
    (_N("3fff::/20"), "a documentation address"),
    (_N("fc00::/7"), "a private (unique local) address"),
    (_N("fe80::/10"), "a link-local address"),
    (_N("fec0::/10"), "a site-local address"),
    (_N("ff00::/8"), "a multicast address"),
]
_GLOBAL_UNICAST_V6 = _N("2000::/3")
_NAT64 = _N("64:ff9b::/96")
_6TO4 = _N("2002::/16")
ALL_NETWORKS: tuple[IPNetwork, ...] = (_N("0.0.0.0/0"), _N("::/0"))

_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


class UrlRefused(Exception):
    """The policy does not allow this URL (a 403 for the client)."""


class UrlInvalid(Exception):
    """Not a URL that can name media (a 400 for the client)."""


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for: IPv4-mapped, NAT64 (64:ff9b::/96) or 6to4 (2002::/16)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _6TO4:
        return ip.sixtofour
    return None


def internal_reason(ip: IPAddress) -> str | None:
    """Why `ip` is an internal (not publicly routable) address, or None for a public one."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            why = internal_reason(inner)
            return f"{why} ({inner}) inside an IPv6 address" if why else None
        table = _BLOCKED_V6
    else:
        table = _BLOCKED_V4
    for net, why in table:
        if ip in net:
            return why
    if isinstance(ip, ipaddress.IPv6Address) and (ip not in _GLOBAL_UNICAST_V6 or ip.scope_id):
        return "a reserved address (outside IPv6 global unicast)"
    if not ip.is_global:  # a range Python knows and the tables above miss: refuse rather than guess
        return "not a globally routable address"
    return None


def _inet_aton_part(s: str) -> int | None:
    """One part of an inet_aton IPv4 spelling: decimal, 0x-hex or 0-leading octal; None if it is none."""
    if s[:2].lower() == "0x":
        digits, base = s[2:], 16
        ok = bool(digits) and all(c in "0123456789abcdef" for c in digits.lower())
    elif len(s) > 1 and s[0] == "0":
        digits, base = s[1:], 8
        ok = all(c in "01234567" for c in digits)
    else:
        digits, base = s, 10
        ok = s.isdigit() and s.isascii()
    return int(digits, base) if ok else None


def ip_literal(host: str) -> IPAddress | None:
    """The address a host literal names, or None for a host name. Accepts what the C resolver accepts for
    IPv4 (inet_aton: 1 to 4 parts, each decimal, 0x-hex or 0-octal, the last one filling the remaining bytes:
    `127.1`, `2130706433`, `0x7f000001`, `0177.0.0.1`) and IPv6 with or without brackets and zone."""
    h = host.strip("[]") if host.startswith("[") else host
    h = h.replace("%25", "%")
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    if ":" in h:
        return None
    parts = h.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = [_inet_aton_part(p) for p in parts]
    if any(v is None for v in values):
        return None
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (5 - len(parts))):
        return None
    n = 0
    for v in head:
        n = n << 8 | v
    n = n << (8 * (5 - len(parts))) | last
    return ipaddress.IPv4Address(n)


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host (the one lookup of a fetch)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


@dataclass(frozen=True)
class Target:
    """One checked URL: where to connect (only `addresses`) and what to ask for."""

    url: str
    scheme: str
    host: str  # as the URL names it (IDNA-encoded; Host header, SNI and certificate checks use it)
    port: int
    target: bytes  # path and query
    addresses: tuple[str, ...]


def _normalize_domain(entry: str) -> str:
    e = entry.strip().lower()
    if "/" in e or "@" in e or (":" in e and ip_literal(e) is None):
        raise InputError(f"--allowed-media-domains '{entry}': give host names (example.com), not URLs or ports")
    e = e.removeprefix("*.").lstrip(".").rstrip(".")
    if not e:
        raise InputError(f"--allowed-media-domains '{entry}': empty host name")
    ip = ip_literal(e)
    if ip is not None:
        return str(ip)
    try:
        e = e.encode("idna").decode("ascii")
    except UnicodeError:
        raise InputError(f"--allowed-media-domains '{entry}': not a valid host name") from None
    if not _HOST_NAME.match(e):
        raise InputError(f"--allowed-media-domains '{entry}': not a valid host name")
    return e


@dataclass(frozen=True)
class UrlPolicy:
    """Which http(s) URLs may be fetched. The default: any public host, no internal address."""

    allowed_domains: tuple[str, ...] = ()  # non-empty: only these hosts (and their subdomains); IPs exactly
    private_networks: tuple[IPNetwork, ...] = ()  # internal addresses let through (ALL_NETWORKS = all)
    resolver: Resolver | None = field(default=None, compare=False)  # None: the system resolver

    @classmethod
    def from_options(cls, allowed_domains: str | None = None, allow_private: str | None = None) -> "UrlPolicy":
        """From the serve flags: comma-separated host names; 'all' or comma-separated networks (CIDR)."""
        domains = tuple(_normalize_domain(d) for d in (allowed_domains or "").split(",") if d.strip())
        if allowed_domains is not None and not domains:
            raise InputError("--allowed-media-domains: give at least one host name (or --no-remote-media)")
        nets: tuple[IPNetwork, ...] = ()
        if allow_private is not None:
            if allow_private.strip().lower() == "all":
                nets = ALL_NETWORKS
            else:
                try:
                    nets = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in allow_private.split(",")
                                 if n.strip())
                except ValueError as e:
                    raise InputError(f"--allow-private-media-urls '{allow_private}': {e} (give 'all' or "
                                     "networks such as 10.1.0.0/16,fd00::/8)") from None
                if not nets:
                    raise InputError("--allow-private-media-urls: give 'all' or networks such as 10.1.0.0/16")
        return cls(allowed_domains=domains, private_networks=nets)

    def host_allowed(self, host: str) -> bool:
        if not self.allowed_domains:
            return True
        ip = ip_literal(host)
        if ip is not None:
            return str(ip) in self.allowed_domains
        return any(host == d or host.endswith("." + d) for d in self.allowed_domains)

    def address_allowed(self, ip: IPAddress) -> str | None:
        """None when the address may be connected to, else why not."""
        why = internal_reason(ip)
        if why is None:
            return None
        forms = [ip] + ([embedded_ipv4(ip)] if isinstance(ip, ipaddress.IPv6Address) and embedded_ipv4(ip) else [])
        if any(f in net for f in forms for net in self.private_networks):
            return None
        return why

    def _refuse_internal_literal(self, url: str) -> None:
        """UrlRefused when a URL the fetcher cannot parse still names an internal address literal: it is
        refused for what it points at (403), not merely as malformed (400)."""
        try:
            host = urllib.parse.urlsplit(url).hostname or ""
        except ValueError:
            return
        ip = ip_literal(host)
        why = self.address_allowed(ip) if ip is not None else None
        if why is not None:
            raise UrlRefused(f"{host} is {ip}, {why}; internal addresses are not fetched")

    async def check(self, url: str) -> Target:
        """Parse, match and resolve `url`; a Target to connect to, or UrlInvalid / UrlRefused / OSError (the
        host does not resolve). Every resolved address must pass: one internal address refuses the URL."""
        import httpx

        try:
            u = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError) as e:
            self._refuse_internal_literal(url)  # e.g. 0177.0.0.1, which httpx will not parse but C resolvers do
            raise UrlInvalid(f"not a valid URL ({e})") from None
        if u.scheme not in SCHEMES:
            raise UrlInvalid(f"only http:// and https:// media URLs are fetched, not {u.scheme or 'no'} scheme")
        if u.userinfo:
            raise UrlInvalid("media URLs with a user name or password are not fetched")
        host = u.raw_host.decode("ascii").lower().rstrip(".")
        port = SCHEMES[u.scheme] if u.port is None else u.port
        if not host:
            raise UrlInvalid("the URL names no host")
        if not 0 < port < 65536:
            raise UrlInvalid(f"port {port} is out of range")
        ip = ip_literal(host)
        if ip is None and (":" in host or not _HOST_NAME.match(host)):
            raise UrlInvalid(f"{host!r} is not a valid host name")
        if not self.host_allowed(host):
            raise UrlRefused(f"host {host!r} is not in the server's allowed media domains "
                             f"({', '.join(self.allowed_domains)})")
        if ip is not None:
            addresses = [str(ip)]
        else:
            addresses = await (self.resolver or system_resolver)(host, port)
            if not addresses:
                raise OSError(f"{host!r} resolves to no address")
        checked: list[str] = []
        for a in addresses:
            addr = ipaddress.ip_address(a)
            why = self.address_allowed(addr)
            if why is not None:
                seen = f"resolves to {addr}," if ip is None else "is" if str(ip) == host else f"is {addr},"
                raise UrlRefused(f"{host} {seen} {why}; internal addresses are not fetched (an operator can "
                                 "allow them with --allow-private-media-urls)")
            if a not in checked:
                checked.append(a)
        return Target(url=str(u), scheme=u.scheme, host=u.raw_host.decode("ascii"), port=port, target=u.raw_path,
                      addresses=tuple(checked))
