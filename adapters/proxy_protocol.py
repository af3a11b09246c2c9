"""HAProxy's PROXY protocol (v1 text, v2 binary) in front of the SSH server.

A load balancer that relays TCP hides the client's address: every connection
seems to come from the balancer. With the PROXY protocol the balancer starts
each connection with a header naming the client's address (haproxy's
``send-proxy`` / ``send-proxy-v2``). The protocol is specified in haproxy's
``doc/proxy-protocol.txt``; this module follows it strictly:

* `parse` is sans-I/O: bytes in, a `Header` (with how many bytes it took),
  None while more bytes are needed, or `HeaderError` saying what is wrong. A v1
  line is at most 107 bytes and ends in CRLF (a bare CR or LF is refused); its
  addresses and ports are canonical (no leading zeros). A v2 header is the
  12-byte signature, version 2, command LOCAL or PROXY, a known family and
  transport, and at most `V2_MAX_LENGTH` bytes of addresses and TLVs (the TLVs
  are skipped). LOCAL (the balancer's own health check), v1 ``UNKNOWN``, and the
  UNSPEC and UNIX families name no IP source: the connection keeps its real
  peer address.
* `Gate` is the asyncio protocol of one accepted connection, until asyncssh
  takes the transport over: `Listener` is the server's one accept path, with
  ``ssh.proxyProtocol`` on or off. Every connection is admitted (or refused) by
  the server core (`ServerCore.admit`: per-source limits and penalties, early
  drop, maxStartups) before asyncssh builds anything for it. A peer in
  ``trustedNetworks`` must send its header first; the gate reads it (bounded in
  size by the parser and in time by ``headerTimeout``) before asyncssh sends a
  byte, admission is decided for the header's source, and asyncssh then sees
  that source as the peer (``peername``). The bytes after the header are handed
  to asyncssh untouched. Any other peer is admitted under its own address at
  once and handed to asyncssh (a client may wait for the server's version line
  first); with ``ssh.proxyProtocol`` on the gate watches its first bytes, and a
  PROXY signature there (a peer trying to name another source) ends the
  connection. Once the first bytes are decided the transport talks to asyncssh
  directly (`asyncio.Transport.set_protocol`): no cost per packet after that.

What may happen when is the specs' (``proxy_connect``, ``proxy_header``,
``proxy_header_invalid`` in the server spec; ``untrusted_proxy_header`` in the
connection spec); the gate fires those events and carries out their replies.
Why a parser of our own: the one maintained-looking library (PyPI
``proxy-protocol``, last release 2024-04) parses leniently (v1 ports through
``int()``, which takes ``+22`` and ``0022``; no bound on a v1 line; a short v2
address block escapes as ``struct.error``) and is built around asyncio streams,
while asyncssh wants a protocol; the header is ~100 lines to parse strictly.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import re
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sshspec.adapters import asyncssh_internals as internals
from sshspec.fsm import core

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # bytes of the longest v1 line, CRLF included (the spec's worst case)
V2_MAX_LENGTH = 2048  # bytes of addresses and TLVs we accept after a v2 header's 16
_V2_FIXED = 16

_OCTET = r"(?:0|[1-9][0-9]{0,2})"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")  # the characters; ipaddress checks the rest
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}
_FAMILIES = {0x0: "UNSPEC", 0x1: "INET", 0x2: "INET6", 0x3: "UNIX"}
_TRANSPORTS = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
_ADDRESS_BYTES = {"INET": 12, "INET6": 36, "UNIX": 216}  # source, destination (and ports)


class HeaderError(ValueError):
    """Bytes that are not a valid PROXY protocol header; ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class Header:
    version: int  # 1 or 2
    # The client's (host, port) and the address it connected to, or None: the
    # header names no IP source (v2 LOCAL, v1 UNKNOWN, UNSPEC, UNIX), and the
    # connection keeps its real endpoints.
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int  # bytes of the stream the header took; what follows is the client's


def starts_with_signature(data: bytes) -> bool | None:
    """Whether `data` begins with a v1 or v2 signature; None: too short to tell."""
    undecided = False
    for signature in (V1_SIGNATURE, V2_SIGNATURE):
        n = min(len(data), len(signature))
        if data[:n] == signature[:n]:
            if len(data) >= len(signature):
                return True
            undecided = True
    return None if undecided else False


def parse(data: bytes) -> Header | None:
    """The header at the start of `data`; None if more bytes are needed."""
    if not data:
        return None
    if V2_SIGNATURE.startswith(data[:len(V2_SIGNATURE)]):
        return _parse_v2(data) if len(data) >= _V2_FIXED else None
    if V1_SIGNATURE.startswith(data[:len(V1_SIGNATURE)]):
        return _parse_v1(data) if len(data) >= len(V1_SIGNATURE) else None
    raise HeaderError(f"no PROXY protocol header: the peer sent {data[:24]!r} first")


def _parse_v1(data: bytes) -> Header | None:
    end = data.find(b"\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise HeaderError(f"v1 line without CRLF in its first {V1_MAX} bytes")
        return None
    if data[end - 1:end] != b"\r":
        raise HeaderError("v1 line ends in a bare LF, not CRLF")
    body = data[len(V1_SIGNATURE):end - 1]
    if not all(0x20 <= b < 0x7f for b in body):
        raise HeaderError(f"v1 line has a control or non-ASCII byte: {body!r}")
    parts = body.decode("ascii").split(" ")
    if parts[0] == "UNKNOWN":  # the rest of the line is ignored (the spec says so)
        return Header(1, None, None, end + 1)
    if parts[0] not in ("TCP4", "TCP6"):
        raise HeaderError(f"v1 protocol {parts[0]!r} is not TCP4, TCP6 or UNKNOWN")
    if len(parts) != 5:
        raise HeaderError(f"v1 line is not `PROXY {parts[0]} <source> <destination> <sport> <dport>` "
                          f"with single spaces: {body!r}")
    source, destination = (_v1_address(parts[0], text) for text in parts[1:3])
    sport, dport = (_v1_port(text) for text in parts[3:5])
    return Header(1, (source, sport), (destination, dport), end + 1)


def _v1_address(protocol: str, text: str) -> str:
    try:
        if protocol == "TCP4":
            if _IPV4.fullmatch(text) is None:
                raise ValueError
            return str(ipaddress.IPv4Address(text))
        if _IPV6.fullmatch(text) is None:  # no zone index, nothing but an address
            raise ValueError
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise HeaderError(f"v1 {protocol} address {text!r} is not a canonical "
                          f"{'IPv4' if protocol == 'TCP4' else 'IPv6'} address") from None


def _v1_port(text: str) -> int:
    if _PORT.fullmatch(text) is None or int(text) > 65535:
        raise HeaderError(f"v1 port {text!r} is not 0..65535 without leading zeros")
    return int(text)


def _parse_v2(data: bytes) -> Header | None:
    version, command = data[12] >> 4, _COMMANDS.get(data[12] & 0xF)
    family, transport = _FAMILIES.get(data[13] >> 4), _TRANSPORTS.get(data[13] & 0xF)
    length = int.from_bytes(data[14:16], "big")
    if version != 2:
        raise HeaderError(f"v2 header of version {version}, not 2")
    if command is None:
        raise HeaderError(f"v2 command {data[12] & 0xF:#x} is neither LOCAL nor PROXY")
    if family is None or transport is None:
        raise HeaderError(f"v2 family/transport byte {data[13]:#04x} is not one the protocol defines")
    if length > V2_MAX_LENGTH:
        raise HeaderError(f"v2 header announces {length} bytes of addresses and TLVs, "
                          f"more than the {V2_MAX_LENGTH} accepted")
    total = _V2_FIXED + length
    if len(data) < total:
        return None
    if command == "LOCAL" or family in ("UNSPEC", "UNIX"):
        # LOCAL: the balancer's own connection (a health check); its address block
        # is discarded. UNSPEC / UNIX: no IP address to name. Either way the
        # connection keeps its real endpoints.
        if family in _ADDRESS_BYTES and command == "PROXY" and length < _ADDRESS_BYTES[family]:
            raise HeaderError(f"v2 {family} header has {length} address bytes, "
                              f"fewer than {_ADDRESS_BYTES[family]}")
        return Header(2, None, None, total)
    if transport != "STREAM":
        raise HeaderError(f"v2 PROXY for a {transport} transport: this server relays TCP streams only")
    need = _ADDRESS_BYTES[family]
    if length < need:
        raise HeaderError(f"v2 {family} header has {length} address bytes, fewer than {need}")
    block = data[_V2_FIXED:_V2_FIXED + need]  # what follows (TLVs) is skipped
    size = 4 if family == "INET" else 16
    make = ipaddress.IPv4Address if family == "INET" else ipaddress.IPv6Address
    source, destination = str(make(block[:size])), str(make(block[size:2 * size]))
    sport = int.from_bytes(block[2 * size:2 * size + 2], "big")
    dport = int.from_bytes(block[2 * size + 2:2 * size + 4], "big")
    return Header(2, (source, sport), (destination, dport), total)


class TrustedNetworks:
    """The networks whose peers must (and alone may) send a PROXY header."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(n) for n in networks)

    def __contains__(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False  # not an IP peer (a UNIX socket): never trusted
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            # A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d: an IPv4 network covers them.
            candidates.append(address.ipv4_mapped)
        return any(a in net for a in candidates for net in self.networks)


def host_port(address: tuple[str, int]) -> str:
    """``127.0.0.1:22``: how log labels name an address (as SpecConnection labels its
    peer, IPv6 included, so one client has one remoteAddr in every record)."""
    return f"{address[0]}:{address[1]}"


# --- the gate: one accepted connection until asyncssh has it --------------------------------------


class _Phase(enum.Enum):
    reading = "reading"  # a trusted peer: its header is awaited, asyncssh has nothing yet
    watching = "watching"  # an untrusted peer: asyncssh has it; its first bytes are not decided yet
    refused = "refused"  # a refused header: the gate swallows what still arrives
    handed = "handed"  # asyncssh has the transport (set_protocol): the gate is out of the way
    cut = "cut"  # the server stopped listening while the header was awaited


class Listener:
    """The server's one accept path: what the gates of one listen socket share.
    Closing it stops accepting and cuts the connections still waiting for their
    header (the spec's stop_listening).

    ``trusted`` None: ssh.proxyProtocol is off, no peer sends a header and no first
    bytes are watched. ``admit(peer)`` is the server core's admission of a source
    (the peer's address, or the client a trusted header names): a refused
    connection is aborted before asyncssh builds anything for it."""

    def __init__(self, server_core: core.ServerCore, trusted: TrustedNetworks | None, timeout: float,
                 connection_factory: Callable[[], Any], admit: Callable[[Any], bool]) -> None:
        self.server_core = server_core
        self.trusted = trusted
        self.timeout = timeout
        self.connection_factory = connection_factory  # a new asyncssh server connection
        self.admit = admit
        self.pending: set[Gate] = set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self, sock: Any) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Gate(self), sock=sock)

    def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for gate in list(self.pending):
            gate.cut()

    async def wait_closed(self) -> None:
        assert self.server is not None
        await self.server.wait_closed()


class Gate(asyncio.Protocol):
    """One accepted connection on a PROXY-protocol listener (see the module doc)."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.phase = _Phase.reading
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.ssh: Any = None  # the asyncssh connection, once it has the transport
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio -> the gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = socket_transport = typing.cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer = host_port(peer)
        trusted = self.listener.trusted
        if trusted is None or peer[0] not in trusted:
            if not self.listener.admit(peer):  # refused (the server core logged why)
                self.phase = _Phase.refused
                socket_transport.abort()
                return
            watch = trusted is not None  # an untrusted peer's first bytes may not be a PROXY header
            self.phase = _Phase.watching if watch else _Phase.handed
            self._hand_over(None, None, watch=watch)
            return
        reply = self.listener.server_core.handle(core.ServerEvent.proxy_connect, remote_addr=self.peer)
        if reply is core.ServerReply.read_proxy_header:
            self.listener.pending.add(self)
            self.timer = asyncio.get_running_loop().call_later(self.listener.timeout, self._timed_out)
        else:  # refuse_connection (or a spec violation: fail closed)
            self.phase = _Phase.refused
            socket_transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.phase is _Phase.reading:
            self.buffer += data
            try:
                header = parse(self.buffer)
            except HeaderError as exc:
                self._invalid(str(exc))
                return
            if header is not None:
                self._header_read(header)
        elif self.phase is _Phase.watching:
            self.buffer += data
            verdict = starts_with_signature(self.buffer)
            if verdict is True:
                self._untrusted_header()
            elif verdict is False:
                held, self.buffer = self.buffer, b""
                self._pass_through()
                self.ssh.data_received(held)

    def eof_received(self) -> bool | None:
        if self.phase is _Phase.reading:
            self._invalid(f"the peer closed the connection before a complete PROXY header "
                          f"({len(self.buffer)} bytes received)")
        elif self.phase is _Phase.watching:
            held, self.buffer = self.buffer, b""
            self._pass_through()
            if held:
                self.ssh.data_received(held)
            return self.ssh.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase is _Phase.reading:
            self._invalid(f"the connection was lost before a complete PROXY header: {exc or 'closed'}")
        elif self.phase in (_Phase.watching, _Phase.refused) and self.ssh is not None:
            self.ssh.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.ssh is not None:
            self.ssh.pause_writing()

    def resume_writing(self) -> None:
        if self.ssh is not None:
            self.ssh.resume_writing()

    # -- the server spec's verdicts

    def _timed_out(self) -> None:
        self.timer = None
        if self.phase is _Phase.reading:
            self._invalid(f"no complete PROXY header within {self.listener.timeout:g}s "
                          f"({len(self.buffer)} bytes received)")

    def _stop_reading(self) -> None:
        self.listener.pending.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _invalid(self, reason: str) -> None:
        self._stop_reading()
        self.phase = _Phase.refused
        self.buffer = b""
        self.listener.server_core.handle(core.ServerEvent.proxy_header_invalid, reason=reason,
                                         remote_addr=self.peer)
        assert self.transport is not None
        self.transport.abort()  # refuse_connection in every state that has the event

    def _header_read(self, header: Header) -> None:
        self._stop_reading()
        rest, self.buffer = self.buffer[header.length:], b""
        kind = f"PROXY v{header.version} header from {self.peer}"
        source = host_port(header.source) if header.source is not None else self.peer
        reason = kind if header.source is not None else f"{kind}: the proxy's own connection, no client named"
        self.listener.server_core.handle(core.ServerEvent.proxy_header, reason=reason, remote_addr=source)
        assert self.transport is not None
        if not self.listener.admit(header.source or self.transport.get_extra_info("peername")):
            self.phase = _Phase.refused  # admission is the client's, under the header's source
            self.transport.abort()
            return
        self._hand_over(header.source, header.destination, watch=False)
        if rest and internals.connection_owner(self.ssh).admitted:
            self.ssh.data_received(rest)  # the client's first SSH bytes, as they came

    def cut(self) -> None:
        """The server stopped listening: a connection still awaiting its header goes."""
        self._stop_reading()
        self.phase = _Phase.cut
        if self.transport is not None:
            self.transport.abort()

    # -- asyncssh takes over

    def _hand_over(self, source: tuple[str, int] | None, destination: tuple[str, int] | None,
                   *, watch: bool) -> None:
        """Start asyncssh's connection on this transport: its owner's connection_made
        fires the server machine's accept with the peer asyncssh reports, which is
        the header's source when there is one."""
        assert self.transport is not None
        self.ssh = self.listener.connection_factory()
        if source is not None:
            # Public set_extra_info: asyncssh's get_extra_info, and its channels', read it first.
            self.ssh.set_extra_info(peername=source, sockname=destination)
        if not watch:
            self._pass_through()
        self.ssh.connection_made(self.transport)

    def _pass_through(self) -> None:
        assert self.transport is not None
        self.phase = _Phase.handed
        self.transport.set_protocol(self.ssh)

    def _untrusted_header(self) -> None:
        self.phase = _Phase.refused
        owner = internals.connection_owner(self.ssh)
        version = 1 if self.buffer.startswith(V1_SIGNATURE) else 2
        self.buffer = b""
        if owner is None or not owner.admitted:  # no machine to tell (asyncssh made no SSHServer)
            assert self.transport is not None
            self.transport.abort()
            return
        owner.handle(core.UntrustedProxyHeader(
            f"PROXY v{version} header from {self.peer}, which is not in ssh.proxyProtocol.trustedNetworks"))
