"""Outbound requests to URLs users give us (URL sources, webhooks) must not reach the
farm's own network: loopback, private, link-local (cloud metadata at 169.254.169.254)
and other non-global addresses are refused unless an allow-list permits them.

Checked after DNS resolution (every address a name resolves to) and again on every
redirect, and pinned: a request goes to the address that was checked (`send_pinned`),
so a name answering differently a moment later (DNS rebinding) changes nothing.
Imports only the standard library and httpx: workers use it too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

MAX_REDIRECTS = 5
PROBE_SECONDS = 15.0  # the whole probe of a URL: DNS, every redirect, every header
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UrlRefused(ValueError):
    """The URL points somewhere this farm may not go; the message says why and how to
    allow it."""


class UrlUnreachable(ValueError):
    """The URL is allowed but did not answer with content."""


@dataclass(frozen=True)
class Allowlist:
    """IP networks ("10.0.0.0/8", "127.0.0.1") and host names that may be private."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        networks, hosts = [], set()
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(tuple(networks), frozenset(hosts))

    def permits(self, host: str, address: IpAddress) -> bool:
        return host in self.hosts or any(address in net for net in self.networks)


def check_url(url: str, allowlist: Allowlist) -> IpAddress:
    """Refuses URLs that are not http(s) or whose host resolves to a non-global address;
    returns the address to connect to (every address the name has was checked)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UrlRefused(f"only http and https URLs are accepted, not {parts.scheme or 'none'!r}")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise UrlRefused(f"the URL {url!r} names no host")
    addresses = resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
    for address in map(unmapped, addresses):
        if not is_public(address) and not allowlist.permits(host, address):
            shown = host if host == str(address) else f"{host} ({address})"
            raise UrlRefused(
                f"{shown} is a {kind_of(address)} address; this farm only fetches public "
                "addresses. To allow it, add it to SCRIBEFARM_URL_ALLOWLIST."
            )
    return addresses[0]


@dataclass(frozen=True)
class Pinned:
    """A URL bound to the address the guard approved: connect to `url` (the host
    replaced by that address), and name the host in the Host header and TLS."""

    url: str
    host_header: str
    server_name: str


def pin(url: str, allowlist: Allowlist) -> Pinned:
    """Checks `url` and binds it to the checked address (blocking: DNS)."""
    address = check_url(url, allowlist)
    parts = urlsplit(url)
    literal = f"[{address}]" if address.version == 6 else str(address)
    userinfo, _, host_port = parts.netloc.rpartition("@")
    netloc = (f"{userinfo}@" if userinfo else "") + literal
    if parts.port is not None:
        netloc += f":{parts.port}"
    return Pinned(parts._replace(netloc=netloc).geturl(), host_port, parts.hostname or "")


async def send_pinned(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    allowlist: Allowlist,
    *,
    headers: Sequence[tuple[str, str]] = (),
    content: bytes | None = None,
) -> httpx.Response:
    """One request to the address the guard approved, never following a redirect.
    Streamed: the caller reads or closes the response. TLS still verifies the host's
    certificate by name (SNI and the check use the name, not the address)."""
    pinned = await asyncio.to_thread(pin, url, allowlist)
    request = client.build_request(
        method,
        pinned.url,
        headers=[*headers, ("Host", pinned.host_header)],
        content=content,
        extensions={"sni_hostname": pinned.server_name},
    )
    return await client.send(request, stream=True, follow_redirects=False)


def resolve(host: str, port: int) -> list[IpAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UrlUnreachable(f"cannot resolve {host}: {exc.strerror}") from exc
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def unmapped(address: IpAddress) -> IpAddress:
    """An IPv4 address written as IPv6 (::ffff:127.0.0.1) is that IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def is_public(address: IpAddress) -> bool:
    address = unmapped(address)
    return address.is_global and not address.is_multicast


def kind_of(address: IpAddress) -> str:
    for kind in ("unspecified", "loopback", "link_local", "private", "multicast", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return "non-public"


def final_url(url: str, allowlist: Allowlist, headers: Sequence[tuple[str, str]] = ()) -> str:
    """Follows redirects one hop at a time, checking each, and returns the URL that
    answers with content. Blocking (callers run it in a thread): the whole probe,
    every hop included, ends within PROBE_SECONDS, however slowly the host answers."""
    return asyncio.run(_final_url(url, allowlist, headers))


async def _final_url(url: str, allowlist: Allowlist, headers: Sequence[tuple[str, str]]) -> str:
    # An overall deadline, not per-read timeouts: a host dripping a byte every few
    # seconds kept the old probe (and the thread running it) for as long as it liked.
    try:
        async with asyncio.timeout(PROBE_SECONDS):
            return await _follow(url, allowlist, headers)
    except TimeoutError:
        raise UrlUnreachable(f"{url} did not answer within {PROBE_SECONDS:g} s") from None


async def _follow(url: str, allowlist: Allowlist, headers: Sequence[tuple[str, str]]) -> str:
    async with httpx.AsyncClient(timeout=PROBE_SECONDS) as client:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                # Never read: the status and headers are all the probe needs, so an
                # endless body costs nothing (closing drops the connection).
                response = await send_pinned(
                    client, "GET", url, allowlist, headers=[*headers, ("Range", "bytes=0-0")]
                )
                await response.aclose()
            except httpx.HTTPError as exc:
                raise UrlUnreachable(f"{url} did not answer: {exc}") from exc
            if response.is_redirect and "location" in response.headers:
                url = urljoin(url, response.headers["location"])
                continue
            if response.status_code >= 400:
                raise UrlUnreachable(f"{url} answered HTTP {response.status_code}")
            return url
    raise UrlUnreachable(f"more than {MAX_REDIRECTS} redirects from the URL given")
