"""Every reach-in into asyncssh's private internals lives in this module.

The rule: no other sshspec file touches an underscore attribute of an asyncssh
object, monkeypatches asyncssh, or relies on undocumented asyncssh behaviour.  If
the adapter needs something asyncssh hides, it is added here, listed in
`REACH_INS` (verified by `check_asyncssh_compat`) and explained in HACKS.md.
Vetted against asyncssh >=2.24.1,<2.25 by tests/test_asyncssh_internals.py.

What the module gives the adapter:

* `HookedServerChannel` - a session channel that hands EVERY incoming
  SSH_MSG_CHANNEL_REQUEST (known, unknown, malformed) to one callback, at
  arrival, so a malformed request never costs the channel or the connection;
  `reply(ok)` answers (returning why it could not), `start_io()` lets data flow
  once a program started.  Which request is answered when is the caller's.
  `decode_request` turns a request's payload into a typed record (read by
  asyncssh's own packet decoder) and raises `RequestDecodeError` on anything
  malformed.
* `ConnectionHooks` + `install_hooks(conn, hooks)` (call it from
  `SSHServer.connection_made`) - per-connection callbacks for every global
  request, every channel open, every SERVICE_REQUEST, every USERAUTH_REQUEST and
  every answer asyncssh gives to one (failure / success / PK_OK / INFO_REQUEST
  ...), and every completed key exchange.
* `ConnectionHooks.on_certificate` - every OpenSSH user certificate a publickey
  request offers (query or signed), decoded (`UserCertificate`: the CA, the CA's
  signature algorithm, principals, validity, critical options), for the hook to
  decide alone: asyncssh's own checks (CA trust via `validate_ca_key`, validity,
  principals, source-address) would refuse silently, without a reason to log.
* `send_keepalive(conn)` - server-initiated keepalive@openssh.com with the
  outcome (answered / closed / timeout).
* `is_login_timeout(exc)` - recognises asyncssh's login timeout in
  `connection_lost`.
* `DecompressionLimitError` - what `connection_lost` gets when a compressed
  packet inflated past `MAX_DECOMPRESSED` (`install_hooks` bounds asyncssh's zlib,
  which has no bound of its own).
* `connection_factory(**options)` / `connection_owner(conn)` - make asyncssh
  server connections for transports accepted elsewhere (the server's own
  listener, `adapters/proxy_protocol.Listener`, decides admission and reads a
  PROXY header before asyncssh may see the socket), and find the `SSHServer`
  each one made.
* `check_asyncssh_compat()` / `assert_asyncssh_compat()` - verify that the
  installed asyncssh still has every private thing used here.

Lines that touch a private are marked `# REACH-IN`; HACKS.md explains each one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import hmac
import inspect
import os
import struct
import time
import weakref
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias, cast

import asyncssh
import asyncssh.compression
import asyncssh.crypto.umac
import asyncssh.mac
import asyncssh.public_key
from asyncssh.channel import SSHChannel
from asyncssh.connection import SSHConnection
from asyncssh.constants import (
    MSG_CHANNEL_EXTENDED_DATA,
    MSG_CHANNEL_FIRST,
    MSG_CHANNEL_LAST,
    MSG_DEBUG,
    MSG_IGNORE,
    MSG_KEX_FIRST,
    MSG_KEX_LAST,
    MSG_SERVICE_ACCEPT,
    MSG_UNIMPLEMENTED,
    MSG_USERAUTH_BANNER,
    MSG_USERAUTH_FIRST,
    MSG_USERAUTH_LAST,
)
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import BasicEncryption, ETMEncryption, GCMEncryption
from asyncssh.logging import SSHLogger
from asyncssh.misc import map_handler_name
from asyncssh.packet import Byte, PacketDecodeError, SSHPacket, SSHPacketHandler, String, UInt32
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "ASYNCSSH_DEFAULT",
    "AsyncsshCompatError",
    "AuthRequest",
    "AuthResult",
    "UserCertificate",
    "BreakRequest",
    "ChannelOpenRequest",
    "ChannelRequest",
    "ConnectionHooks",
    "DecompressionLimitError",
    "Default",
    "DirectTcpip",
    "EnvRequest",
    "ExecRequest",
    "GlobalRequest",
    "HookState",
    "HookedServerChannel",
    "KeepaliveResult",
    "MAX_DECOMPRESSED",
    "NoArgsRequest",
    "PtyRequest",
    "PublicKeyInfo",
    "REACH_INS",
    "ReachIn",
    "ReplyFailure",
    "RequestDecodeError",
    "SignalRequest",
    "SubsystemRequest",
    "WindowChange",
    "X11Request",
    "assert_asyncssh_compat",
    "check_asyncssh_compat",
    "connection_factory",
    "connection_gone",
    "connection_owner",
    "decode_direct_tcpip",
    "decode_tcpip_forward",
    "open_agent_channel",
    "decode_request",
    "guess_is_wrong",
    "install_hooks",
    "is_login_timeout",
    "send_keepalive",
    "send_now",
    "when_send_fails",
]

SUPPORTED_ASYNCSSH = ((2, 24, 1), (2, 25, 0))  # [low, high)

# RFC 4250 message numbers (fixed by the protocol, not by asyncssh).
MSG_DISCONNECT = 1
MSG_SERVICE_REQUEST = 5
MSG_KEXINIT = 20
MSG_NEWKEYS = 21
MSG_USERAUTH_REQUEST = 50
MSG_USERAUTH_PK_OK = 60  # (60 is also INFO_REQUEST and PASSWD_CHANGEREQ: by method)
MSG_GLOBAL_REQUEST = 80
MSG_REQUEST_SUCCESS = 81
MSG_REQUEST_FAILURE = 82
MSG_CHANNEL_OPEN = 90
MSG_CHANNEL_WINDOW_ADJUST = 93
MSG_CHANNEL_DATA = 94
MAX_WINDOW = 0xFFFFFFFF  # RFC 4254 5.2: a window never exceeds 2^32 - 1 bytes
MSG_CHANNEL_EOF = 96
MSG_CHANNEL_CLOSE = 97
MSG_CHANNEL_REQUEST = 98
MSG_CHANNEL_SUCCESS = 99
MSG_CHANNEL_FAILURE = 100

DEFAULT_WINDOW = 2 * 1024 * 1024  # asyncssh's default receive window
DEFAULT_MAX_PKTSIZE = 32768  # asyncssh's default (and our maximum) packet size
# The most a compressed packet's payload may inflate to: the 256 KiB a packet may
# have on the wire (OpenSSH's PACKET_MAX_SIZE in packet.c; asyncssh's
# _DEFAULT_RECV_PKTLEN, which our 32 KiB channel packets never raise), so compression
# lets no client make the server hold a packet it could not have sent uncompressed.
# (OpenSSH inflates into an sshbuf, whose only bound is SSHBUF_SIZE_MAX, 128 MiB.)
MAX_DECOMPRESSED = 256 * 1024

_RECV_OPEN = frozenset({"open", "eof_pending", "eof"})  # SSHChannel._recv_state values
_RECV_EOF = frozenset({"eof_pending", "eof"})  # the client sent EOF (held until the program starts, or not)
_SEND_CLOSING = frozenset({"close_pending", "closed"})  # SSHChannel._send_state values
_LOGIN_TIMEOUT_REASON = "Login timeout expired"  # SSHConnection._login_timer_callback


class DecompressionLimitError(asyncssh.ProtocolError):
    """A compressed packet inflated past `MAX_DECOMPRESSED` bytes. A ProtocolError:
    asyncssh answers it with DISCONNECT 2 (protocol error) and closes, and
    `connection_lost` receives it."""


class Default(enum.Enum):
    """Verdict meaning "do what stock asyncssh would do"."""

    ASYNCSSH = "asyncssh"


ASYNCSSH_DEFAULT = Default.ASYNCSSH


# --------------------------------------------------------------------------- records


class RequestDecodeError(ValueError):
    """A request payload (or header) is malformed: truncated, trailing bytes, bad text."""

    def __init__(self, request_type: str, reason: str) -> None:
        super().__init__(f"{request_type}: {reason}")
        self.request_type = request_type
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ChannelRequest:
    """One SSH_MSG_CHANNEL_REQUEST as received.

    `type` is None when the name is not ASCII; `malformed` then says why (also set
    when the header is truncated; want_reply is then False: we cannot know it, and
    an unsolicited reply would desynchronise the client).  `payload` is the raw
    type-specific data after want_reply.
    """

    seq: int
    type: str | None
    raw_type: bytes
    want_reply: bool
    payload: bytes
    malformed: str | None = None


@dataclass(frozen=True, slots=True)
class GlobalRequest:
    """One SSH_MSG_GLOBAL_REQUEST as received (same conventions as ChannelRequest)."""

    seq: int
    name: str | None
    raw_name: bytes
    want_reply: bool
    payload: bytes
    malformed: str | None = None


@dataclass(frozen=True, slots=True)
class ChannelOpenRequest:
    """One SSH_MSG_CHANNEL_OPEN as received.

    `sender_channel` is None when the packet is too short to contain it (then no
    reply is possible and asyncssh's rule applies: disconnect, protocol error).
    """

    seq: int
    type: str | None
    raw_type: bytes
    sender_channel: int | None
    initial_window: int
    max_packet: int
    payload: bytes
    malformed: str | None = None


@dataclass(frozen=True, slots=True)
class PublicKeyInfo:
    """The publickey part of a USERAUTH_REQUEST."""

    algorithm: str | None
    key_blob: bytes
    signed: bool  # False: the query step ("would you accept this key?")

    @property
    def is_query(self) -> bool:
        return not self.signed


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """One SSH_MSG_USERAUTH_REQUEST as received, before asyncssh acts on it.

    `payload` is the method-specific data, except for "password" where it is
    always b"" (never carry a password around).  `malformed` is set when the packet
    could not be fully parsed; asyncssh will then disconnect (see HACKS.md).
    """

    seq: int
    username: str | None
    raw_username: bytes
    service: str | None
    method: str | None
    raw_method: bytes
    payload: bytes
    publickey: PublicKeyInfo | None = None
    password_change: bool | None = None
    malformed: str | None = None


AuthResultKind = Literal[
    "failure",  # USERAUTH_FAILURE (also for unknown / unsupported methods)
    "success",  # USERAUTH_SUCCESS
    "pk_ok",  # USERAUTH_PK_OK: answer to a publickey query
    "info_request",  # keyboard-interactive challenge (USERAUTH_INFO_REQUEST)
    "password_change_required",  # USERAUTH_PASSWD_CHANGEREQ
    "method_message",  # any other method-specific message (gssapi)
    "superseded",  # asyncssh cancelled this request when a newer one came: no answer
]


@dataclass(frozen=True, slots=True)
class UserCertificate:
    """What an OpenSSH user certificate says (asyncssh decoded it and verified the
    CA's signature on it)."""

    ca: bytes  # the signing CA's public key blob
    signature_algorithm: str  # of the CA's signature (ssh-rsa: SHA-1)
    key_id: str
    serial: int
    principals: tuple[str, ...]
    valid_after: int  # seconds since the epoch
    valid_before: int
    source_addresses: tuple[str, ...]  # the source-address critical option (CIDRs)
    force_command: str | None  # the force-command critical option
    permit_pty: bool = True  # the permit-pty extension
    permit_port_forwarding: bool = True  # the permit-port-forwarding extension
    permit_agent_forwarding: bool = True  # the permit-agent-forwarding extension


def user_certificate(cert: Any) -> UserCertificate:
    """The facts of an `asyncssh.public_key.SSHOpenSSHCertificate` (ValueError if its signature
    cannot be read)."""
    options = cert.options
    return UserCertificate(
        ca=cert.signing_key.public_data,
        signature_algorithm=certificate_signature_algorithm(cert),
        # REACH-IN: the key id, serial and validity interval are kept in private
        # attributes (SSHOpenSSHCertificate.__init__); asyncssh's validate() compares
        # them with the clock but says only "expired" or "not yet valid".
        key_id=cert._key_id,
        serial=cert._serial,
        principals=tuple(cert.principals),
        valid_after=cert._valid_after,
        valid_before=cert._valid_before,
        source_addresses=tuple(str(n) for n in options.get("source-address") or ()),
        force_command=options.get("force-command"),
        permit_pty=bool(options.get("permit-pty")),
        permit_port_forwarding=bool(options.get("permit-port-forwarding")),
        permit_agent_forwarding=bool(options.get("permit-agent-forwarding")),
    )


def certificate_signature_algorithm(cert: Any) -> str:
    """The algorithm of the CA's signature on an OpenSSH certificate. asyncssh checks
    the signature but keeps no record of its algorithm: the certificate's wire form
    ends with the CA's key blob and then the signature (string algorithm, string
    bytes), PROTOCOL.certkeys; read that tail with asyncssh's own packet decoder."""
    blob: bytes = cert.public_data
    ca = String(cert.signing_key.public_data)
    at = blob.rfind(ca)
    if at < 0:
        raise ValueError("certificate: the CA key is not where PROTOCOL.certkeys puts it")
    try:
        tail = SSHPacket(blob[at + len(ca):])
        signature = SSHPacket(tail.get_string())
        tail.check_end()
        return signature.get_string().decode("ascii")
    except (PacketDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"certificate: unreadable signature ({exc})") from None


async def _validate_certificate(state: HookState, default: Callable[..., Awaitable[Any]],
                                username: str, cert: Any) -> Any:
    """SSHServerConnection._validate_openssh_certificate, with the decision handed to
    `on_certificate`: the certified key if it may sign, else None (asyncssh then
    answers the request with a failure)."""
    conn = state.conn
    try:
        info = user_certificate(cert)
    except ValueError:
        return None
    verdict = _call_hook("on_certificate", state.hooks.on_certificate, conn, username, info)
    if verdict is ASYNCSSH_DEFAULT:
        return await default(username, cert)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    if verdict is not True:
        return None
    # REACH-IN: what asyncssh's own method sets on success: no authorized_keys options,
    # the certificate's options (get_certificate_option), touch required for a
    # security key (no authorized_keys no-touch-required option can waive it).
    conn._key_options = {}
    conn._cert_options = cert.options
    cert.key.set_touch_required(True)
    return cert.key


@dataclass(frozen=True, slots=True)
class AuthResult:
    """An answer asyncssh is about to send for `request` (None only if none was seen)."""

    request: AuthRequest | None
    kind: AuthResultKind
    partial_success: bool = False
    msg_type: int | None = None


@dataclass(frozen=True, slots=True)
class ReplyFailure:
    """A reply the server owed could not be sent.

    `request` is None for replies to overflowed requests (not kept, by design).
    `reason` is "channel closed", "connection closed" or "send failed" (then
    `error` is the exception if the send raised, None if asyncio swallowed it).
    """

    request: ChannelRequest | GlobalRequest | None
    reason: str
    error: BaseException | None = None


# --------------------------------------------------------------------------- decoding
#
# asyncssh's SSHPacket (asyncssh.packet, see REACH_INS) reads every field.  Its
# errors say only "Incomplete packet" / "Unexpected data at end of packet"; `_read`
# turns them into ours, which name the field ("truncated rows", "truncated value
# length", "name is not utf-8", "4 trailing byte(s)"): the log's reason shows them.

_U32, _BOOL, _BYTES = "uint32", "boolean", "bytes"  # field kinds; any other is a text encoding
_Field: TypeAlias = tuple[str, str]  # (field name, kind)


def _read(what: str, packet: SSHPacket, *fields: _Field, end: bool = True) -> list[Any]:
    """The values of `fields`, read in order from `packet`; with `end`, nothing may follow.

    Kinds: _U32, _BOOL, _BYTES (a string), or an encoding ("utf-8", "ascii") for a
    string that must decode.  Raises RequestDecodeError(what, reason) naming the field.
    """
    values: list[Any] = []
    for name, kind in fields:
        part = name
        try:
            if kind == _U32:
                values.append(packet.get_uint32())
            elif kind == _BOOL:
                values.append(packet.get_boolean())
            else:  # get_string, in two steps to tell a cut length from a cut body
                part = f"{name} length"
                size = packet.get_uint32()
                part = name
                raw = packet.get_bytes(size)
                values.append(raw if kind == _BYTES else raw.decode(kind))
        except PacketDecodeError:
            raise RequestDecodeError(what, f"truncated {part}") from None
        except UnicodeDecodeError:
            raise RequestDecodeError(what, f"{name} is not {kind}") from None
    if end:
        try:
            packet.check_end()
        except PacketDecodeError:
            extra = len(packet.get_remaining_payload())
            raise RequestDecodeError(what, f"{extra} trailing byte(s)") from None
    return values


def _ascii(raw: bytes) -> str | None:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


def _parse_request_header(payload: bytes) -> tuple[bytes, str | None, bool, bytes, str | None]:
    """(raw name, name, want_reply, rest, malformed) for channel and global requests."""
    packet = SSHPacket(payload)
    try:
        raw = packet.get_string()
    except PacketDecodeError:
        return b"", None, False, payload, "truncated request name"
    name = _ascii(raw)
    try:
        want_reply = packet.get_boolean()
    except PacketDecodeError:
        return raw, name, False, b"", "missing want_reply"
    rest = packet.get_remaining_payload()
    return raw, name, want_reply, rest, None if name is not None else "name is not ASCII"


@dataclass(frozen=True, slots=True)
class EnvRequest:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class PtyRequest:
    term: str
    cols: int
    rows: int
    width_px: int
    height_px: int
    modes: Mapping[int, int]  # opcode -> value (RFC 4254 section 8)


@dataclass(frozen=True, slots=True)
class ExecRequest:
    command: str


@dataclass(frozen=True, slots=True)
class SubsystemRequest:
    name: str


@dataclass(frozen=True, slots=True)
class WindowChange:
    cols: int
    rows: int
    width_px: int
    height_px: int


@dataclass(frozen=True, slots=True)
class SignalRequest:
    name: str  # without "SIG", e.g. "INT"


@dataclass(frozen=True, slots=True)
class BreakRequest:
    length_ms: int


@dataclass(frozen=True, slots=True)
class X11Request:
    single_connection: bool
    auth_protocol: str
    auth_cookie: str
    screen: int


@dataclass(frozen=True, slots=True)
class NoArgsRequest:
    """shell, auth-agent-req@openssh.com, keepalive@openssh.com: no payload."""

    type: str


DecodedRequest: TypeAlias = (
    EnvRequest
    | PtyRequest
    | ExecRequest
    | SubsystemRequest
    | WindowChange
    | SignalRequest
    | BreakRequest
    | X11Request
    | NoArgsRequest
)


def _pty_request(term: str, cols: int, rows: int, width_px: int, height_px: int,
                 blob: bytes) -> PtyRequest:
    modes: dict[int, int] = {}
    packet = SSHPacket(blob)
    while packet:
        opcode = packet.get_byte()
        if opcode == 0 or opcode >= 160:  # TTY_OP_END, or undefined: parsing stops
            break
        [modes[opcode]] = _read("pty-req", packet, (f"value of terminal mode {opcode}", _U32),
                                end=False)
    return PtyRequest(term, cols, rows, width_px, height_px, modes)


_SIZE = (("columns", _U32), ("rows", _U32), ("width px", _U32), ("height px", _U32))

# request type -> (record, its fields in wire order)
_DECODERS: Mapping[str, tuple[Callable[..., DecodedRequest], tuple[_Field, ...]]] = {
    "env": (EnvRequest, (("name", "utf-8"), ("value", "utf-8"))),
    "pty-req": (_pty_request, (("TERM", "ascii"), *_SIZE, ("modes", _BYTES))),
    "shell": (functools.partial(NoArgsRequest, "shell"), ()),
    "exec": (ExecRequest, (("command", "utf-8"),)),
    "subsystem": (SubsystemRequest, (("name", "utf-8"),)),
    "window-change": (WindowChange, _SIZE),
    "signal": (SignalRequest, (("signal name", "ascii"),)),
    "break": (BreakRequest, (("break length", _U32),)),
    "x11-req": (X11Request, (("single connection", _BOOL), ("auth protocol", "ascii"),
                             ("auth cookie", "ascii"), ("screen", _U32))),
    "auth-agent-req@openssh.com": (functools.partial(NoArgsRequest,
                                                     "auth-agent-req@openssh.com"), ()),
    "keepalive@openssh.com": (functools.partial(NoArgsRequest, "keepalive@openssh.com"), ()),
}


def decode_request(req: ChannelRequest) -> DecodedRequest | None:
    """Typed payload of a standard request; None for types we have no decoder for.

    Raises RequestDecodeError if the header or the payload is malformed.
    """
    if req.malformed is not None or req.type is None:
        raise RequestDecodeError(req.type or repr(req.raw_type), req.malformed or "bad name")
    decoder = _DECODERS.get(req.type)
    if decoder is None:
        return None
    record, fields = decoder
    return record(*_read(req.type, SSHPacket(req.payload), *fields))


# --------------------------------------------------------------------------- helpers


def _transport_gone(conn: SSHConnection) -> bool:
    transport = conn._transport  # REACH-IN: SSHConnection._transport (None once closing)
    return transport is None or transport.is_closing()


def _report_hook_error(where: str, exc: BaseException) -> None:
    """Adapter callbacks must not raise; if one does, make it loud but keep the protocol sane."""
    asyncio.get_running_loop().call_exception_handler(
        {"message": f"sshspec hook {where} raised; treated as a refusal", "exception": exc}
    )


# --------------------------------------------------------------------------- channel

RequestCallback: TypeAlias = Callable[["HookedServerChannel", ChannelRequest], None]
DataAfterEofCallback: TypeAlias = Callable[["HookedServerChannel", int], None]


_NO_SEALER: tuple[Any, Any] = (None, None)  # HookedServerChannel._hk_sealer until one is kept
# A sealer: (a flush entry's view, its packets' (start, end) cuts, datatype) -> packets sealed
Sealer: TypeAlias = Callable[[memoryview, list[tuple[int, int]], "int | None"], int]
_DATA_TYPE_NAMES = asyncssh.channel._data_type_names  # REACH-IN (row 35): write's log text
_CHAN_CLOSE = asyncssh.SSHServerChannel._packet_handlers[MSG_CHANNEL_CLOSE]
_CHAN_WINDOW_ADJUST = asyncssh.SSHServerChannel._packet_handlers[MSG_CHANNEL_WINDOW_ADJUST]
_CHAN_DATA = asyncssh.SSHServerChannel._packet_handlers[MSG_CHANNEL_DATA]


def _no_request(chan: HookedServerChannel, req: ChannelRequest) -> None:
    """A released channel's request callback (none can come: the channel is closed)."""


class HookedServerChannel(asyncssh.SSHServerChannel[bytes]):
    """A session channel whose every incoming channel request goes to `on_request`,
    at arrival, and is answered only by `reply`.

    Create it in `ConnectionHooks.on_channel_open` (or `SSHServer.session_requested`)
    and return `(channel, session)`.  asyncssh's own request handlers (env, pty,
    exec, ... and the SSHServerSession *_requested callbacks) are NOT used, and
    nothing here decides: which request is answered when, and how, is the
    caller's (sshspec's core keeps the queue and the order).

    * `on_request(chan, req)`: every CHANNEL_REQUEST, in arrival order, the header
      decoded (`req.malformed` says why it could not be).
    * `reply(ok)` sends CHANNEL_SUCCESS / CHANNEL_FAILURE and returns None, or the
      reason it could not: "channel closed", "connection closed", "send failed".
    * `start_io()`: a program started; asyncssh holds channel data and EOF until
      then (as it does for its own sessions), and delivers them from now on.
    * `on_data_after_eof(chan, size)`: CHANNEL_DATA after the client's EOF, which
      asyncssh answers with a protocol error (the whole connection ends); it is
      dropped instead, as OpenSSH drops it, and reported here.
    * Data, EOF, close: the ordinary asyncssh API (`write`, `write_eof`, `exit`,
      `exit_with_signal`, `close`; the session's `data_received`, `eof_received`,
      `connection_lost`, `pause_writing`, `resume_writing`).
    """

    def __init__(
        self,
        conn: asyncssh.SSHServerConnection,
        on_request: RequestCallback,
        *,
        on_data_after_eof: DataAfterEofCallback | None = None,
        window: int = DEFAULT_WINDOW,
        max_pktsize: int = DEFAULT_MAX_PKTSIZE,
    ) -> None:
        if not 0 < max_pktsize <= DEFAULT_MAX_PKTSIZE:
            # Larger packets would need SSHConnection._update_recv_pktlen (another reach-in).
            raise ValueError(f"max_pktsize must be in 1..{DEFAULT_MAX_PKTSIZE}")
        # REACH-IN: SSHServerChannel.__init__ positional signature (undocumented).
        # allow_pty is irrelevant (asyncssh's pty handler is bypassed); no line editor.
        super().__init__(conn, asyncio.get_running_loop(), True, False, False, 0, 1024,
                         None, "strict", window, max_pktsize)
        self._hk_on_request = on_request
        self._hk_on_data_after_eof = on_data_after_eof
        self._hk_next_seq = 0
        self._hk_started = False
        self._hk_held_eof = False  # an EOF held for the program when the client closed
        # asyncssh's IGNORE before each packet (HACKS.md row 33): kept while the
        # channel may carry keystrokes; `set_interactive(False)` drops it.
        self.interactive = True
        # The connection's HookState (None without install_hooks), looked up once, and the
        # data sealer for the current send keys (row 35): (encryption, sealer or None).
        self._hk_state: HookState | None = conn.get_extra_info(_STATE_KEY)
        self._hk_sealer: tuple[Any, Sealer | None] = _NO_SEALER

    # REACH-IN: SSHPacketHandler dispatches through the class attribute
    # `_packet_handlers`; we replace the MSG_CHANNEL_REQUEST entry.
    def _hk_process_request(self, _pkttype: int, _pktid: int, packet: SSHPacket) -> None:
        if self._recv_state not in _RECV_OPEN:  # REACH-IN: SSHChannel._recv_state
            # Same rule as asyncssh: a request after CHANNEL_CLOSE is a protocol error.
            raise asyncssh.ProtocolError("Channel not open")
        raw, name, want_reply, rest, malformed = _parse_request_header(
            packet.get_remaining_payload())
        req = ChannelRequest(self._hk_next_seq, name, raw, want_reply, rest, malformed)
        self._hk_next_seq += 1
        try:
            self._hk_on_request(self, req)
        except Exception as exc:
            _report_hook_error("on_request", exc)

    def _hk_process_close(self, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        # asyncssh holds a channel's data until its program starts, and finishes a
        # CLOSE only once that buffer is empty: a client that sends data, then
        # closes before any program started, would leave the channel (and its
        # maxSessions slot) open for ever. No program will read that data now.
        if not self._hk_started:
            self._recv_buf.clear()  # REACH-IN: SSHChannel._recv_buf
            # asyncssh's close also overwrites a held EOF ('eof_pending' becomes
            # 'close_pending'): if the program's start, already on its way, completes
            # before the close does, its input must still see the client's EOF.
            self._hk_held_eof = self._recv_state == "eof_pending"  # REACH-IN: _recv_state
        _CHAN_CLOSE(self, pkttype, pktid, packet)

    def _hk_process_window_adjust(self, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        # asyncssh adds any adjust to the window: a client could grant itself more
        # than 2^32 - 1 bytes, which RFC 4254 forbids and OpenSSH treats as fatal.
        payload = packet.get_remaining_payload()
        if len(payload) >= 4 and self._send_window + int.from_bytes(payload[:4]) > MAX_WINDOW:  # REACH-IN
            raise asyncssh.ProtocolError("Window adjust overflows the channel window")
        _CHAN_WINDOW_ADJUST(self, pkttype, pktid, packet)

    def _hk_process_data(self, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        # asyncssh raises ProtocolError("Channel not open for sending") for data after the
        # client's EOF, which ends the whole connection; OpenSSH drops it (channels.c,
        # channel_input_data: the channel's output side is closed) and goes on. So do we,
        # with asyncssh's other checks: a malformed packet and data beyond the window stay
        # protocol errors. The window is not charged (nothing is kept or delivered).
        if self._recv_state not in _RECV_EOF:  # REACH-IN: SSHChannel._recv_state
            _CHAN_DATA(self, pkttype, pktid, packet)
            return
        data = packet.get_string()  # PacketDecodeError: asyncssh's protocol error
        packet.check_end()
        if len(data) > self._recv_window:  # REACH-IN: SSHChannel._recv_window
            raise asyncssh.ProtocolError("Window exceeded")
        if self._hk_on_data_after_eof is not None:
            try:
                self._hk_on_data_after_eof(self, len(data))
            except Exception as exc:
                _report_hook_error("on_data_after_eof", exc)

    _packet_handlers = {
        **asyncssh.SSHServerChannel._packet_handlers,
        MSG_CHANNEL_DATA: _hk_process_data,
        MSG_CHANNEL_REQUEST: _hk_process_request,
        MSG_CHANNEL_CLOSE: _hk_process_close,
        MSG_CHANNEL_WINDOW_ADJUST: _hk_process_window_adjust,
    }

    def set_interactive(self, interactive: bool) -> None:
        """Whether this channel's packets each get an IGNORE in front (asyncssh does
        it for every packet): worth it for a pty's keystrokes and echoes, a second
        packet per packet for a bulk stream (exec without a pty, sftp)."""
        self.interactive = interactive

    # REACH-IN (HACKS.md row 35): SSHChannel.write (channel.py:896), ported line for line but
    # for one change: a bytes object (immutable) is queued as it is, not copied into a
    # bytearray; anything else (a bytearray or memoryview its owner may reuse) is copied.
    def write(self, data: Any, datatype: int | None = None) -> None:
        if self._send_state != 'open':
            raise BrokenPipeError('Channel not open for sending')

        if datatype is not None and datatype not in self._write_datatypes:
            raise OSError('Invalid extended data type')

        if not data:
            return

        if self._encoding:
            assert self._encoder is not None
            encoded_data = self._encoder.encode(cast(str, data))
        else:
            encoded_data = cast(bytes, data)

        datalen = len(encoded_data)

        typename = f' to {_DATA_TYPE_NAMES[datatype]}' if datatype else ''  # lint: one line

        self.logger.debug2('Sending %d data byte%s%s', datalen,
                           's' if datalen > 1 else '', typename)

        # CHANGED: bytes are not copied (the flush cuts views of them, row 32)
        queued = encoded_data if type(encoded_data) is bytes else bytearray(encoded_data)
        self._send_buf.append((queued, datatype))  # type: ignore[arg-type]
        self._send_buf_len += datalen
        self._flush_send_buf()

    # REACH-IN (HACKS.md row 32): SSHChannel._flush_send_buf (channel.py:305), ported: it
    # sends every data packet the send window allows, cut from the buffer as views, not copies.
    # (Its packets, like every packet, are held for the loop turn's one write: _Turn.)
    def _flush_send_buf(self) -> None:
        self._hk_flush_send_buf()

    def _hk_flush_send_buf(self) -> None:
        # asyncssh 2.24.1's loop, but each packet's data is a view of the buffered
        # bytearray (joined into the packet once, in _send_packet) and the sent part
        # is deleted once per buffer, not once per packet. The data packets go through
        # the sealer of _data_sealer when it can take them (asyncssh's send_packet otherwise).
        fast = _data_sealer(self) if self._send_buf and self._send_window else None
        while self._send_buf and self._send_window:
            buf, datatype = self._send_buf[0]
            sent = 0
            try:
                with memoryview(buf) as view:
                    cuts = []  # this entry's packets: sealed together into one buffer
                    while sent < len(buf) and self._send_window:
                        size = min(self._send_window, self._send_pktsize, len(buf) - sent)
                        self._send_buf_len -= size
                        self._send_window -= size
                        cuts.append((sent, sent + size))
                        sent += size
                    sealed = 0 if fast is None else fast(view, cuts, datatype)
                    for start, end in cuts[sealed:]:
                        with view[start:end] as data:
                            self._hk_send_data(data, datatype)
            finally:
                if sent == len(buf):
                    del self._send_buf[0]
                elif type(buf) is bytes:  # queued uncopied by write (row 35): the rest, once
                    self._send_buf[0] = (buf[sent:], datatype)
                else:
                    del buf[:sent]

        self._pause_resume_writing()

        if not self._send_buf:
            if self._send_state == 'eof_pending':
                self.send_packet(MSG_CHANNEL_EOF)
                self._send_state = 'eof'
            elif self._send_state == 'close_pending':
                self._close_send()

    def _hk_send_data(self, data: memoryview, datatype: int | None) -> None:
        # SSHChannel.send_packet without its join: the parts go to the connection's
        # send_packet (looked up on the instance, as asyncssh does), which joins them.
        if self._send_chan is None:  # pragma: no cover (as in asyncssh)
            return
        assert self._conn is not None
        view = cast(bytes, data)  # bytes-like: _send_packet joins it (typed bytes by asyncssh)
        if datatype is None:
            self._conn.send_packet(MSG_CHANNEL_DATA, UInt32(self._send_chan),
                                   UInt32(len(data)), view, handler=self)
        else:
            self._conn.send_packet(MSG_CHANNEL_EXTENDED_DATA, UInt32(self._send_chan),
                                   UInt32(datatype), UInt32(len(data)), view, handler=self)

    def release(self) -> None:
        """The channel is closed (asyncssh ran its cleanup: no request or data comes any
        more): let go of the callbacks, which refer to the session that holds this
        channel, a reference cycle the collector would otherwise have to find."""
        self._hk_on_request = _no_request
        self._hk_on_data_after_eof = None

    def start_io(self) -> None:
        if not self._hk_started and self._conn is not None:  # REACH-IN: SSHChannel._conn
            self._hk_started = True
            self.resume_reading()  # public; ends asyncssh's "starting" hold on data/EOF
            if self._hk_held_eof and self._session is not None:  # REACH-IN: SSHChannel._session
                self._hk_held_eof = False
                self._session.eof_received()  # what _flush_recv_buf would have done

    def reply(self, ok: bool) -> str | None:
        # REACH-IN: SSHChannel._send_state / _conn
        if self._send_state in _SEND_CLOSING or self._conn is None:
            return "channel closed"
        if _transport_gone(self._conn):
            return "connection closed"
        try:
            # REACH-IN: SSHChannel.send_packet (undocumented)
            self.send_packet(MSG_CHANNEL_SUCCESS if ok else MSG_CHANNEL_FAILURE)
            send_now(self._conn)  # how the send went is the answer: not held for the turn
        except Exception:
            return "send failed"
        if _transport_gone(self._conn):
            return "send failed"  # asyncio swallowed the socket error and is closing
        return None


# --------------------------------------------------------------------------- connection

GlobalVerdict: TypeAlias = bool | bytes | Awaitable[bool | bytes] | Default
OpenVerdict: TypeAlias = (
    tuple[SSHChannel[Any], Any]  # (channel, session or awaitable session)
    | asyncssh.ChannelOpenError
    | Default
)


class ConnectionHooks:
    """Per-connection callbacks; the base class behaves exactly like stock asyncssh.

    An adapter typically mixes this into its `asyncssh.SSHServer` subclass and
    calls `install_hooks(conn, self)` in `connection_made`.  Callbacks must not
    raise; if one does, the exception goes to the loop's exception handler and the
    event is refused.
    """

    def on_global_request(
        self, conn: asyncssh.SSHServerConnection, req: GlobalRequest
    ) -> GlobalVerdict:
        """Every global request, in order, one at a time.  True / bytes (success
        with response data) / False, possibly awaitable, or ASYNCSSH_DEFAULT
        (asyncssh's handler: keepalive -> success, tcpip-forward -> server_requested...)."""
        return ASYNCSSH_DEFAULT

    def on_global_overflow(self, conn: asyncssh.SSHServerConnection, req: GlobalRequest) -> None:
        """A global request arrived with `max_pending_global` already held; it gets
        a failure (in order) without reaching on_global_request."""

    def on_channel_open(
        self, conn: asyncssh.SSHServerConnection, req: ChannelOpenRequest
    ) -> OpenVerdict:
        """Every channel open.  Return (channel, session) to accept (the session may
        be an awaitable raising ChannelOpenError to refuse later), a ChannelOpenError
        (or raise one) to refuse, or ASYNCSSH_DEFAULT (asyncssh's handler, e.g.
        session_requested / connection_requested; for a malformed open: refuse with
        OPEN_CONNECT_FAILED, where asyncssh would disconnect)."""
        return ASYNCSSH_DEFAULT

    def on_auth_request(self, conn: asyncssh.SSHServerConnection, req: AuthRequest) -> None:
        """Every USERAUTH_REQUEST, before asyncssh acts on it.  Calling
        conn.disconnect() here stops asyncssh from processing it."""

    def on_auth_result(self, conn: asyncssh.SSHServerConnection, res: AuthResult) -> Awaitable[None] | None:
        """Every answer asyncssh is about to send to an auth request.  Calling
        conn.disconnect() here sends DISCONNECT *instead of* that answer.  For a
        success it may return an awaitable: USERAUTH_SUCCESS waits for it (a backend
        admitting the user at its own pace), and is not sent if the connection ended
        or was disconnected meanwhile."""
        return None

    def on_certificate(self, conn: asyncssh.SSHServerConnection, username: str,
                       cert: UserCertificate) -> bool | Awaitable[bool] | Default:
        """An OpenSSH user certificate offered by a publickey request (query or signed),
        already decoded with its CA signature verified by asyncssh. True: the
        certificate may log `username` in (asyncssh then checks the request's signature
        by the certified key); False: refused. ASYNCSSH_DEFAULT: asyncssh's own checks
        (`validate_ca_key`, validity, principals, source-address)."""
        return ASYNCSSH_DEFAULT

    def on_kex_done(self, conn: asyncssh.SSHServerConnection, count: int) -> None:
        """A key exchange completed (count 1 = initial, then re-keys)."""

    def on_service_request(self, conn: asyncssh.SSHServerConnection,
                           service: str | None) -> bool | Default:
        """Every SERVICE_REQUEST.  asyncssh accepts "ssh-userauth" once and disconnects
        (code 7) on a repeat, but paramiko sends one before EVERY auth attempt (OpenSSH
        re-accepts).  True re-accepts a repeated "ssh-userauth" before authentication;
        False disconnects (ServiceNotAvailable); ASYNCSSH_DEFAULT keeps asyncssh's rule."""
        return ASYNCSSH_DEFAULT

    def on_reply_failed(self, conn: asyncssh.SSHServerConnection, failure: ReplyFailure) -> None:
        """A global-request reply was owed but could not be sent."""

    def on_transport_paused(self, conn: asyncssh.SSHServerConnection, paused: bool) -> None:
        """The socket's write buffer passed its high-water mark (True) or fell below its
        low-water mark (False): the peer is not reading, whatever window it granted."""

    def on_backlog(self, conn: asyncssh.SSHServerConnection, buffered: int) -> None:
        """Bytes arrived (and were processed) while the write buffer is past its
        high-water mark: `buffered` bytes now wait to be sent. Answers to what the peer
        asks are all that still grow it then; the hook may bound it (conn.abort())."""


@dataclass(eq=False)
class HookState:
    """Per-connection bookkeeping (install_hooks returns it)."""

    conn: asyncssh.SSHServerConnection
    hooks: ConnectionHooks
    max_pending_global: int
    kex_count: int = 0
    authenticated: bool = False
    last_auth: AuthRequest | None = None
    auth_answered: bool = True
    write_paused: bool = False  # the transport's write buffer is past its high-water mark
    # send path (HACKS.md row 32): the packets held for this loop turn's one write
    # (_Turn), the transport they go to, what must be written before they go (a
    # durable log), and CSPRNG output for padding, read in growing blocks (a short
    # connection reads little)
    turn: _Turn | None = None
    in_turn: bool = False  # held packets this turn: listed in turn.held
    corked: list[bytes] = field(default_factory=list)
    transport: Any = None
    before_send: Callable[[], None] | None = None
    if_unsent: list[Callable[[], None]] = field(default_factory=list)  # see when_send_fails
    pad: bytes = b""
    pad_pos: int = 0
    inpos: int = 0  # receive path (row 35): where the packet in progress starts in _inpbuf
    send_packet: Callable[..., None] | None = None  # our port, while nobody wraps it (_data_sealer)
    seqs: dict[str, int] = field(default_factory=lambda: {"global": 0, "open": 0, "auth": 0})
    verdicts: set[asyncio.Future[bool | bytes]] = field(default_factory=set)

    def next_seq(self, kind: str) -> int:
        seq = self.seqs[kind]
        self.seqs[kind] = seq + 1
        return seq


_STATE_KEY = "sshspec_hook_state"


# Original handlers, looked up once (verified by check_asyncssh_compat).
_CONN_HANDLERS: Mapping[int, Callable[..., Any]] = asyncssh.SSHServerConnection._packet_handlers


def _call_hook(where: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        _report_hook_error(where, exc)
        return None


# -- global requests ------------------------------------------------------------


class _GlobalDispatch:
    """Queue entry (asyncssh's `_global_request_queue`) for one request we own."""

    def __init__(self, state: HookState, req: GlobalRequest) -> None:
        self.state = state
        self.req = req

    def __call__(self, _packet: SSHPacket) -> None:  # called by _service_next_global_request
        state, req, conn = self.state, self.req, self.state.conn
        try:
            verdict = state.hooks.on_global_request(conn, req)
        except Exception as exc:
            _report_hook_error("on_global_request", exc)
            verdict = False
        if verdict is ASYNCSSH_DEFAULT:
            self._asyncssh_default()
        elif inspect.isawaitable(verdict):
            fut = asyncio.ensure_future(verdict)
            state.verdicts.add(fut)
            fut.add_done_callback(self._verdict_done)
        else:
            _global_reply(state, req, verdict if isinstance(verdict, bytes) else bool(verdict))

    def _verdict_done(self, fut: asyncio.Future[bool | bytes]) -> None:
        self.state.verdicts.discard(fut)
        result: bool | bytes = False
        if not fut.cancelled():
            if (exc := fut.exception()) is not None:
                _report_hook_error("on_global_request (async verdict)", exc)
            else:
                value = fut.result()
                result = value if isinstance(value, bytes) else bool(value)
        _global_reply(self.state, self.req, result)

    def _asyncssh_default(self) -> None:
        conn, req = self.state.conn, self.req
        handler = None
        if req.name is not None and req.malformed is None:
            # REACH-IN: asyncssh names its handlers _process_<mapped name>_global_request
            handler = getattr(conn, f"_process_{map_handler_name(req.name)}_global_request", None)
        if not callable(handler):
            _global_reply(self.state, req, False)
            return
        try:
            handler(SSHPacket(req.payload))  # it calls _report_global_response itself
        except (PacketDecodeError, asyncssh.ProtocolError):
            # asyncssh would disconnect; its handlers raise before answering.
            _global_reply(self.state, req, False)


class _GlobalOverflowRun:
    """Queue entry standing for `replies` overflowed want_reply global requests."""

    def __init__(self, state: HookState) -> None:
        self.state = state
        self.replies = 1

    def __call__(self, _packet: SSHPacket) -> None:
        conn = self.state.conn
        for _ in range(self.replies - 1):
            if _transport_gone(conn):
                break
            conn.send_packet(MSG_REQUEST_FAILURE)  # REACH-IN: SSHConnection.send_packet
        _global_reply(self.state, None, False)


def _global_reply(state: HookState, req: GlobalRequest | None, result: bool | bytes) -> None:
    """Answer the head of asyncssh's global queue and service the next entry."""
    conn = state.conn
    queue = conn._global_request_queue  # REACH-IN: SSHConnection._global_request_queue
    want_reply = queue[0][2] if queue else False
    gone = _transport_gone(conn)
    if want_reply and gone:
        _call_hook("on_reply_failed", state.hooks.on_reply_failed, conn,
                   ReplyFailure(req, "connection closed"))
    rest = queue[1:]
    del queue[1:]  # asyncssh answers the head only: a send failing below is this reply's
    try:
        conn._report_global_response(result)  # REACH-IN: pops the head, replies
        if want_reply:
            _send_now(state)  # how the send went is the answer: not held for the turn
    except Exception as exc:
        _call_hook("on_reply_failed", state.hooks.on_reply_failed, conn,
                   ReplyFailure(req, "send failed", exc))
    else:
        if want_reply and not gone and _transport_gone(conn):
            # asyncio swallowed the socket error and is closing the transport
            _call_hook("on_reply_failed", state.hooks.on_reply_failed, conn,
                       ReplyFailure(req, "send failed"))
    queue.extend(rest)
    if queue:
        conn._service_next_global_request()  # REACH-IN


def _on_global_request(state: HookState, conn: asyncssh.SSHServerConnection, _pkttype: int,
                       _pktid: int, packet: SSHPacket) -> None:
    raw, name, want_reply, rest, malformed = _parse_request_header(packet.get_remaining_payload())
    req = GlobalRequest(state.next_seq("global"), name, raw, want_reply, rest, malformed)
    queue = conn._global_request_queue  # REACH-IN: list of (handler, packet, want_reply)
    held = sum(1 for handler, _, _ in queue if not isinstance(handler, _GlobalOverflowRun))
    if held >= state.max_pending_global:
        _call_hook("on_global_overflow", state.hooks.on_global_overflow, conn, req)
        if want_reply:
            tail = queue[-1][0]
            if isinstance(tail, _GlobalOverflowRun):
                tail.replies += 1
            else:
                queue.append((_GlobalOverflowRun(state), packet, True))
        return
    queue.append((_GlobalDispatch(state, req), packet, want_reply))
    if len(queue) == 1:
        conn._service_next_global_request()  # REACH-IN


# -- channel opens ----------------------------------------------------------------


def _parse_open(seq: int, payload: bytes) -> ChannelOpenRequest:
    packet, what, raw = SSHPacket(payload), "channel open", b""
    try:
        [raw] = _read(what, packet, ("channel type", _BYTES), end=False)
        [sender] = _read(what, packet, ("sender channel", _U32), end=False)
    except RequestDecodeError as exc:
        return ChannelOpenRequest(seq, _ascii(raw), raw, None, 0, 0, b"", exc.reason)
    name = _ascii(raw)
    try:
        window, max_packet = _read(what, packet, ("initial window", _U32),
                                   ("maximum packet size", _U32), end=False)
    except RequestDecodeError as exc:
        return ChannelOpenRequest(seq, name, raw, sender, 0, 0, b"", exc.reason)
    malformed = None
    if name is None:
        malformed = "channel type is not ASCII"
    elif max_packet == 0:
        malformed = "maximum packet size is 0"
    return ChannelOpenRequest(seq, name, raw, sender, window, max_packet,
                              packet.get_remaining_payload(), malformed)


@dataclass(frozen=True, slots=True)
class DirectTcpip:
    """A direct-tcpip CHANNEL_OPEN's fields (RFC 4254 7.2)."""

    host: str
    port: int
    origin_host: str
    origin_port: int


async def open_agent_channel(conn: asyncssh.SSHServerConnection, session: Any) -> None:
    """An auth-agent@openssh.com channel to the client (ssh -A), its session ``session``
    (an SSHUNIXSession); ChannelOpenError if the client refuses it."""
    # REACH-IN: SSHServerConnection.create_agent_channel and SSHAgentChannel.open
    # (undocumented): asyncssh's create_agent_connection() would refuse unless its own
    # per-connection listener (create_agent_listener) exists; sshspec's is per session.
    chan = conn.create_agent_channel()
    await chan.open(lambda: session)


def decode_tcpip_forward(req: GlobalRequest) -> tuple[str, int]:
    """The address and port of a tcpip-forward or cancel-tcpip-forward (RFC 4254 7.1)."""
    what = req.name or "tcpip-forward"
    host, port = _read(what, SSHPacket(req.payload), ("address to bind", "utf-8"), ("port to bind", _U32))
    if port > 65535:
        raise RequestDecodeError(what, f"no such port: {port}")
    return host, port


def decode_direct_tcpip(req: ChannelOpenRequest) -> DirectTcpip:
    """The target and origin of a direct-tcpip open; RequestDecodeError names a bad field."""
    what = "direct-tcpip"
    host, port, origin, origin_port = _read(what, SSHPacket(req.payload), ("host", "utf-8"),
                                            ("port", _U32), ("originator address", "utf-8"),
                                            ("originator port", _U32))
    if not host or port > 65535:
        raise RequestDecodeError(what, f"no such target: {host!r} port {port}")
    return DirectTcpip(host, port, origin, origin_port)


def _on_channel_open(state: HookState, conn: asyncssh.SSHServerConnection, pkttype: int,
                     pktid: int, packet: SSHPacket) -> None:
    req = _parse_open(state.next_seq("open"), packet.get_remaining_payload())
    verdict: Any
    try:
        verdict = state.hooks.on_channel_open(conn, req)
    except asyncssh.ChannelOpenError as exc:
        verdict = exc
    except Exception as exc:
        _report_hook_error("on_channel_open", exc)
        verdict = asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "internal error")
    if req.sender_channel is None:
        raise asyncssh.ProtocolError("Invalid channel open request")  # nobody to answer
    if verdict is ASYNCSSH_DEFAULT:
        if req.malformed is None:
            # packet is unconsumed: asyncssh parses it from the start.
            _CONN_HANDLERS[MSG_CHANNEL_OPEN](conn, pkttype, pktid, packet)
            return
        verdict = asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, req.malformed)
    if isinstance(verdict, asyncssh.ChannelOpenError):
        # REACH-IN: SSHConnection.send_channel_open_failure (undocumented)
        conn.send_channel_open_failure(req.sender_channel, verdict.code, verdict.reason,
                                       verdict.lang)
        return
    chan, session = verdict
    # REACH-IN: SSHChannel.process_open (undocumented); confirms, or refuses if the
    # (awaitable) session raises ChannelOpenError.
    chan.process_open(req.sender_channel, req.initial_window, req.max_packet, session)


# -- authentication ---------------------------------------------------------------


def _parse_auth(seq: int, payload: bytes) -> AuthRequest:
    packet = SSHPacket(payload)
    try:
        raw_user, raw_service, raw_method = _read("userauth", packet, ("user", _BYTES),
                                                  ("service", _BYTES), ("method", _BYTES),
                                                  end=False)
    except RequestDecodeError as exc:
        return AuthRequest(seq, None, b"", None, None, b"", b"", malformed=exc.reason)
    try:
        username: str | None = raw_user.decode("utf-8")
    except UnicodeDecodeError:
        username = None
    method, rest = _ascii(raw_method), packet.get_remaining_payload()
    base = AuthRequest(seq, username, raw_user, _ascii(raw_service), method, raw_method, rest)
    what = "userauth " + (method or "?")
    try:
        if method == "publickey":
            signed, alg, blob = _read(what, packet, ("signature flag", _BOOL),
                                      ("algorithm", _BYTES), ("key", _BYTES), end=False)
            _read(what, packet, *((("signature", _BYTES),) if signed else ()))
            return replace(base, publickey=PublicKeyInfo(_ascii(alg), blob, signed))
        if method == "password":
            [change] = _read(what, packet, ("change flag", _BOOL), end=False)
            _read(what, packet, ("password", _BYTES), *((("new password", _BYTES),) if change else ()))
            return replace(base, payload=b"", password_change=change)
    except RequestDecodeError as exc:
        payload = b"" if method == "password" else rest
        return replace(base, payload=payload, malformed=exc.reason)
    return base


def _on_userauth_request(state: HookState, conn: asyncssh.SSHServerConnection, pkttype: int,
                         pktid: int, packet: SSHPacket) -> Any:
    req = _parse_auth(state.next_seq("auth"), packet.get_remaining_payload())
    prev = state.last_auth
    if prev is not None and not state.auth_answered and not state.authenticated:
        # asyncssh cancels the auth in progress and never answers it.
        _call_hook("on_auth_result", state.hooks.on_auth_result, conn,
                   AuthResult(prev, "superseded"))
    state.last_auth, state.auth_answered = req, False
    _call_hook("on_auth_request", state.hooks.on_auth_request, conn, req)
    if _transport_gone(conn):
        return None  # the adapter disconnected
    return _CONN_HANDLERS[MSG_USERAUTH_REQUEST](conn, pkttype, pktid, packet)


_METHOD_MESSAGES: Mapping[tuple[str | None, int], AuthResultKind] = {
    ("publickey", 60): "pk_ok",
    ("keyboard-interactive", 60): "info_request",
    ("password", 60): "password_change_required",
}


def _hook_auth_answers(state: HookState) -> None:
    """Wrap the three methods every server auth answer goes through (instance attributes)."""
    conn = state.conn
    # REACH-IN: SSHConnection.send_userauth_failure / send_userauth_success /
    # send_userauth_packet, looked up on the instance by asyncssh.auth.
    orig_failure = conn.send_userauth_failure
    orig_success = conn.send_userauth_success
    orig_packet = conn.send_userauth_packet

    def send_userauth_failure(partial_success: bool) -> None:
        state.auth_answered = True
        _call_hook("on_auth_result", state.hooks.on_auth_result, conn,
                   AuthResult(state.last_auth, "failure", partial_success=partial_success))
        if not _transport_gone(conn):
            orig_failure(partial_success)

    async def send_userauth_success() -> None:
        state.auth_answered = True
        waiting = _call_hook("on_auth_result", state.hooks.on_auth_result, conn,
                             AuthResult(state.last_auth, "success"))
        if inspect.isawaitable(waiting):
            try:
                await waiting
            except Exception as exc:
                _report_hook_error("on_auth_result", exc)
        if not _transport_gone(conn):
            state.authenticated = True
            await orig_success()

    def send_userauth_packet(pkttype: int, *args: bytes, handler: Any = None,
                             trivial: bool = True) -> None:
        if pkttype >= 60:
            method = state.last_auth.method if state.last_auth else None
            kind = _METHOD_MESSAGES.get((method, pkttype), "method_message")
            state.auth_answered = True
            _call_hook("on_auth_result", state.hooks.on_auth_result, conn,
                       AuthResult(state.last_auth, kind, msg_type=pkttype))
            if _transport_gone(conn):
                return
        orig_packet(pkttype, *args, handler=handler, trivial=trivial)
        if pkttype == MSG_USERAUTH_PK_OK and state.last_auth is not None \
                and state.last_auth.method == "publickey" and conn._auth is handler:  # REACH-IN
            # The query is answered and its handler has nothing left to do, but asyncssh
            # keeps it as the auth in progress: it would take a stray 60-79 message
            # (an INFO_RESPONSE) and answer UNIMPLEMENTED. With none in progress such a
            # message is "Authentication not in progress", a ProtocolError, as it is
            # everywhere else.
            conn._auth = None

    # REACH-IN: instance attributes shadow asyncssh's methods; mypy's method-assign is the point.
    conn.send_userauth_failure = send_userauth_failure  # type: ignore[method-assign]
    conn.send_userauth_success = send_userauth_success  # type: ignore[method-assign]
    conn.send_userauth_packet = send_userauth_packet  # type: ignore[method-assign]


# -- service requests ---------------------------------------------------------------


def _on_service_request(state: HookState, conn: asyncssh.SSHServerConnection, pkttype: int,
                        pktid: int, packet: SSHPacket) -> None:
    try:
        service = _ascii(SSHPacket(packet.get_remaining_payload()).get_string())
    except PacketDecodeError:
        service = None
    verdict: Any = ASYNCSSH_DEFAULT
    try:
        verdict = state.hooks.on_service_request(conn, service)
    except Exception as exc:
        _report_hook_error("on_service_request", exc)
    if state.authenticated:
        # asyncssh answers DISCONNECT(7 SERVICE_NOT_AVAILABLE); after authentication
        # there is no service left to ask for: it is a protocol violation.
        raise asyncssh.ProtocolError("Service request after authentication")
    if verdict is False:
        raise asyncssh.ServiceNotAvailable("Service not available")
    if verdict is True and service == "ssh-userauth" and state.kex_count \
            and not state.authenticated:
        conn._next_service = b"ssh-userauth"  # REACH-IN: re-arm asyncssh's one-shot check
    _CONN_HANDLERS[MSG_SERVICE_REQUEST](conn, pkttype, pktid, packet)


# -- key exchange -------------------------------------------------------------------


class _BoundedZlibDecompress(asyncssh.compression.Decompressor):
    """asyncssh's zlib decompressor (compression.py `_ZLibDecompress`) with a bound:
    zlib stops at `MAX_DECOMPRESSED` + 1 bytes of output, and a packet that reaches
    it raises `DecompressionLimitError` (asyncssh inflated a 200 KB packet of zeros
    to 200 MB at once)."""

    def __init__(self) -> None:
        self._decomp = zlib.decompressobj()

    def decompress(self, data: bytes) -> bytes | None:
        try:
            out = self._decomp.decompress(data, MAX_DECOMPRESSED + 1)
        except zlib.error:
            return None  # as asyncssh's: CompressionError, DISCONNECT 6
        if len(out) > MAX_DECOMPRESSED:
            raise DecompressionLimitError(
                f"Decompressed packet exceeds {MAX_DECOMPRESSED} bytes (compression bomb)")
        return out


def _on_newkeys(state: HookState, conn: asyncssh.SSHServerConnection, pkttype: int,
                pktid: int, packet: SSHPacket) -> None:
    _CONN_HANDLERS[MSG_NEWKEYS](conn, pkttype, pktid, packet)
    # REACH-IN: SSHConnection._decompressor, made fresh for every key exchange and used
    # from the next packet on (zlib@openssh.com: from authentication on), so nothing
    # has gone through it yet. _recv_packet raises what it raises; asyncssh's
    # _recv_data answers a DisconnectError with DISCONNECT and closes.
    if type(conn._decompressor) is asyncssh.compression._ZLibDecompress:
        conn._decompressor = _BoundedZlibDecompress()
    state.kex_count += 1
    _call_hook("on_kex_done", state.hooks.on_kex_done, conn, state.kex_count)


def _kexinit_firsts(payload: bytes) -> tuple[bytes, bytes, bool]:
    """A KEXINIT payload (after the message type): the first key-exchange and host-key
    algorithm names and first_kex_packet_follows (RFC 4253 7.1)."""
    packet = SSHPacket(payload)
    packet.get_bytes(16)  # cookie
    kex, host_key = (packet.get_string().split(b",")[0] for _ in range(2))
    for _ in range(8):  # ciphers, MACs, compression (both ways), languages (both ways)
        packet.get_string()
    return kex, host_key, packet.get_boolean()


def guess_is_wrong(client_kexinit: bytes, server_kexinit: bytes) -> bool:
    """RFC 4253 7.1: a guessed first key-exchange packet is wrong when the client's and
    the server's first key-exchange algorithm differ, or their first host-key algorithm
    does (OpenSSH's `proposals_match`, Dropbear's `read_kex_algos`). Both payloads start
    after the message type. False when the client sent no guess."""
    client_kex, client_host_key, follows = _kexinit_firsts(client_kexinit)
    server_kex, server_host_key, _ = _kexinit_firsts(server_kexinit)
    return follows and (client_kex != server_kex or client_host_key != server_host_key)


def _on_kexinit(conn: asyncssh.SSHServerConnection, pkttype: int, pktid: int,
                packet: SSHPacket) -> Awaitable[None] | None:
    """asyncssh's KEXINIT handler, run up to its one await here, synchronously.

    Two things change. (1) A wrong guess: asyncssh ignores the client's guessed packet
    only when the negotiated key exchange is not the client's first choice; RFC 4253
    7.1 also calls the guess wrong when the server's first choice differs (or the
    host-key algorithm's), and a client that knows its guess was wrong (Dropbear)
    sends its real packet after it: asyncssh took the guess, then got a second init
    ("Key exchange not in progress"). (2) Determinism: the negotiation (every
    `_choose_alg`, which raises `KeyExchangeFailed`) runs before the handler's only
    await (`self._kex.start()`); driven here, a failed negotiation raises in the
    packet's own `data_received`, before the client's EOF in the same read can be
    reported as a mere "Connection lost" (the task asyncssh would make runs later)."""
    client = packet.get_remaining_payload()
    coro = _CONN_HANDLERS[MSG_KEXINIT](conn, pkttype, pktid, packet)
    try:
        waiting_on = coro.send(None)  # raises KeyExchangeFailed / ProtocolError here
    except StopIteration:
        waiting_on = None
        done = True
    else:
        done = False
    # REACH-IN: SSHConnection._ignore_first_kex (set by _process_kexinit before its
    # await, read by _recv_packet for the next kex message) and _server_kexinit (the
    # KEXINIT we sent, with its message type; sent before or by this handler).
    conn._ignore_first_kex = guess_is_wrong(client, conn._server_kexinit[1:])
    if done:
        return None
    return _resume(coro, waiting_on)  # a server's kex start() never awaits (asyncssh 2.24)


async def _resume(coro: Any, waiting_on: Any) -> None:
    """Finish a coroutine that was started by hand and is suspended on `waiting_on`."""
    class _Rest:
        def __await__(self) -> Any:
            value = waiting_on
            while True:
                try:
                    sent = yield value
                except BaseException as exc:  # thrown into us by the task: pass it on
                    try:
                        value = coro.throw(exc)
                    except StopIteration as stop:
                        return stop.value
                    continue
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value
    await _Rest()


def install_hooks(conn: asyncssh.SSHServerConnection, hooks: ConnectionHooks, *,
                  max_pending_global: int = 32, per_user_config: bool = True,
                  before_send: Callable[[], None] | None = None) -> HookState:
    """Route this connection's global requests, channel opens, service requests, auth
    requests/answers and NEWKEYS through `hooks`.  Call from SSHServer.connection_made (before the
    version exchange, so nothing is missed).

    `per_user_config=False` skips asyncssh's `reload_config()` at the first auth
    request, which rebuilds every server option in a thread pool so that an
    OpenSSH-style config file's Match blocks can apply per user (about 13% of a
    short connection's CPU, measured by bench/). Only correct when the server
    was given no config file and no rdns lookup: the options are then the same.

    Every packet the connection sends is held until the end of the event loop's turn
    (`_Turn`), then written with the turn's other packets in one write; `before_send`
    is called before they go (a durable log writes what it queued, once a turn for
    every connection). `send_now(conn)` sends at once what is held."""
    if max_pending_global < 1:
        raise ValueError("max_pending_global must be >= 1")
    if conn.get_extra_info(_STATE_KEY) is not None:
        raise RuntimeError("install_hooks() already called for this connection")
    state = HookState(conn, hooks, max_pending_global)
    state.turn = _turn(asyncio.get_running_loop())
    state.transport = conn._transport  # REACH-IN: SSHConnection._transport (None once closing)
    state.before_send = before_send
    handlers = dict(_CONN_HANDLERS)
    handlers[MSG_GLOBAL_REQUEST] = functools.partial(_on_global_request, state)
    handlers[MSG_CHANNEL_OPEN] = functools.partial(_on_channel_open, state)
    handlers[MSG_USERAUTH_REQUEST] = functools.partial(_on_userauth_request, state)
    handlers[MSG_NEWKEYS] = functools.partial(_on_newkeys, state)
    handlers[MSG_SERVICE_REQUEST] = functools.partial(_on_service_request, state)
    handlers[MSG_KEXINIT] = _on_kexinit
    # REACH-IN: an instance attribute shadows the class-level dispatch table.
    conn._packet_handlers = handlers
    if not per_user_config:
        # REACH-IN: SSHServerConnection.reload_config, awaited by _finish_userauth
        # (shadowed on the instance: mypy's method-assign is the point).
        conn.reload_config = _no_config_reload  # type: ignore[method-assign]
    _hook_auth_answers(state)
    # REACH-IN: asyncio tells the protocol (the SSHConnection) when its write buffer
    # passes the high-water mark; asyncssh's pause_writing/resume_writing do nothing
    # ("for now"), so a peer with a huge window that stops reading made the buffer
    # grow without bound. Instance attributes hand the news to the hooks.
    conn.pause_writing = functools.partial(_write_paused, state, True)  # type: ignore[method-assign]
    conn.resume_writing = functools.partial(_write_paused, state, False)  # type: ignore[method-assign]
    # REACH-IN (SSHConnection.data_received, an asyncio protocol method, shadowed on the
    # instance): while the buffer is past the mark, what a read's packets added to it
    # goes to on_backlog, once per read.
    conn.data_received = functools.partial(_data_received, state,  # type: ignore[method-assign]
                                           conn.data_received)
    # REACH-IN (SSHServerConnection._validate_openssh_certificate, shadowed on the
    # instance): every user certificate goes to on_certificate (HACKS.md).
    conn._validate_openssh_certificate = functools.partial(  # type: ignore[method-assign]
        _validate_certificate, state, conn._validate_openssh_certificate)
    # REACH-IN (HACKS.md rows 32, 33): asyncssh's SSHConnection.send_packet, ported (see
    # _send_packet), shadowed on the instance as the send breaker's wrapper is.
    state.send_packet = functools.partial(_send_packet, state)
    conn.send_packet = state.send_packet  # type: ignore[method-assign]
    # REACH-IN (HACKS.md row 35): asyncssh's packet parsers, ported (no re-slicing of the
    # receive buffer per packet); asyncssh looks them up on the instance
    # (`self._recv_handler = self._recv_pkthdr`), so instance attributes take their place.
    conn._recv_pkthdr = functools.partial(_recv_pkthdr, state)  # type: ignore[method-assign]
    conn._recv_packet = functools.partial(_recv_packet, state)  # type: ignore[method-assign]
    conn.set_extra_info(**{_STATE_KEY: state})
    return state


# --------------------------------------------------------------------------- the send path

_PAD_FIRST, _PAD_MAX = 64, 16384  # bytes of CSPRNG output per refill: first, largest


def _more_padding(pad: bytes) -> bytes:
    """A new block of CSPRNG output for padding, twice the last one's size up to _PAD_MAX."""
    return os.urandom(min(max(2 * len(pad), _PAD_FIRST), _PAD_MAX))


def _padding(state: HookState, n: int) -> bytes:
    """`n` unpredictable bytes: os.urandom output read in blocks (one getrandom call
    per few hundred to a few thousand packets instead of one per packet), each byte
    used once. OpenSSH pads from arc4random, a buffered CSPRNG, likewise."""
    pos = state.pad_pos
    if pos + n > len(state.pad):
        state.pad = _more_padding(state.pad)
        pos = 0
    state.pad_pos = pos + n
    return state.pad[pos:pos + n]


def _wants_ignore(handler: Any) -> bool:
    """asyncssh sends an empty IGNORE before every packet after the key exchange: RFC
    4251 9.3.1's countermeasure to CBC's predictable IVs (sshspec negotiates no CBC
    cipher, algorithms.py). Kept for connection-level packets (few) and interactive
    channels; dropped for a bulk channel's packets (HACKS.md row 33)."""
    if isinstance(handler, SSHChannel):
        return bool(getattr(handler, "interactive", False))  # others: forwarded streams
    return True


class _Turn:
    """The packets every connection of one event loop sent during a turn of it, held
    and written at its end: first `before_send` of each (a durable log's write, so
    that the records of what the client is about to see are on disk before it sees
    it), then each connection's packets in one socket write.

    The end of the turn is one callback, queued with `call_soon` when the turn holds
    its first packet. asyncio runs, in an iteration, only the callbacks that were ready
    when it began, so that callback runs after everything else of this iteration
    (every socket the selector reported, every callback already queued), and before
    the loop next waits: with a callback ready, the next poll does not block, so no
    held packet waits for I/O or a timer. Work that this turn queues after the first
    hold (a task woken by it) runs after the write and is held for the next one.
    One write of the log per turn instead of one per client-visible action, and one
    socket write per connection per turn instead of one per packet."""

    __slots__ = ("loop", "held")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.held: list[HookState] = []

    def hold(self, state: HookState) -> None:
        state.in_turn = True
        self.held.append(state)
        if len(self.held) == 1:
            self.loop.call_soon(self.end)

    def end(self) -> None:
        held, self.held = self.held, []
        for state in held:
            state.in_turn = False
            if state.corked:  # (empty if send_now sent them)
                try:
                    _write_out(state)
                except Exception as exc:  # one connection's trouble is not the others'
                    _report_hook_error("the turn's write", exc)


_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Turn] = weakref.WeakKeyDictionary()


def _turn(loop: asyncio.AbstractEventLoop) -> _Turn:
    turn = _TURNS.get(loop)
    if turn is None:
        turn = _TURNS[loop] = _Turn(loop)
    return turn


def _write_out(state: HookState) -> None:
    """What comes before the held packets (the durable log), then the packets, in one
    write. To the transport the connection had: asyncssh's _force_close forgets it at
    once and aborts it only from a callback queued later, and a DISCONNECT, or the
    packets held before an abort, must still go out first, as they did unheld."""
    if state.before_send is not None:
        state.before_send()
    corked = state.corked
    data = b"".join(corked) if len(corked) > 1 else corked[0]
    corked.clear()
    transport = state.transport
    if not transport.is_closing():
        with contextlib.suppress(ConnectionError):  # as SSHConnection._send
            transport.write(data)
    if state.if_unsent:
        if_unsent, state.if_unsent = state.if_unsent, []
        if transport.is_closing():  # the write failed (asyncio closes at once), or came too late
            for failed in if_unsent:
                failed()


def _send_now(state: HookState) -> None:
    if state.corked:
        _write_out(state)


# What install_hooks set on the connection (instance attributes): release_hooks takes them off.
_HOOKED_ATTRIBUTES = ("_packet_handlers", "reload_config", "send_userauth_failure", "send_userauth_success",
                      "send_userauth_packet", "pause_writing", "resume_writing", "data_received",
                      "_validate_openssh_certificate", "send_packet", "_recv_pkthdr", "_recv_packet")


def _no_more_packets() -> bool:
    return False


def release_hooks(conn: asyncssh.SSHServerConnection) -> None:
    """Once the connection is over (asyncssh's cleanup ran): take off what install_hooks
    put on it. Each hook refers to the connection's HookState, which refers back to the
    connection: the whole connection (its channels, keys, buffers, ~100 objects) was
    left to the cyclic collector, whose passes over it cost more than everything else
    a bare asyncssh connection leaves behind; without the loop, reference counting
    frees it when the last user lets go."""
    state = conn.get_extra_info(_STATE_KEY)
    if state is None:
        return
    attributes = conn.__dict__
    for name in _HOOKED_ATTRIBUTES:
        attributes.pop(name, None)
    # REACH-IN: SSHConnection._recv_handler, one of our parsers (a partial holding the
    # state) until the last packet; nothing is received after the cleanup.
    conn._recv_handler = _no_more_packets
    conn.set_extra_info(**{_STATE_KEY: None})
    state.send_packet = None  # (a partial holding the state: a loop of its own)
    if not state.verdicts:  # else a global request's verdict still comes, and is answered
        state.hooks = None
        state.conn = None


def send_now(conn: SSHConnection | None) -> None:
    """Send at once what `conn` holds for the end of the turn (the log first): for a
    caller that wants to know right after a send whether it failed (asyncio closes the
    transport when a socket write fails)."""
    state = None if conn is None else conn.get_extra_info(_STATE_KEY)
    if state is not None:
        _send_now(state)


def _encrypt_packet(encryption: Any, seq: int, hdr: bytes, packet: bytes) -> tuple[bytes, bytes]:
    """`encryption.encrypt_packet(seq, hdr, packet)`: the wire bytes in two parts.

    For AES-GCM, asyncssh's GCMCipher.encrypt_and_sign (crypto/cipher.py:110) cuts
    AESGCM's output into `header + ciphertext` and the tag, two copies that the
    caller joins again; this returns the header and AESGCM's output (ciphertext and
    tag, in wire order) as they are. Same key, IV and IV update (REACH-IN: row 32).
    Other ciphers go through asyncssh's, with a UMAC keyed once (_key_umac, row 37)."""
    if type(encryption) is GCMEncryption:
        cipher = encryption._cipher
        sealed = _gcm_aead(cipher, seq).encrypt(cipher._iv, packet, hdr)
        cipher._update_iv()
        return hdr, sealed
    if seq >= _KEEP_AFTER:
        _key_umac(encryption)
    sent: tuple[bytes, bytes] = encryption.encrypt_packet(seq, hdr, packet)
    return sent


# Packets into a key after which its AESGCM object (and a channel's sealer), or its keyed
# UMAC, is kept: a busy stream gets there within a few MiB, a pty session within a few
# hundred keystrokes; an idle session (some 30-60 packets after login) never does, so it
# keeps no OpenSSL contexts (a few KiB each way) nor UMAC contexts (4 KiB each way) for ever.
_KEEP_AFTER = 256
_UMAC_MAC = asyncssh.mac._UMAC  # REACH-IN (row 37)
_SEQ = struct.Struct(">Q")  # UMAC's nonce in SSH: the packet's sequence number (RFC 4418's, 8 bytes)


class _KeyedUMAC:
    """asyncssh's `_UMAC` (mac.py:102), keyed once. Its sign builds a new nettle UMAC
    context for every packet, zeroing a 4 KiB buffer and expanding the key (the L1, L2
    and L3 keys, some 80 AES blocks) to tag one packet; this one keeps the context and
    per packet hashes and takes the digest, which resets the hash and counts the nonce
    on by one (nettle's umac*_digest), so the nonce (the sequence number, asyncssh's
    `UInt64(seq)`) is set only when the sequence number is not the next one: at the
    first packet, and when it wraps at 2^32. Same key, nonce and tag. Thread CPU of one
    umac-128 tag of a 64-byte packet: 4.5 -> 1.7 us, 32 KiB: 8.2 -> 5.4 us. REACH-IN:
    row 37."""

    __slots__ = ("_hash", "_next")

    def __init__(self, mac: Any) -> None:
        self._hash = mac._umac_alg(mac._key)
        self._next = -1  # the nonce the context holds: none yet

    def sign(self, seq: int, packet: bytes) -> bytes:
        keyed = self._hash
        if seq != self._next:
            keyed.set_nonce(_SEQ.pack(seq))
        keyed.update(packet)
        self._next = seq + 1
        tag: bytes = keyed.digest()
        return tag

    def verify(self, seq: int, packet: bytes, sig: bytes) -> bool:
        return hmac.compare_digest(self.sign(seq, packet), sig)


def _key_umac(encryption: Any) -> None:
    """Once the packets' sequence number passes _KEEP_AFTER: a CTR key's UMAC (asyncssh's
    BasicEncryption/ETMEncryption `_mac`), replaced by the same MAC keyed once. Other
    keys (chacha20-poly1305: a ChachaEncryption, which has no `_mac`; HMAC) stay as
    they are."""
    if isinstance(encryption, BasicEncryption) and type(encryption._mac) is _UMAC_MAC:
        encryption._mac = _KeyedUMAC(encryption._mac)  # type: ignore[assignment]  # MAC's sign and verify


def _gcm_aead(cipher: GCMCipher, seq: int) -> AESGCM:
    """The AESGCM object for a GCMCipher's key: asyncssh's encrypt_and_sign and
    verify_and_decrypt build a new one (OpenSSL key schedule and context) for every
    packet; AESGCM takes a new nonce per call, so once the packets' sequence number
    `seq` passes _KEEP_AFTER it is built once and kept on the cipher (REACH-IN: row 35)."""
    aead: AESGCM | None = getattr(cipher, "_hk_aead", None)
    if aead is None:
        aead = AESGCM(cipher._key)
        if seq >= _KEEP_AFTER:
            cipher._hk_aead = aead  # type: ignore[attr-defined]  # our attribute, on asyncssh's object
    return aead


_DATA_HEAD = struct.Struct(">BBII")  # padding length, MSG_CHANNEL_DATA, channel, data length
_EXT_HEAD = struct.Struct(">BBIII")  # ..., MSG_CHANNEL_EXTENDED_DATA, channel, type, length
_PKTLEN = struct.Struct(">I")
_GCM_TAG = 16
_IV_MASK = 0xffffffffffffffff  # a GCM nonce's invocation counter: 64 bits, wrapping (RFC 5647 7.1)
_IGNORE = bytes((MSG_IGNORE,)) + String(b"")  # asyncssh's send_packet(MSG_IGNORE, String(b''))


def _data_sealer(chan: HookedServerChannel) -> Sealer | None:
    """For one flush of `chan`'s send buffer: a function that turns the data packets
    cut from one buffered entry into wire bytes for the cork, with exactly the bytes
    asyncssh's send_packet would send (same padding rule, GCM key, IV and sequence
    bookkeeping), in a few lines of Python instead of its general path, and the empty
    IGNORE before each on a channel that wants one (a pty's, row 33). The packets are
    sealed into one buffer of their exact size, corked once: no buffer per packet, and
    a turn with one flush is written without a join. None when the general path must
    run: a cipher other than AES-GCM, compression, asyncssh's packet log (debug level
    3), a key exchange not complete, or a send_packet that is not ours
    (tests/send_breaker.py wraps it). The function returns how many of the packets it
    sealed, in order: the rest take the general path, from the first one for which a
    re-key is due (send_packet starts it and holds the packet). Built once per send
    key and channel. REACH-IN: row 35."""
    conn: Any = chan._conn
    state = chan._hk_state
    if (conn is None or state is None or state.turn is None or not conn._transport
            or not (conn._kex_complete and conn._auth_complete) or conn._compressor
            or SSHLogger._debug_level >= 3 or conn.send_packet is not state.send_packet):
        return None
    encryption = conn._send_encryption
    keys, sealer = chan._hk_sealer
    if keys is not encryption:
        sealer = _new_sealer(conn, state, chan, encryption)
        if conn._send_seq >= _KEEP_AFTER:  # a busy channel keeps it; an idle one, nothing
            chan._hk_sealer = (encryption, sealer)
    return sealer


def _new_sealer(conn: Any, state: HookState, chan: HookedServerChannel,
                encryption: Any) -> Sealer | None:
    if (type(encryption) is not GCMEncryption or chan._send_chan is None
            or not hasattr(AESGCM, "encrypt_into")):  # cryptography >= 45
        return None
    cipher = encryption._cipher
    seal_into = _gcm_aead(cipher, conn._send_seq).encrypt_into
    blocksize, hdrlen = conn._send_blocksize, conn._send_enchdrlen
    send_chan = chan._send_chan
    monotonic = time.monotonic
    ignore_pad = -(hdrlen + len(_IGNORE)) % blocksize
    if ignore_pad < 4:
        ignore_pad += blocksize
    ignore_len = 1 + len(_IGNORE) + ignore_pad  # its packet length
    ignore_head = bytes((ignore_pad,)) + _IGNORE

    def send(view: memoryview, cuts: list[tuple[int, int]], datatype: int | None) -> int:
        if not conn._kex_complete or (conn._rekey_seconds and monotonic() >= conn._rekey_time):
            return 0
        ignore = chan.interactive  # send_packet's IGNORE first (row 33), as send_packet sends it
        head_len = 9 if datatype is None else 13
        room = conn._rekey_bytes - conn._rekey_bytes_sent  # a packet goes while room > 0
        # Each packet's length and plaintext, in wire order, up to a re-key; the loops
        # below do inline what send_packet, _padding and GCMCipher._update_iv do per
        # packet (a Python call each: inline, a 256 KiB write takes ~8% less CPU).
        packets: list[tuple[int, bytes]] = []
        pad, pad_pos = state.pad, state.pad_pos
        sealed = total = 0  # data packets; the wire bytes of all
        for start, end in cuts:
            if room <= 0:
                break
            if ignore:
                if pad_pos + ignore_pad > len(pad):
                    pad, pad_pos = _more_padding(pad), 0
                packets.append((ignore_len, ignore_head + pad[pad_pos:pad_pos + ignore_pad]))
                pad_pos += ignore_pad
                room -= ignore_len
                total += 4 + ignore_len + _GCM_TAG
            size = end - start
            padlen = -(hdrlen + head_len + size) % blocksize
            if padlen < 4:
                padlen += blocksize
            if pad_pos + padlen > len(pad):
                pad, pad_pos = _more_padding(pad), 0
            head = (_DATA_HEAD.pack(padlen, MSG_CHANNEL_DATA, send_chan, size) if datatype is None else
                    _EXT_HEAD.pack(padlen, MSG_CHANNEL_EXTENDED_DATA, send_chan, datatype, size))
            pktlen = 1 + head_len + size + padlen
            packets.append((pktlen, b"".join((head, view[start:end], pad[pad_pos:pad_pos + padlen]))))
            pad_pos += padlen
            room -= pktlen
            total += 4 + pktlen + _GCM_TAG
            sealed += 1
        if not sealed:
            return 0
        state.pad, state.pad_pos = pad, pad_pos
        wire = bytearray(total)  # length, ciphertext and tag of each: one buffer, one cork
        iv = cipher._iv
        fixed, invocation = iv[:4], int.from_bytes(iv[4:], "big")
        pos = payload = 0
        with memoryview(wire) as out:
            for pktlen, plain in packets:
                end = pos + 4 + pktlen + _GCM_TAG
                hdr = _PKTLEN.pack(pktlen)
                out[pos:pos + 4] = hdr
                seal_into(fixed + (invocation & _IV_MASK).to_bytes(8, "big"), plain, hdr, out[pos + 4:end])
                invocation += 1
                payload += pktlen
                pos = end
        cipher._iv = fixed + (invocation & _IV_MASK).to_bytes(8, "big")
        conn._send_seq = (conn._send_seq + len(packets)) & 0xffffffff
        conn._rekey_bytes_sent += payload
        state.corked.append(cast(bytes, wire))  # bytes-like: _write_out joins it or sends it as it is
        if not state.in_turn:  # held for the turn's one write (_Turn), as _send_packet holds its packets
            cast(_Turn, state.turn).hold(state)
        return sealed

    return send


# asyncssh 2.24.1's SSHConnection.send_packet, line for line but for the five marked
# changes; the compat check pins the original's source (_SEND_PACKET_SHA256).
def _send_packet(state: HookState, pkttype: int, *args: bytes,
                 handler: Any = None) -> None:
    self: Any = state.conn
    if (self._auth_complete and self._kex_complete and
            (self._rekey_bytes_sent >= self._rekey_bytes or
             (self._rekey_seconds and
              time.monotonic() >= self._rekey_time))):
        self._send_kexinit()
        self._kexinit_sent = True

    if (((pkttype in {MSG_DEBUG, MSG_SERVICE_REQUEST, MSG_SERVICE_ACCEPT} or
          pkttype > MSG_KEX_LAST) and not self._kex_complete) or
            (pkttype == MSG_USERAUTH_BANNER and
             not (self._auth_in_progress or self._auth_complete)) or
            (pkttype > MSG_USERAUTH_LAST and not self._auth_complete)):
        # CHANGED (5): held until the key exchange ends, a channel's data must be bytes
        # of its own, not a view of its buffer (released and cut after this call).
        self._deferred_packets.append((pkttype, tuple(
            arg if type(arg) is bytes else bytes(arg) for arg in args)))
        return

    # CHANGED (1): the IGNORE only for connection packets and interactive channels.
    if self._send_encryption and pkttype > MSG_KEX_LAST and _wants_ignore(handler):
        self.send_packet(MSG_IGNORE, String(b''))

    # CHANGED (4): without compression, the packet is joined once from its parts (the
    # payload is built separately only for a packet log, debug level 3: the one reader).
    compress = self._compressor and (self._auth_complete or not self._compress_after_auth)
    logged = SSHLogger._debug_level >= 3  # REACH-IN: set_debug_level's class attribute
    orig_payload = Byte(pkttype) + b''.join(args) if compress or logged else b''

    if compress:
        payload = self._compressor.compress(orig_payload)

        if payload is None:  # pragma: no cover
            raise asyncssh.CompressionError('Compression failed')
        paylen = len(payload)
    else:
        paylen = 1 + sum(map(len, args))

    padlen = -(self._send_enchdrlen + paylen) % self._send_blocksize
    if padlen < 4:
        padlen += self._send_blocksize

    # CHANGED (2): padding from the connection's buffered CSPRNG output.
    if compress:
        packet = Byte(padlen) + payload + _padding(state, padlen)
    else:
        packet = b''.join((Byte(padlen), Byte(pkttype), *args, _padding(state, padlen)))
    pktlen = len(packet)
    hdr = UInt32(pktlen)
    seq = self._send_seq

    if self._send_encryption:
        packet, mac = _encrypt_packet(self._send_encryption, seq, hdr, packet)
    else:
        packet = hdr + packet
        mac = b''

    # CHANGED (3): held for the loop turn's one write (_Turn); a DISCONNECT goes at once
    # (asyncssh closes the connection right after it). Dropped once the connection
    # forgot its transport, as _send drops it.
    if state.turn is None:
        self._send(packet + mac)
    elif self._transport:
        state.corked += (packet, mac)
        if not state.in_turn:
            state.turn.hold(state)
        if pkttype == MSG_DISCONNECT:
            _write_out(state)

    if self._send_seq == 0xffffffff and not self._send_encryption:
        self._send_seq = 0
        raise asyncssh.ProtocolError('Sequence rollover before kex complete')

    if pkttype == MSG_NEWKEYS and self._strict_kex:
        self._send_seq = 0
    else:
        self._send_seq = (seq + 1) & 0xffffffff

    if self._kex_complete:
        self._rekey_bytes_sent += pktlen

    if not handler:
        handler = self

    handler.log_sent_packet(pkttype, seq, orig_payload)


# --------------------------------------------------------------------------- the receive path

# asyncssh 2.24.1's SSHConnection._recv_pkthdr and _recv_packet (connection.py:1627, 1650),
# ported line for line but for the marked changes; the compat check pins their source.
# CHANGED (1): asyncssh cuts every packet off the front of its receive buffer
# (`self._inpbuf = self._inpbuf[n:]`, twice a packet): each cut copies all that is left,
# so a read of k packets copies about k^2/2 packets (an upload's 256 KiB reads: 8 packets,
# ~36 copied). Here the packets are read at an offset, `HookState.inpos`, the start of the
# packet in progress; the buffer is cut once per read, in _data_received (_compact_inpbuf).
# The first block stays in the buffer until the whole packet is there.
# CHANGED (2): for AES-GCM, the packet is opened straight from the buffer (ciphertext and
# tag are contiguous there) with the key's one AESGCM object (_gcm_aead), where asyncssh
# copies the rest, the MAC and their join, and builds an AESGCM per packet.
# CHANGED (3): for a CTR key with UMAC, the MAC is keyed once (_key_umac), not per packet.

def _compact_inpbuf(state: HookState) -> None:
    """Drop what the packet handlers consumed, once per read (before asyncssh appends)."""
    if state.inpos:
        conn: Any = state.conn
        conn._inpbuf = conn._inpbuf[state.inpos:]  # REACH-IN: SSHConnection._inpbuf
        state.inpos = 0


def _release_inpbuf(state: HookState) -> None:
    """Everything read was parsed: let the buffer go now, not at the next read (an idle
    session would keep its last read alive; asyncssh's cuts leave it empty)."""
    conn: Any = state.conn
    if state.inpos and state.inpos == len(conn._inpbuf):  # REACH-IN: SSHConnection._inpbuf
        conn._inpbuf = b""
        state.inpos = 0


def _recv_pkthdr(state: HookState) -> bool:
    self: Any = state.conn
    buf, pos = self._inpbuf, state.inpos  # CHANGED (1)
    if len(buf) - pos < self._recv_blocksize:
        return False

    self._packet = buf[pos:pos + self._recv_blocksize]  # CHANGED (1): not consumed yet

    if self._recv_encryption:
        self._packet, pktlen = \
            self._recv_encryption.decrypt_header(self._recv_seq,
                                                 self._packet, 4)
    else:
        pktlen = self._packet[:4]

    self._pktlen = int.from_bytes(pktlen, 'big')

    if self._pktlen > self._max_recv_pktlen:
        raise asyncssh.ProtocolError('Max packet size exceeded')

    self._recv_handler = self._recv_packet
    return True


def _recv_packet(state: HookState) -> bool:
    self: Any = state.conn
    rem = 4 + self._pktlen + self._recv_macsize - self._recv_blocksize
    buf, start = self._inpbuf, state.inpos  # CHANGED (1): the packet starts at `start`
    pos = start + self._recv_blocksize
    if len(buf) - pos < rem:
        return False

    seq = self._recv_seq
    encryption = self._recv_encryption

    if type(encryption) is GCMEncryption:  # CHANGED (2)
        cipher = encryption._cipher
        try:
            with memoryview(buf) as view, view[start + 4:pos + rem] as sealed:
                packet_data = _gcm_aead(cipher, seq).decrypt(cipher._iv, sealed, buf[start:start + 4])
        except InvalidTag:
            packet_data = None
        cipher._update_iv()

        if not packet_data:
            raise asyncssh.MACError('MAC verification failed')
    else:
        rest = buf[pos:pos + rem - self._recv_macsize]
        mac = buf[pos + rem - self._recv_macsize:pos + rem]

        if encryption:
            if seq >= _KEEP_AFTER:  # CHANGED (3)
                _key_umac(encryption)
            packet_data = encryption.decrypt_packet(
                seq, self._packet, rest, 4, mac)

            if not packet_data:
                raise asyncssh.MACError('MAC verification failed')
        else:
            packet_data = self._packet[4:] + rest

    state.inpos = pos + rem  # CHANGED (1)
    self._packet = b''

    orig_payload = packet_data[1:-packet_data[0]]

    if self._decompressor and (self._auth_complete or
                               not self._decompress_after_auth):
        payload = self._decompressor.decompress(orig_payload)

        if payload is None:
            raise asyncssh.CompressionError('Decompression failed')
    else:
        payload = orig_payload

    packet = SSHPacket(payload)
    pkttype = packet.get_byte()
    handler: SSHPacketHandler = self
    skip_reason = ''
    exc_reason = ''

    if MSG_KEX_FIRST <= pkttype <= MSG_KEX_LAST:
        if self._kex:
            if self._ignore_first_kex:
                skip_reason = 'ignored first kex'
                self._ignore_first_kex = False
            else:
                handler = self._kex
        else:
            skip_reason = 'kex not in progress'
            exc_reason = 'Key exchange not in progress'
    elif self._strict_kex and not self._recv_encryption and \
            MSG_IGNORE <= pkttype <= MSG_DEBUG:
        skip_reason = 'strict kex violation'
        exc_reason = 'Strict key exchange violation: ' \
                     f'unexpected packet type {pkttype} received'
    elif MSG_USERAUTH_FIRST <= pkttype <= MSG_USERAUTH_LAST:
        if self._auth:
            handler = self._auth
        else:
            skip_reason = 'auth not in progress'
            exc_reason = 'Authentication not in progress'
    elif pkttype > MSG_KEX_LAST and not self._recv_encryption:
        skip_reason = 'invalid request before kex complete'
        exc_reason = 'Invalid request before key exchange was complete'
    elif pkttype > MSG_USERAUTH_LAST and not self._auth_complete:
        skip_reason = 'invalid request before auth complete'
        exc_reason = 'Invalid request before authentication was complete'
    elif MSG_CHANNEL_FIRST <= pkttype <= MSG_CHANNEL_LAST:
        try:
            recv_chan = packet.get_uint32()
        except PacketDecodeError:
            skip_reason = 'incomplete channel request'
            exc_reason = 'Incomplete channel request received'
        else:
            try:
                handler = self._channels[recv_chan]
            except KeyError:
                skip_reason = 'invalid channel number'
                exc_reason = f'Invalid channel number {recv_chan} received'

    handler.log_received_packet(pkttype, seq, packet, skip_reason)

    if not skip_reason:
        try:
            result = handler.process_packet(pkttype, seq, packet)
        except PacketDecodeError as exc:
            raise asyncssh.ProtocolError(str(exc)) from None

        if inspect.isawaitable(result):
            # Buffer received data until current packet is processed
            self._recv_handler = lambda: False

            task = self.create_task(result)
            task.add_done_callback(functools.partial(
                self._finish_recv_packet, pkttype, seq, is_async=True))

            return False
        elif not result:
            if self._strict_kex and not self._recv_encryption:
                exc_reason = 'Strict key exchange violation: ' \
                             f'unexpected packet type {pkttype} received'
            else:
                self.logger.debug1('Unknown packet type %d received',
                                   pkttype)
                self.send_packet(MSG_UNIMPLEMENTED, UInt32(seq))

    if exc_reason:
        raise asyncssh.ProtocolError(exc_reason)

    self._finish_recv_packet(pkttype, seq)
    return True


async def _no_config_reload() -> None:
    return None


def _write_paused(state: HookState, paused: bool) -> None:
    state.write_paused = paused
    _call_hook("on_transport_paused", state.hooks.on_transport_paused, state.conn, paused)


def buffered_bytes(conn: asyncssh.SSHServerConnection) -> int:
    """Bytes waiting in the connection's socket write buffer (0 once it is gone)."""
    transport = conn._transport  # REACH-IN (#15)
    return transport.get_write_buffer_size() if transport is not None else 0


def _data_received(state: HookState, data_received: Callable[..., None], data: bytes,
                   datatype: object = None) -> None:
    _compact_inpbuf(state)
    data_received(data, datatype)
    _release_inpbuf(state)
    if state.write_paused:
        _call_hook("on_backlog", state.hooks.on_backlog, state.conn, buffered_bytes(state.conn))


# --------------------------------------------------------------------------- keepalive


class KeepaliveResult(enum.Enum):
    SUCCESS = "success"  # REQUEST_SUCCESS (asyncssh clients)
    FAILURE = "failure"  # REQUEST_FAILURE (OpenSSH, paramiko): still an answer
    CLOSED = "closed"  # connection closed before any answer
    TIMEOUT = "timeout"

    @property
    def answered(self) -> bool:
        return self in (KeepaliveResult.SUCCESS, KeepaliveResult.FAILURE)


async def send_keepalive(conn: asyncssh.SSHServerConnection, *,
                         timeout: float | None = None) -> KeepaliveResult:
    """Send keepalive@openssh.com with want_reply and wait for the client's answer.

    asyncssh holds server global requests until authentication completes.  A late
    answer after TIMEOUT is consumed harmlessly (the waiter is just cancelled).
    """
    if _transport_gone(conn):
        return KeepaliveResult.CLOSED
    try:
        async with asyncio.timeout(timeout):
            # REACH-IN: SSHConnection._make_global_request -> (pkttype, packet)
            pkttype, _ = await conn._make_global_request(b"keepalive@openssh.com")
    except TimeoutError:
        return KeepaliveResult.TIMEOUT
    # On close asyncssh resolves pending waiters with a fake REQUEST_FAILURE.
    if conn.is_closed() or _transport_gone(conn):
        return KeepaliveResult.CLOSED
    return KeepaliveResult.SUCCESS if pkttype == MSG_REQUEST_SUCCESS else KeepaliveResult.FAILURE


def is_login_timeout(exc: BaseException | None) -> bool:
    """True if `exc` (from connection_lost) is asyncssh's login_timeout firing.

    asyncssh sends no DISCONNECT in that case; it just closes the socket.
    """
    return isinstance(exc, asyncssh.ConnectionLost) and exc.reason == _LOGIN_TIMEOUT_REASON


def when_send_fails(chan: SSHChannel[Any], failed: Callable[[], None]) -> None:
    """Call `failed` if what `chan`'s connection sent so far cannot be written: at once
    if nothing more can be sent on it, else when the packets it holds for the end of the
    turn are written and that write fails (asyncio catches a failed socket send, closes
    the transport at once and reports the error only later, in connection_lost: so
    `failed` comes before that)."""
    conn = chan._conn  # REACH-IN: SSHChannel._conn (None once the channel is cleaned up)
    state = None if conn is None else conn.get_extra_info(_STATE_KEY)
    if conn is None or _transport_gone(conn):
        failed()
    elif state is not None and state.corked:
        state.if_unsent.append(failed)


def connection_gone(chan: SSHChannel[Any]) -> bool:
    """True once nothing more can be sent on `chan`'s connection."""
    conn = chan._conn  # REACH-IN: SSHChannel._conn (None once the channel is cleaned up)
    return conn is None or _transport_gone(conn)


# --------------------------------------------------------------------------- asyncssh's own log


def log_lazily() -> None:
    """Make asyncssh check whether a log line is wanted before it builds it.

    asyncssh formats every packet it sends or receives (handler name, byte count)
    before its logger checks for packet logging (debug level 3), and converts every
    message's arguments to text before :mod:`logging` checks the level: some 40
    packets and 20 messages a connection, about 2% of its CPU. With these two checks
    first, what is logged is exactly what was logged before (``set_debug_level``
    and the ``asyncssh`` logger's level still decide); nothing is built for lines
    nobody reads. Idempotent."""
    if getattr(SSHPacketHandler._log_packet, "_sshspec_lazy", False):
        return
    log_packet = SSHPacketHandler._log_packet  # REACH-IN: formats, then checks the level
    log = SSHLogger.log  # REACH-IN: converts arguments, then logging checks the level

    @functools.wraps(log_packet)  # __wrapped__: the compat check reads the original
    def lazy_log_packet(self: SSHPacketHandler, msg: str, pkttype: int, pktid: int | None,
                        packet: Any, note: str) -> None:
        if SSHLogger._debug_level >= 3:  # REACH-IN: set_debug_level's class attribute
            log_packet(self, msg, pkttype, pktid, packet, note)

    @functools.wraps(log)
    def lazy_log(self: SSHLogger, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            log(self, level, msg, *args, **kwargs)

    lazy_log_packet._sshspec_lazy = True  # type: ignore[attr-defined]
    SSHPacketHandler._log_packet = lazy_log_packet  # type: ignore[method-assign,assignment]
    SSHLogger.log = lazy_log  # type: ignore[method-assign]
def connection_factory(**options: Any) -> Callable[[], asyncssh.SSHServerConnection]:
    """A maker of asyncssh server connections with these options (`create_server`'s
    keywords, `server_factory` among them), for transports accepted by someone
    else: hand the result to `asyncio.Transport.set_protocol` and call its
    `connection_made(transport)`, as asyncio does for `create_server`'s.

    The options are built once, like `asyncssh.listen` builds them for its
    listener (the public `SSHServerConnectionOptions`).
    """
    built = asyncssh.SSHServerConnectionOptions(**options)
    loop = asyncio.get_running_loop()
    # REACH-IN: the SSHServerConnection constructor, called as asyncssh.listen's
    # conn_factory calls it (connection.py:9516): public class, undocumented constructor.
    return lambda: asyncssh.SSHServerConnection(loop, built, None, None)


def connection_owner(conn: asyncssh.SSHServerConnection) -> Any:
    """The `SSHServer` that `server_factory` made for `conn` (in its connection_made)."""
    return conn.get_owner()  # REACH-IN: undocumented SSHConnection.get_owner (connection.py:1250)


# --------------------------------------------------------------------------- compat check


class AsyncsshCompatError(RuntimeError):
    """The installed asyncssh differs from what this module was written against."""


@dataclass(frozen=True, slots=True)
class ReachIn:
    """One private thing we touch.  `params`: expected parameter names of a
    callable (self excluded); `attr_in`: for instance attributes, the function
    whose source must assign `self.<name>`; `source_has`: text that must appear in
    the object's source (a behaviour we rely on)."""

    owner: Any
    name: str
    params: tuple[str, ...] | None = None
    attr_in: Any = None
    source_has: str | None = None


_Conn = asyncssh.SSHServerConnection
_Chan = asyncssh.SSHServerChannel
_Cert = asyncssh.public_key.SSHOpenSSHCertificate

REACH_INS: tuple[ReachIn, ...] = (
    # Agent forwarding's channel to the client (HACKS.md row 30): asyncssh opens it
    # only from its own per-connection listener; ours is per session.
    ReachIn(_Conn, "create_agent_channel", ("window", "max_pktsize")),
    ReachIn(asyncssh.channel.SSHAgentChannel, "open", ("session_factory",),
            source_has="b'auth-agent@openssh.com'"),
    ReachIn(SSHPacketHandler, "process_packet", ("pkttype", "pktid", "packet"),
            source_has="self._packet_handlers[pkttype](self, pkttype"),
    # asyncssh.packet is not exported by the asyncssh package nor documented: the
    # decoder every hook reads payloads with (HACKS.md row 2).
    ReachIn(asyncssh.packet, "PacketDecodeError"),
    ReachIn(SSHPacket, "__init__", ("packet",)),
    ReachIn(SSHPacket, "__bool__", ()),
    ReachIn(SSHPacket, "get_remaining_payload", ()),
    ReachIn(SSHPacket, "check_end", (), source_has="raise PacketDecodeError"),
    ReachIn(SSHPacket, "get_bytes", ("size",), source_has="raise PacketDecodeError"),
    ReachIn(SSHPacket, "get_byte", (), source_has="self.get_bytes(1)"),
    ReachIn(SSHPacket, "get_boolean", (), source_has="self.get_byte()"),
    ReachIn(SSHPacket, "get_uint32", (), source_has="self.get_bytes(4)"),
    ReachIn(SSHPacket, "get_string", (), source_has="self.get_bytes(self.get_uint32())"),
    ReachIn(_Chan, "__init__", ("conn", "loop", "allow_pty", "line_editor", "line_echo",
                                "line_history", "max_line_length", "encoding", "errors",
                                "window", "max_pktsize")),
    ReachIn(_Chan, "_packet_handlers"),
    ReachIn(_Chan, "_process_request", ("_pkttype", "_pktid", "packet")),
    ReachIn(_Chan, "_recv_state", attr_in=SSHChannel.__init__),
    ReachIn(_Chan, "_send_state", attr_in=SSHChannel.__init__),
    ReachIn(_Chan, "_conn", attr_in=SSHChannel.__init__),
    ReachIn(_Chan, "_recv_buf", attr_in=SSHChannel.__init__),
    ReachIn(_Chan, "_session", attr_in=SSHChannel.__init__),
    ReachIn(_Chan, "_send_window", attr_in=SSHChannel.__init__),
    ReachIn(_Chan, "_recv_window", attr_in=SSHChannel.__init__),
    ReachIn(_Chan, "_process_data", ("_pkttype", "_pktid", "packet"),
            source_has="raise ProtocolError('Channel not open for sending')"),
    ReachIn(_Chan, "_process_eof", ("_pkttype", "_pktid", "packet"),
            source_has="self._recv_state = 'eof_pending'"),
    ReachIn(_Conn, "pause_writing", (), source_has="# Do nothing with this for now"),
    ReachIn(_Conn, "data_received", ("data", "datatype")),
    ReachIn(_Conn, "resume_writing", (), source_has="# Do nothing with this for now"),
    ReachIn(_Chan, "_process_window_adjust", ("_pkttype", "_pktid", "packet"),
            source_has="self._send_window += adjust"),
    ReachIn(_Chan, "_process_close", ("_pkttype", "_pktid", "packet"),
            source_has="self._flush_recv_buf()"),
    ReachIn(_Chan, "_process_close", ("_pkttype", "_pktid", "packet"),  # drops a held EOF
            source_has="self._recv_state = 'close_pending'"),
    ReachIn(_Chan, "_flush_recv_buf", ("exc",), source_has="self._recv_paused != 'starting'"),
    ReachIn(_Chan, "send_packet", ("pkttype", "args")),
    ReachIn(_Chan, "process_open", ("send_chan", "send_window", "send_pktsize", "session")),
    ReachIn(_Conn, "_packet_handlers"),
    ReachIn(_Conn, "_process_global_request", ("_pkttype", "_pktid", "packet")),
    ReachIn(_Conn, "_process_channel_open", ("_pkttype", "_pktid", "packet")),
    ReachIn(_Conn, "_process_userauth_request", ("_pkttype", "_pktid", "packet")),
    ReachIn(_Conn, "_process_newkeys", ("_pkttype", "_pktid", "packet")),
    ReachIn(_Conn, "_process_service_request", ("_pkttype", "_pktid", "packet"),
            source_has="if service != self._next_service:"),
    ReachIn(_Conn, "_next_service", attr_in=SSHConnection.__init__),
    # _on_kexinit (HACKS.md row 34): the guessed first kex packet, and negotiation
    # failures reported in the packet's own data_received.
    ReachIn(_Conn, "_process_kexinit", ("_pkttype", "_pktid", "packet"),
            source_has="self._ignore_first_kex = (first_kex_follows and"),
    ReachIn(_Conn, "_ignore_first_kex", attr_in=SSHConnection.__init__),
    ReachIn(_Conn, "_server_kexinit", attr_in=SSHConnection._send_kexinit),
    ReachIn(_Conn, "_recv_packet", (), source_has="if self._ignore_first_kex:"),
    ReachIn(_Conn, "_auth", attr_in=SSHConnection.__init__),
    ReachIn(_Conn, "_recv_packet", (), source_has="handler = self._auth"),
    ReachIn(_Conn, "_global_request_queue", attr_in=SSHConnection.__init__),
    ReachIn(_Conn, "_service_next_global_request", (), source_has="handler(packet)"),
    ReachIn(_Conn, "_report_global_response", ("result",),
            source_has="self._global_request_queue.pop(0)"),
    ReachIn(_Conn, "_process_keepalive_at_openssh_dot_com_global_request", ("packet",)),
    ReachIn(_Conn, "_transport", attr_in=SSHConnection.__init__),
    ReachIn(_Conn, "reload_config", (), source_has="SSHServerConnectionOptions.construct("),
    ReachIn(SSHConnection, "_finish_userauth", ("begin_auth", "method", "packet"),
            source_has="self).reload_config()"),
    ReachIn(_Conn, "_make_global_request", ("request", "args")),
    ReachIn(_Conn, "send_channel_open_failure", ("send_chan", "code", "reason", "lang")),
    ReachIn(_Conn, "send_userauth_failure", ("partial_success",)),
    ReachIn(_Conn, "send_userauth_success", ()),
    ReachIn(_Conn, "send_userauth_packet", ("pkttype", "args", "handler", "trivial")),
    ReachIn(_Conn, "send_packet", ("pkttype", "args", "handler")),
    ReachIn(_Conn, "_login_timer_callback", (), source_has=repr(_LOGIN_TIMEOUT_REASON)),
    ReachIn(_Conn, "_decompressor", attr_in=SSHConnection.__init__),
    ReachIn(_Conn, "_process_newkeys", ("_pkttype", "_pktid", "packet"),
            source_has="self._decompressor = self._next_decompressor"),
    ReachIn(_Conn, "_recv_packet", (),
            source_has="payload = self._decompressor.decompress(orig_payload)"),
    ReachIn(_Conn, "_recv_data", (), source_has="self._send_disconnect(exc.code, exc.reason, exc.lang)"),
    ReachIn(asyncssh.compression, "_ZLibDecompress"),
    ReachIn(asyncssh.compression._ZLibDecompress, "decompress", ("data",),
            source_has="self._decomp.decompress(data)"),
    ReachIn(asyncssh.misc, "map_handler_name", ("name",)),
    # log_lazily (HACKS.md row 25): where asyncssh builds log lines before checking.
    ReachIn(SSHPacketHandler, "_log_packet", ("msg", "pkttype", "pktid", "packet", "note"),
            source_has="self.logger.packet("),
    ReachIn(SSHLogger, "packet", ("pktid", "packet", "msg", "args", "kwargs"),
            source_has="if self._debug_level >= 3:"),
    ReachIn(SSHLogger, "_debug_level"),
    ReachIn(SSHLogger, "log", ("level", "msg", "args", "kwargs"), source_has="super().log(level, msg"),
    # connection_factory / connection_owner: the server's own listener (HACKS.md row 29).
    ReachIn(_Conn, "__init__", ("loop", "options", "acceptor", "error_handler", "wait")),
    ReachIn(asyncssh.connection, "listen",
            source_has="return SSHServerConnection(loop, new_options, acceptor, error_handler)"),
    ReachIn(SSHConnection, "get_owner", (), source_has="return self._owner"),
    ReachIn(SSHConnection, "_owner", attr_in=SSHConnection.connection_made),
    # on_certificate / user_certificate (HACKS.md row 31): user certificates decided by the hook.
    ReachIn(_Conn, "_validate_openssh_certificate", ("username", "cert"),
            source_has="self._owner.validate_ca_key(username, cert.signing_key)"),
    ReachIn(_Conn, "_validate_client_certificate", ("username", "key_data"),
            source_has="return await self._validate_openssh_certificate("),
    ReachIn(_Conn, "_key_options", attr_in=_Conn.__init__),
    ReachIn(_Conn, "_cert_options", attr_in=_Conn.__init__),
    *(ReachIn(_Cert, name, attr_in=_Cert.__init__)
      for name in ("_key_id", "_serial", "_valid_after", "_valid_before")),
    # The wire form certificate_signature_algorithm reads: the CA's key, then the signature, last.
    ReachIn(asyncssh.public_key, "SSHOpenSSHCertificate",
            source_has="signing_key = decode_ssh_public_key(packet.get_string())\n"
                       "        data = packet.get_consumed_payload()\n"
                       "        signature = packet.get_string()\n"
                       "        packet.check_end()"),
    ReachIn(asyncssh.packet, "String"),
    # the send path (HACKS.md rows 32, 33): _send_packet is a port of send_packet (its
    # source is pinned by hash, check_asyncssh_compat) and corks _flush_send_buf.
    ReachIn(SSHConnection, "_send", ("data",), source_has="self._transport.write(data)"),
    ReachIn(SSHChannel, "_flush_send_buf", ()),  # ported: source pinned (_PORTED)
    ReachIn(SSHChannel, "write", ("data", "datatype")),  # ported: source pinned (_PORTED)
    ReachIn(asyncssh.channel, "_data_type_names"),
    ReachIn(asyncssh.SSHServerChannel, "_write_datatypes"),  # a class attribute
    *(ReachIn(SSHChannel, name, attr_in=SSHChannel.set_encoding) for name in ("_encoding", "_encoder")),
    ReachIn(SSHChannel, "_pause_resume_writing", ()),
    ReachIn(SSHChannel, "_close_send", ()),
    *(ReachIn(SSHChannel, name, attr_in=SSHChannel.__init__)
      for name in ("_send_buf", "_send_buf_len", "_send_pktsize", "_send_chan")),
    ReachIn(GCMEncryption, "_cipher", attr_in=GCMEncryption.__init__),
    ReachIn(GCMCipher, "_key", attr_in=GCMCipher.__init__),
    ReachIn(GCMCipher, "_iv", attr_in=GCMCipher.__init__),
    # the sealer counts the nonce as _update_iv does (4 fixed bytes, a 64-bit counter after them)
    ReachIn(GCMCipher, "_update_iv", (), source_has="invocation = (invocation + 1) & 0xffffffffffffffff"),
    ReachIn(GCMCipher, "encrypt_and_sign", ("header", "data")),  # source pinned (_PORTED)
    ReachIn(SSHChannel, "send_packet", ("pkttype", "args"),
            source_has="self._conn.send_packet(pkttype, payload, handler=self)"),
    ReachIn(SSHConnection, "_send_kexinit", (), source_has="self.send_packet(MSG_KEXINIT"),
    *(ReachIn(SSHConnection, name, attr_in=SSHConnection.__init__)
      for name in ("_auth_complete", "_kex_complete", "_rekey_bytes_sent", "_rekey_bytes",
                   "_rekey_seconds", "_rekey_time", "_kexinit_sent", "_auth_in_progress",
                   "_deferred_packets", "_send_encryption", "_compressor", "_compress_after_auth",
                   "_send_enchdrlen", "_send_blocksize", "_send_seq", "_strict_kex")),
    # the data sealer and the receive path (HACKS.md row 35): AESGCM kept on the cipher;
    # the packet parsers, ported (source pinned, _PORTED), looked up on the instance;
    # the receive buffer, appended to by data_received and read at an offset.
    ReachIn(GCMCipher, "verify_and_decrypt", ("header", "data", "mac")),  # source pinned
    ReachIn(GCMEncryption, "decrypt_packet", ("seq", "first", "rest", "header_len", "mac"),
            source_has="return self._cipher.verify_and_decrypt(first[:header_len],"),
    ReachIn(SSHConnection, "_recv_pkthdr", ()),  # ported: source pinned (_PORTED)
    ReachIn(SSHConnection, "_recv_packet", ()),  # ported: source pinned (_PORTED)
    ReachIn(SSHConnection, "_recv_version", (), source_has="self._recv_handler = self._recv_pkthdr"),
    ReachIn(SSHConnection, "_finish_recv_packet", ("pkttype", "seq", "_task", "is_async"),
            source_has="self._recv_handler = self._recv_pkthdr"),
    ReachIn(SSHConnection, "_recv_data", (), source_has="while self._inpbuf and self._recv_handler():"),
    ReachIn(SSHConnection, "data_received", ("data", "datatype"), source_has="self._inpbuf += data"),
    *(ReachIn(SSHConnection, name, attr_in=SSHConnection.__init__)
      for name in ("_inpbuf", "_packet", "_pktlen", "_recv_handler", "_recv_encryption",
                   "_recv_blocksize", "_recv_macsize", "_recv_seq", "_max_recv_pktlen",
                   "_decompressor", "_decompress_after_auth", "_kex", "_ignore_first_kex",
                   "_auth", "_channels")),
    # a CTR key's UMAC keyed once (HACKS.md row 37): the MAC on the encryption object,
    # its key and hash constructor, and what sign computes (key, packet, 8-byte nonce).
    ReachIn(BasicEncryption, "_mac", attr_in=BasicEncryption.__init__),
    ReachIn(asyncssh.mac.MAC, "_key", attr_in=asyncssh.mac.MAC.__init__),
    ReachIn(_UMAC_MAC, "_umac_alg", attr_in=_UMAC_MAC.__init__),
    ReachIn(_UMAC_MAC, "sign", ("seq", "packet"),
            source_has="return self._umac_alg(self._key, packet, UInt64(seq)).digest()"),
    ReachIn(ETMEncryption, "encrypt_packet", ("seq", "header", "packet"),
            source_has="return packet, self._mac.sign(seq, packet)"),
    ReachIn(ETMEncryption, "decrypt_packet", ("seq", "first", "rest", "header_len", "mac"),
            source_has="if self._mac.verify(seq, packet, mac):"),
    ReachIn(BasicEncryption, "encrypt_packet", ("seq", "header", "packet"),
            source_has="mac = self._mac.sign(seq, packet) if self._mac else b''"),
    ReachIn(BasicEncryption, "decrypt_packet", ("seq", "first", "rest", "header_len", "mac"),
            source_has="if self._mac.verify(seq, packet, mac):"),
    # the UMAC hash object: set_nonce and update, and a digest that resets the hash
    ReachIn(asyncssh.crypto.umac, "_build_umac", ("size",),
            source_has="The hash is reset and the nonce is incremented"),
    # release_hooks (HACKS.md row 36): the owner's connection_lost and a session's come
    # from the cleanups, after which asyncssh hands the connection and the channel nothing.
    ReachIn(SSHConnection, "_cleanup", ("exc",), source_has="self._owner.connection_lost(exc)"),
    ReachIn(SSHConnection, "_force_close", ("exc",), source_has="self._loop.call_soon(self._cleanup, exc)"),
    ReachIn(SSHChannel, "_cleanup", ("exc",), source_has="self._conn.remove_channel(self._recv_chan)"),
)

# sha256 of the source of what the send path ports (HACKS.md row 32), asyncssh 2.24.1:
# any change upstream must be looked at (and ported) before upgrading.
_PORTED: tuple[tuple[Any, str, str], ...] = (
    (SSHConnection.send_packet, "_send_packet",
     "fb9da7bec6dd395a2f379f8a0f4dbfc5f194ff80e1ed8630d9a6dbf291359406"),
    (SSHChannel._flush_send_buf, "HookedServerChannel._hk_flush_send_buf",
     "3f11e9dc27c58b18847c12007b945cb36c7767def131c9b96b0c0a81a8b72dbc"),
    (GCMCipher.encrypt_and_sign, "_encrypt_packet",
     "adb87dbdb4f9039ab1f0029bd845b032bd6571d2ae894c7b067ea1f62bb0726e"),
    # write, queueing bytes uncopied, the sealer and the receive path (HACKS.md row 35)
    (SSHChannel.write, "HookedServerChannel.write",
     "1045e200084699330b3c75abe2e63e760dc8a12eb008c85ec5cefcafab372e38"),
    (SSHConnection._recv_pkthdr, "_recv_pkthdr",
     "7adc4d88fe20593cef39c00322547733a2d81f0aed40924e6105d5f57aa2a820"),
    (SSHConnection._recv_packet, "_recv_packet",
     "b3daa22e9763eee9f3ec710d1469c1b54c8df5066bae3e65b66bdf1db8063c8b"),
    (GCMCipher.verify_and_decrypt, "_recv_packet (its GCM branch)",
     "c09eb5b36d0f6a92a6df6430e70d479dbd6354f3403b98b65e9dc9ecccc37b52"),
)


def _source_sha256(fn: Any) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_reach_in(item: ReachIn) -> str | None:
    """None if `item` still matches the installed asyncssh, else what changed."""
    where = f"{getattr(item.owner, '__name__', item.owner)}.{item.name}"
    if item.attr_in is not None:
        source = inspect.getsource(item.attr_in)
        if f"self.{item.name}" not in source:
            return f"{where}: attribute no longer set in {item.attr_in.__qualname__}"
        return None
    obj = inspect.getattr_static(item.owner, item.name, None)
    if obj is None:
        return f"{where}: missing"
    if item.params is not None:
        if not callable(obj):
            return f"{where}: no longer callable"
        names = tuple(p for p in inspect.signature(obj).parameters if p != "self")
        if names != item.params:
            return f"{where}: signature changed: expected {item.params}, found {names}"
    if item.source_has is not None and item.source_has not in inspect.getsource(obj):
        return f"{where}: behaviour changed (source no longer contains {item.source_has!r})"
    return None


def check_asyncssh_compat() -> list[str]:
    """Every difference between the installed asyncssh and what this module expects."""
    problems = []
    low, high = SUPPORTED_ASYNCSSH
    version = _version_tuple(asyncssh.__version__)
    if not low <= version < high:
        problems.append(f"asyncssh {asyncssh.__version__} is outside the vetted range "
                        f">={'.'.join(map(str, low))},<{'.'.join(map(str, high[:2]))}")
    for item in REACH_INS:
        problem = check_reach_in(item)
        if problem:
            problems.append(problem)
    expected = {
        MSG_GLOBAL_REQUEST: "_process_global_request",
        MSG_CHANNEL_OPEN: "_process_channel_open",
        MSG_USERAUTH_REQUEST: "_process_userauth_request",
        MSG_NEWKEYS: "_process_newkeys",
        MSG_SERVICE_REQUEST: "_process_service_request",
        MSG_KEXINIT: "_process_kexinit",
    }
    for msg, fname in expected.items():
        if _CONN_HANDLERS.get(msg) is not getattr(_Conn, fname, None):
            problems.append(f"SSHServerConnection._packet_handlers[{msg}] is not {fname}")
    if _Chan._packet_handlers.get(MSG_CHANNEL_REQUEST) is not getattr(_Chan, "_process_request",
                                                                       None):
        problems.append("SSHServerChannel._packet_handlers[98] is not _process_request")
    if _CHAN_CLOSE is not getattr(_Chan, "_process_close", None):  # what _hk_process_close calls
        problems.append("SSHServerChannel._packet_handlers[97] is not _process_close")
    if _CHAN_WINDOW_ADJUST is not getattr(_Chan, "_process_window_adjust", None):
        problems.append("SSHServerChannel._packet_handlers[93] is not _process_window_adjust")
    kexinit = getattr(_Conn, "_process_kexinit", None)
    if kexinit is not None:
        # _on_kexinit needs every _choose_alg before the handler's one await, its last line.
        source = inspect.getsource(kexinit).rstrip()
        if source.count("await ") != 1 or not source.endswith("await self._kex.start()"):
            problems.append("SSHServerConnection._process_kexinit: the negotiation is no longer "
                            "all before its one await (self._kex.start())")
    if _CHAN_DATA is not getattr(_Chan, "_process_data", None):
        problems.append("SSHServerChannel._packet_handlers[94] is not _process_data")
    for original, port, sha in _PORTED:
        if _source_sha256(original) != sha:
            problems.append(f"{original.__qualname__} changed: port it to {port} (HACKS.md row 32)")
    return problems


def assert_asyncssh_compat() -> None:
    """Raise AsyncsshCompatError listing every problem (call at adapter start-up)."""
    problems = check_asyncssh_compat()
    if problems:
        raise AsyncsshCompatError(
            "asyncssh internals changed; see HACKS.md before upgrading:\n  "
            + "\n  ".join(problems))
