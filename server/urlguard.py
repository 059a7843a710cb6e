"""Outbound requests to URLs users give us (URL sources, webhooks) must not reach the
farm's own network: loopback, private, link-local (cloud metadata at 169.254.169.254)
and other non-global addresses are refused unless an allow-list permits them.

Checked after DNS resolution (every address a name resolves to) and again on every
redirect. Imports only the standard library and httpx: workers use it too.
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


def check_url(url: str, allowlist: Allowlist) -> None:
    """Refuses URLs that are not http(s) or whose host resolves to a non-global address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UrlRefused(f"only http and https URLs are accepted, not {parts.scheme or 'none'!r}")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise UrlRefused(f"the URL {url!r} names no host")
    for address in resolve(host, parts.port or (443 if parts.scheme == "https" else 80)):
        if not is_public(address) and not allowlist.permits(host, address):
            shown = host if host == str(address) else f"{host} ({address})"
            raise UrlRefused(
                f"{shown} is a {kind_of(address)} address; this farm only fetches public "
                "addresses. To allow it, add it to SCRIBEFARM_URL_ALLOWLIST."
            )


def resolve(host: str, port: int) -> list[IpAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UrlUnreachable(f"cannot resolve {host}: {exc.strerror}") from exc
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def is_public(address: IpAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def kind_of(address: IpAddress) -> str:
    for kind in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
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
    async with httpx.AsyncClient(
        timeout=PROBE_SECONDS, follow_redirects=False, headers=list(headers)
    ) as client:
        for _ in range(MAX_REDIRECTS + 1):
            await asyncio.to_thread(check_url, url, allowlist)
            try:
                # Streamed and never read: the status and headers are all the probe needs,
                # so an endless body costs nothing (closing drops the connection).
                request = client.build_request("GET", url, headers={"Range": "bytes=0-0"})
                response = await client.send(request, stream=True)
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
