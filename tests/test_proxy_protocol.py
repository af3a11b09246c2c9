"""The PROXY protocol parser (adapters/proxy_protocol.py), without sockets: v1 and
v2 headers as haproxy's doc/proxy-protocol.txt defines them, and everything it
says a receiver must refuse. The live tests (real sockets, real haproxy) are in
tests/test_proxy_live.py."""

from __future__ import annotations

import ipaddress
import re
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshspec.adapters.proxy_protocol import (
    V1_MAX,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    Header,
    HeaderError,
    TrustedNetworks,
    host_port,
    parse,
    starts_with_signature,
)

SSH = b"SSH-2.0-OpenSSH_9.2p1\r\n"


def v2(command: int = 1, family: int = 1, transport: int = 1, body: bytes = b"", *,
       version: int = 2, length: int | None = None) -> bytes:
    """A v2 header: signature, version/command, family/transport, length, body."""
    size = len(body) if length is None else length
    return (V2_SIGNATURE + bytes([version << 4 | command, family << 4 | transport])
            + size.to_bytes(2, "big") + body)


def inet(source: str, destination: str, sport: int, dport: int) -> bytes:
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    return (socket.inet_pton(family, source) + socket.inet_pton(family, destination)
            + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))


# --- v1 -------------------------------------------------------------------------------------------


def test_v1_tcp4_and_what_follows_is_the_clients() -> None:
    line = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 22\r\n"
    header = parse(line + SSH)
    assert header == Header(1, ("203.0.113.7", 56324), ("192.0.2.1", 22), len(line))
    assert (line + SSH)[header.length:] == SSH


def test_v1_tcp6_is_normalised() -> None:
    line = b"PROXY TCP6 2001:DB8:0:0::7 ::1 65535 0\r\n"
    assert parse(line) == Header(1, ("2001:db8::7", 65535), ("::1", 0), len(line))


def test_v1_the_longest_line_the_spec_allows() -> None:
    ffff = ":".join(["ffff"] * 8)
    line = f"PROXY UNKNOWN {ffff} {ffff} 65535 65535\r\n".encode()
    assert len(line) == V1_MAX == 107
    assert parse(line) == Header(1, None, None, 107)


def test_v1_unknown_names_nobody() -> None:
    assert parse(b"PROXY UNKNOWN\r\n" + SSH) == Header(1, None, None, 15)


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 22\r",
    b"PROXY TCP4 203.0.113.7",
    b"PROXY ",
    b"PRO",
    b"P",
    b"",
])
def test_v1_incomplete_asks_for_more(line: bytes) -> None:
    assert parse(line) is None


@pytest.mark.parametrize(("line", "why"), [
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 22\n", "bare LF"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 22\r\r\n", "control or non-ASCII"),
    (b"PROXY TCP4 203.0.113.7  192.0.2.1 56324 22\r\n", "single spaces"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 56324\r\n", "single spaces"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 22 x\r\n", "single spaces"),
    (b"PROXY TCP4 203.0.113.07 192.0.2.1 56324 22\r\n", "not a canonical IPv4"),
    (b"PROXY TCP4 203.0.113.256 192.0.2.1 56324 22\r\n", "not a canonical IPv4"),
    (b"PROXY TCP4 ::1 192.0.2.1 56324 22\r\n", "not a canonical IPv4"),
    (b"PROXY TCP6 203.0.113.7 ::1 56324 22\r\n", "not a canonical IPv6"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 56324 22\r\n", "not a canonical IPv6"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 056324 22\r\n", "leading zeros"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 +5632 22\r\n", "leading zeros"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 22\r\n", "0..65535"),
    (b"PROXY UDP4 203.0.113.7 192.0.2.1 1 22\r\n", "not TCP4, TCP6 or UNKNOWN"),
    (b"PROXY tcp4 203.0.113.7 192.0.2.1 1 22\r\n", "not TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 1 \xc3\xa9\r\n", "non-ASCII"),
    (b"PROXY TCP4 " + b"1" * 120, "without CRLF in its first 107 bytes"),
    (b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n", "without CRLF in its first 107 bytes"),
    (SSH, "no PROXY protocol header: the peer sent b'SSH-2.0-OpenSSH_9.2p1\\r\\n' first"),
    (b"PROXY\tTCP4", "no PROXY protocol header"),
    (b"\r\n\r\nGET", "no PROXY protocol header"),
])
def test_v1_refused(line: bytes, why: str) -> None:
    with pytest.raises(HeaderError, match=re.escape(why)):
        parse(line)


def test_a_header_too_long_is_refused_at_its_bound_not_later() -> None:
    with pytest.raises(HeaderError, match="107"):
        parse(b"PROXY TCP4 " + b"1" * (V1_MAX - 11))
    assert parse(b"PROXY TCP4 " + b"1" * (V1_MAX - 12)) is None


# --- v2 -------------------------------------------------------------------------------------------


def test_v2_ipv4_with_tlvs_skipped() -> None:
    tlvs = b"\x05\x00\x04abcd" + b"\x04\x00\x00"  # UNIQUE_ID, NOOP
    header = v2(body=inet("203.0.113.7", "192.0.2.1", 56324, 22) + tlvs)
    assert parse(header + SSH) == Header(2, ("203.0.113.7", 56324), ("192.0.2.1", 22), len(header))


def test_v2_ipv6() -> None:
    header = v2(family=2, body=inet("2001:db8::7", "::1", 1, 65535))
    assert len(header) == 16 + 36
    assert parse(header) == Header(2, ("2001:db8::7", 1), ("::1", 65535), 52)


def test_v2_local_keeps_the_real_peer_and_discards_its_block() -> None:
    assert parse(v2(command=0, family=0, transport=0) + SSH) == Header(2, None, None, 16)
    # "must not assume zero is presented for LOCAL connections": a block is skipped.
    header = v2(command=0, family=1, body=inet("10.0.0.1", "10.0.0.2", 1, 2))
    assert parse(header + SSH) == Header(2, None, None, 28)


@pytest.mark.parametrize(("family", "size"), [(0, 0), (0, 7), (3, 216)])
def test_v2_unspec_and_unix_name_no_ip_source(family: int, size: int) -> None:
    assert parse(v2(family=family, body=bytes(size))) == Header(2, None, None, 16 + size)


def test_v2_incomplete_asks_for_more() -> None:
    header = v2(body=inet("203.0.113.7", "192.0.2.1", 1, 22))
    for n in range(len(header)):
        assert parse(header[:n]) is None, n
    assert parse(header) is not None


@pytest.mark.parametrize(("data", "why"), [
    (v2(version=1, body=bytes(12)), "version 1, not 2"),
    (v2(version=3, body=bytes(12)), "version 3, not 2"),
    (v2(command=2, body=bytes(12)), "command 0x2 is neither LOCAL nor PROXY"),
    (v2(command=0xF, body=bytes(12)), "neither LOCAL nor PROXY"),
    (v2(family=4, body=bytes(12)), "family/transport byte 0x41"),
    (v2(transport=3, body=bytes(12)), "family/transport byte 0x13"),
    (v2(transport=2, body=bytes(12)), "DGRAM transport"),
    (v2(transport=0, body=bytes(12)), "UNSPEC transport"),
    (v2(body=bytes(11)), "INET header has 11 address bytes, fewer than 12"),
    (v2(family=2, body=bytes(12)), "INET6 header has 12 address bytes, fewer than 36"),
    (v2(family=3, body=bytes(100)), "UNIX header has 100 address bytes, fewer than 216"),
    (v2(length=V2_MAX_LENGTH + 1), f"announces {V2_MAX_LENGTH + 1} bytes"),
    (v2(length=0xFFFF), "announces 65535 bytes"),
    (V2_SIGNATURE[:7] + b"XUIT\n" + bytes(4), "no PROXY protocol header"),
])
def test_v2_refused(data: bytes, why: str) -> None:
    with pytest.raises(HeaderError, match=why):
        parse(data)


def test_v2_oversized_is_refused_from_the_16_bytes_alone() -> None:
    """The announced length is checked before waiting for it: a peer cannot make
    the server wait for (and buffer) 64 KiB."""
    with pytest.raises(HeaderError, match="more than the 2048 accepted"):
        parse(v2(length=V2_MAX_LENGTH + 1))
    assert parse(v2(length=V2_MAX_LENGTH)) is None


# --- properties -----------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.tuples(st.just("TCP4"), ipv4, ipv4), st.tuples(st.just("TCP6"), ipv6, ipv6)),
       ports, ports, st.binary(max_size=40))
def test_any_v1_header_round_trips(addresses: tuple[str, str, str], sport: int, dport: int,
                                   after: bytes) -> None:
    protocol, source, destination = addresses
    line = f"PROXY {protocol} {source} {destination} {sport} {dport}\r\n".encode()
    assert len(line) <= V1_MAX
    header = parse(line + after)
    assert header == Header(1, (source, sport), (destination, dport), len(line))
    assert all(parse(line[:n]) is None for n in range(len(line)))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.tuples(st.just(1), ipv4, ipv4), st.tuples(st.just(2), ipv6, ipv6)),
       ports, ports, st.binary(max_size=200), st.binary(max_size=40))
def test_any_v2_header_round_trips(addresses: tuple[int, str, str], sport: int, dport: int,
                                   tlvs: bytes, after: bytes) -> None:
    family, source, destination = addresses
    header = v2(family=family, body=inet(source, destination, sport, dport) + tlvs)
    parsed = parse(header + after)
    assert parsed == Header(2, (source, sport), (destination, dport), len(header))
    assert parse(header[:-1]) is None


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=120).map(lambda b: b"PROXY " + b),
                 st.binary(max_size=120).map(lambda b: V2_SIGNATURE + b)))
def test_any_bytes_are_a_header_a_refusal_or_a_bounded_wait(data: bytes) -> None:
    """Nothing but HeaderError escapes, and "more, please" is only said while the
    bytes could still become a header within its bound."""
    try:
        header = parse(data)
    except HeaderError:
        return
    if header is None:
        bound = V1_MAX if data.startswith(b"P") else 16 + V2_MAX_LENGTH
        assert len(data) < bound
    else:
        assert 15 <= header.length <= len(data)
        for address in (header.source, header.destination):
            if address is not None:
                ipaddress.ip_address(address[0])
                assert 0 <= address[1] <= 65535


# --- signatures, trust, labels --------------------------------------------------------------------


@pytest.mark.parametrize(("data", "verdict"), [
    (b"", None), (b"P", None), (b"PROXY", None), (b"PROXY ", True), (b"PROXY TCP4", True),
    (b"\r", None), (b"\r\n\r\n\x00\r\nQUI", None), (V2_SIGNATURE, True),
    (b"S", False), (SSH, False), (b"PROXZ", False), (b"\r\n\r\n\x01", False), (b"\n", False),
])
def test_starts_with_signature(data: bytes, verdict: bool | None) -> None:
    assert starts_with_signature(data) is verdict


def test_trusted_networks() -> None:
    trusted = TrustedNetworks(["127.0.0.3/32", "10.0.0.0/8", "2001:db8::/32"])
    assert "127.0.0.3" in trusted and "10.1.2.3" in trusted and "2001:db8::1" in trusted
    assert "127.0.0.2" not in trusted and "2001:db9::1" not in trusted and "::1" not in trusted
    # A dual-stack listener sees IPv4 peers as IPv4-mapped IPv6 addresses.
    assert "::ffff:10.9.9.9" in trusted and "::ffff:127.0.0.2" not in trusted
    assert "fe80::1%lo" not in trusted and "2001:db8::1%lo" in trusted
    assert "" not in trusted and "?" not in trusted and "/run/sshspec.sock" not in trusted


def test_host_port() -> None:
    assert host_port(("203.0.113.7", 22)) == "203.0.113.7:22"
    assert host_port(("2001:db8::7", 22, 0, 0)) == "2001:db8::7:22"  # type: ignore[arg-type]
