"""The URL guard's decisions (shared/urlguard.py) on addresses that need no DNS server:
IP literals resolve locally."""

from __future__ import annotations

import ipaddress

import pytest

from shared import urlguard

NONE = urlguard.Allowlist.parse([])


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1/a.wav", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://10.1.2.3/a.mp3", "private"),
        ("http://[::1]:8080/a.mp3", "loopback"),
        ("http://[::ffff:127.0.0.1]/a.mp3", "loopback"),  # IPv4 inside IPv6
        ("http://0.0.0.0/a.mp3", "unspecified"),
    ],
)
def test_non_public_addresses_are_refused_with_their_kind(url, kind):
    with pytest.raises(urlguard.UrlRefused) as refused:
        urlguard.check_url(url, NONE)
    assert kind in str(refused.value) and "SCRIBEFARM_URL_ALLOWLIST" in str(refused.value)


@pytest.mark.parametrize("url", ["ftp://8.8.8.8/a.mp3", "file:///etc/passwd", "data:,x", "x"])
def test_only_http_and_https_are_accepted(url):
    with pytest.raises(urlguard.UrlRefused, match="only http and https"):
        urlguard.check_url(url, NONE)


def test_public_addresses_pass_and_the_checked_one_is_returned():
    assert urlguard.check_url("https://8.8.8.8/a.mp3", NONE) == ipaddress.ip_address("8.8.8.8")


def test_the_allowlist_admits_networks_and_host_names():
    allow = urlguard.Allowlist.parse(["10.0.0.0/8", " nas.office. ", ""])
    assert urlguard.check_url("http://10.9.8.7/a.mp3", allow)
    with pytest.raises(urlguard.UrlRefused):
        urlguard.check_url("http://192.168.1.1/a.mp3", allow)
    assert allow.permits("nas.office", ipaddress.ip_address("192.168.1.5"))


def test_a_pinned_url_connects_to_the_checked_address_and_names_the_host():
    allow = urlguard.Allowlist.parse(["127.0.0.0/8", "::1"])
    pinned = urlguard.pin("https://user:pw@127.0.0.1:8443/a/b.mp3?x=1", allow)
    assert pinned == urlguard.Pinned(
        "https://user:pw@127.0.0.1:8443/a/b.mp3?x=1", "127.0.0.1:8443", "127.0.0.1"
    )
    six = urlguard.pin("http://[::1]/a.mp3", allow)
    assert six.url == "http://[::1]/a.mp3" and six.host_header == "[::1]"
