"""A protocol-level SSH client for fuzzing `sshspec serve`, and the spec oracle that
predicts what the server must answer.

`ProtocolClient` uses paramiko only for the transport (version exchange, key
exchange, encryption, packets). Everything above it is raw: SERVICE_REQUEST,
USERAUTH_REQUEST of any method with any payload, GLOBAL_REQUEST, CHANNEL_OPEN of
any type, CHANNEL_REQUEST of any type with want-reply on or off and any payload,
data, EOF, CLOSE, DISCONNECT, and `burst()` to put several packets into one
write(2), so the server reads them together (a request arriving while another is
pending, a close mid-request). What the client sends is exactly what it was told
to send: it never answers on its own, except CLOSE for a channel the server
closed (as every client does) and window adjusts. A CHANNEL_OPEN from the server
(forwarded-tcpip, auth-agent@openssh.com) is recorded and answered only when told
(`answer_open`): a client that never answers is one of the fuzzer's moves. Every message the server sends
is recorded in arrival order; the waits are bounded (a condition variable fed by
the transport thread), never sleeps.

`Oracle` composes the spec machines the way the adapter does (one connection
machine, one session machine per channel, the adapter's request queue, the local
backend's documented verdicts) and says, for every client action and every
server-side event, which codes each machine logs and which reply goes on the
wire. `CompiledDriver` runs it on the compiled tables, `ReferenceDriver` on the
`transitions` build. `burst_alternatives` lists the ways the server may
interleave a burst with what it does asynchronously (a start's verdict, the
deferred effect of a close or of a lost connection, a program's end, sends
failing once the client dropped).

The live fuzzer prints a failing sequence as a script over this module; it runs
as ``python script.py PORT KEY OTHER_KEY`` against a server with `SERVER_CONFIG`.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import paramiko
from paramiko.message import Message

from sshspec.fsm import core

# --- wire ------------------------------------------------------------------------------------

MSG_DISCONNECT, MSG_IGNORE, MSG_SERVICE_REQUEST, MSG_SERVICE_ACCEPT = 1, 2, 5, 6
MSG_USERAUTH_REQUEST, MSG_USERAUTH_FAILURE, MSG_USERAUTH_SUCCESS, MSG_USERAUTH_BANNER = 50, 51, 52, 53
MSG_USERAUTH_60, MSG_USERAUTH_INFO_RESPONSE = 60, 61  # PK_OK or INFO_REQUEST, by context
MSG_GLOBAL_REQUEST, MSG_REQUEST_SUCCESS, MSG_REQUEST_FAILURE = 80, 81, 82
MSG_CHANNEL_OPEN, MSG_CHANNEL_OPEN_CONFIRMATION, MSG_CHANNEL_OPEN_FAILURE = 90, 91, 92
MSG_CHANNEL_WINDOW_ADJUST, MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA = 93, 94, 95
MSG_CHANNEL_EOF, MSG_CHANNEL_CLOSE, MSG_CHANNEL_REQUEST = 96, 97, 98
MSG_CHANNEL_SUCCESS, MSG_CHANNEL_FAILURE = 99, 100

DISCONNECT_NAMES = {2: "PROTOCOL_ERROR", 7: "SERVICE_NOT_AVAILABLE", 11: "BY_APPLICATION",
                    14: "NO_MORE_AUTH_METHODS_AVAILABLE", 15: "ILLEGAL_USER_NAME"}
WINDOW = 1 << 20  # the receive window the client offers on every channel


def string(value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(raw)) + raw


def uint32(value: int) -> bytes:
    return struct.pack(">I", value & 0xFFFFFFFF)


def boolean(value: bool) -> bytes:
    return b"\x01" if value else b"\x00"


# Channel request payloads (what follows want-reply), well formed unless the name says so.
def env_payload(name: str | bytes, value: str | bytes) -> bytes:
    return string(name) + string(value)


def pty_payload(term: str | bytes = "xterm", cols: int = 80, rows: int = 24, modes: bytes = b"\x00") -> bytes:
    return string(term) + uint32(cols) + uint32(rows) + uint32(0) + uint32(0) + string(modes)


def exec_payload(command: str | bytes) -> bytes:
    return string(command)


def subsystem_payload(name: str | bytes) -> bytes:
    return string(name)


def window_change_payload(cols: int = 100, rows: int = 30) -> bytes:
    return uint32(cols) + uint32(rows) + uint32(0) + uint32(0)


def signal_payload(name: str | bytes) -> bytes:
    return string(name)


def break_payload(ms: int = 100) -> bytes:
    return uint32(ms)


def x11_payload() -> bytes:
    return boolean(False) + string("MIT-MAGIC-COOKIE-1") + string("00" * 16) + uint32(0)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def uint32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def string(self) -> bytes:
        return self.take(self.uint32())

    def boolean(self) -> bool:
        return self.take(1) != b"\x00"


# --- the client ------------------------------------------------------------------------------


@dataclass
class ChannelEvent:
    """Something the server sent on a channel, in arrival order."""

    kind: str  # data | extended | eof | exit-status | exit-signal | request | close
    value: Any = None

    def __repr__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}({self.value!r})"


@dataclass
class ClientChannel:
    """One channel as the client knows it; ``id`` is the client's channel number."""

    id: int
    kind: bytes
    remote: int | None = None  # the server's channel number, after OPEN_CONFIRMATION
    open_reply: str | None = None  # OPEN_CONFIRMATION | OPEN_FAILURE(code)
    replies: deque[str] = field(default_factory=deque)  # CHANNEL_SUCCESS / CHANNEL_FAILURE, unread
    all_replies: list[str] = field(default_factory=list)
    events: list[ChannelEvent] = field(default_factory=list)
    eof_sent: bool = False
    close_sent: bool = False
    close_received: bool = False
    server_closed_first: bool = False  # the server's CLOSE came before the client sent one
    recv_window: int = WINDOW
    # A channel the server opened (forwarded-tcpip, auth-agent@openssh.com): its CHANNEL_OPEN's
    # fields after the type; the client answers it only when told (`answer_open`).
    server_open: tuple[Any, ...] | None = None
    answered: str | None = None  # CONFIRMED | REFUSED(code)


class ProtocolClient:
    """A raw SSH client over paramiko's transport (see the module docstring)."""

    def __init__(self, host: str, port: int, *, timeout: float = 10.0, wait: float = 5.0,
                 answer_close: bool = True, source: str | None = None) -> None:
        self.wait_timeout = wait  # bound for every wait on a reply
        self.answer_close = answer_close  # False: a server's CLOSE waits for our own `close`
        # `source`: the local address to connect from (127.0.0.x plays another host)
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.local_port: int = self.sock.getsockname()[1]
        self.transport = paramiko.Transport(self.sock)
        self._cv = threading.Condition()
        self.received: list[tuple[int, str]] = []  # (message number, summary), for transcripts
        self.auth_replies: deque[str] = deque()
        self.all_auth_replies: list[str] = []
        self.global_replies: deque[str] = deque()
        self.all_global_replies: list[str] = []
        self.channels: dict[int, ClientChannel] = {}
        self.server_opens: list[int] = []  # the channels the server opened, in arrival order
        self.bound_ports: list[int] = []  # the ports REQUEST_SUCCESS named (tcpip-forward for port 0)
        self.disconnect: tuple[int, str] | None = None  # (reason code, text) from the server
        self.ended = False  # the transport stopped (DISCONNECT, EOF or error)
        self.info_prompts: list[str] = []
        self.last_auth_method: str | None = None
        self._next_channel = 0
        self._cork: list[bytes] | None = None
        self._cork_lock = threading.Lock()
        self._reading = threading.Event()  # cleared: the transport thread stops reading
        self._reading.set()
        packetizer = self.transport.packetizer
        self._read = packetizer.read_message
        self._write = packetizer.write_all
        packetizer.read_message = self._read_message  # type: ignore[method-assign]
        packetizer.write_all = self._write_all  # type: ignore[method-assign]
        self.transport.start_client(timeout=timeout)

    @classmethod
    def connect(cls, port: int, host: str = "127.0.0.1", **kwargs: Any) -> ProtocolClient:
        return cls(host, port, **kwargs)

    # -- sending

    def _write_all(self, out: bytes) -> None:
        with self._cork_lock:
            if self._cork is not None:
                self._cork.append(out)
                return
        self._write(out)

    @contextlib.contextmanager
    def burst(self) -> Iterator[None]:
        """Everything sent inside goes out in one write(2) at the end, so the
        server reads the packets together. paramiko's write lock is held
        throughout: nothing else is sent in between, packets keep their order.
        (Keep bursts small: a re-key could not start meanwhile.)"""
        lock = self.transport.packetizer._Packetizer__write_lock  # an RLock  # type: ignore[attr-defined]
        with lock:
            with self._cork_lock:
                self._cork = []
            try:
                yield
            finally:
                with self._cork_lock:
                    out, self._cork = b"".join(self._cork or []), None
                if out:
                    with contextlib.suppress(OSError):
                        self._write(out)

    def send(self, msg_type: int, body: bytes = b"") -> None:
        m = Message()
        m.add_byte(bytes([msg_type]))
        m.add_bytes(body)
        # A failure means the connection is gone; what the server did is in the record.
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self.transport._send_user_message(m)

    # -- receiving (the transport thread)

    def stop_reading(self) -> None:
        """From the next message on, nothing reads the socket (a client that asks and
        never reads its answers); for good: the transport thread waits for ever."""
        self._reading.clear()

    def flood(self, msg_type: int, body: bytes, most: int = 2_000_000) -> int:
        """Send the same message until the server cuts the connection (a send fails):
        how many went out. AssertionError if `most` went out uncut."""
        for sent in range(most):
            m = Message()
            m.add_byte(bytes([msg_type]))
            m.add_bytes(body)
            try:
                self.transport._send_user_message(m)
            except (OSError, EOFError, paramiko.SSHException):
                return sent
            if not self.transport.is_active():  # paramiko drops what a dead transport is given
                return sent
        raise AssertionError(f"{most} messages sent and the server never cut the connection")

    def _read_message(self) -> tuple[int, Message]:
        self._reading.wait()
        try:
            ptype, m = self._read()
        except BaseException:
            with self._cv:
                self.ended = True
                self._cv.notify_all()
            raise
        if not self.transport.initial_kex_done:
            return ptype, m
        data = m.asbytes()
        try:
            swallow = self._incoming(ptype, data)
        except Exception as exc:  # undecodable (or a bug here): recorded, never silent
            with self._cv:
                self.received.append((ptype, f"client could not take message {ptype}: {exc!r}"))
                self._cv.notify_all()
            swallow = True
        if ptype == MSG_DISCONNECT:
            with self._cv:
                self.ended = True
                self._cv.notify_all()
        return (MSG_IGNORE, Message()) if swallow else (ptype, m)

    def _incoming(self, ptype: int, data: bytes) -> bool:
        """Record one message; True if paramiko must not see it."""
        r = _Reader(data)
        with self._cv:
            try:
                return self._dispatch(ptype, r)
            finally:
                self._cv.notify_all()

    def _dispatch(self, ptype: int, r: _Reader) -> bool:
        note = self.received.append
        if ptype == MSG_IGNORE:
            return False
        if ptype == MSG_DISCONNECT:
            code, text = r.uint32(), r.string().decode(errors="replace")
            self.disconnect = (code, text)
            note((ptype, f"DISCONNECT({code}) {text}"))
            return False
        if ptype == MSG_SERVICE_ACCEPT:
            self._auth_reply("SERVICE_ACCEPT")
            return True
        if ptype == MSG_USERAUTH_FAILURE:
            methods, partial = r.string().decode(), r.boolean()
            note((ptype, f"USERAUTH_FAILURE({methods}{', partial' if partial else ''})"))
            self._auth_reply("USERAUTH_FAILURE(partial)" if partial else "USERAUTH_FAILURE")
            return True
        if ptype == MSG_USERAUTH_SUCCESS:
            self._auth_reply("USERAUTH_SUCCESS")
            return True
        if ptype == MSG_USERAUTH_BANNER:
            note((ptype, "USERAUTH_BANNER"))
            return True
        if ptype == MSG_USERAUTH_60:
            if self.last_auth_method == "keyboard-interactive":
                r.string(), r.string(), r.string()
                prompts = []
                for _ in range(r.uint32()):
                    prompts.append(r.string().decode(errors="replace"))
                    r.boolean()
                self.info_prompts = prompts
                self._auth_reply("USERAUTH_INFO_REQUEST")
            else:
                self._auth_reply("USERAUTH_PK_OK")
            return True
        if ptype in (MSG_REQUEST_SUCCESS, MSG_REQUEST_FAILURE):
            reply = "REQUEST_SUCCESS" if ptype == MSG_REQUEST_SUCCESS else "REQUEST_FAILURE"
            if ptype == MSG_REQUEST_SUCCESS and len(r.data) - r.pos == 4:
                self.bound_ports.append(r.uint32())  # tcpip-forward for port 0: the port bound
            self.global_replies.append(reply)
            self.all_global_replies.append(reply)
            note((ptype, reply))
            return True
        if ptype == MSG_CHANNEL_OPEN:
            self._server_open(r)
            return True
        if MSG_CHANNEL_OPEN_CONFIRMATION <= ptype <= MSG_CHANNEL_FAILURE:
            chan = self.channels.get(r.uint32())
            if chan is None:
                note((ptype, f"message {ptype} for a channel the client never opened"))
                return True
            self._channel_message(chan, ptype, r)
            return True
        note((ptype, f"message {ptype}"))
        return False  # GLOBAL_REQUEST from the server, kex...: paramiko's business

    def _server_open(self, r: _Reader) -> None:
        """The server opens a channel: recorded, answered only when the test says (`answer_open`)."""
        kind, sender, window, max_packet = r.string(), r.uint32(), r.uint32(), r.uint32()
        fields: tuple[Any, ...] = ()
        if kind == b"forwarded-tcpip":
            fields = (r.string().decode(), r.uint32(), r.string().decode(), r.uint32())
        cid = self._next_channel
        self._next_channel += 1
        self.channels[cid] = ClientChannel(cid, kind, remote=sender,
                                           server_open=(window, max_packet, *fields))
        self.server_opens.append(cid)
        self.received.append((MSG_CHANNEL_OPEN, f"CHANNEL_OPEN {kind.decode(errors='replace')} ch{cid}"))

    def answer_open(self, chan: int, confirm: bool, code: int = 1) -> None:
        """Answer the server's CHANNEL_OPEN: confirm it, or refuse it with ``code``."""
        ch = self.channels[chan]
        assert ch.remote is not None
        if confirm:
            ch.answered = "CONFIRMED"  # (the client may use the channel from now on)
            self.send(MSG_CHANNEL_OPEN_CONFIRMATION,
                      uint32(ch.remote) + uint32(chan) + uint32(ch.recv_window) + uint32(32768))
        else:
            ch.answered = f"REFUSED({code})"
            self.send(MSG_CHANNEL_OPEN_FAILURE, uint32(ch.remote) + uint32(code) + string("no") + string(""))

    def _auth_reply(self, reply: str) -> None:
        self.auth_replies.append(reply)
        self.all_auth_replies.append(reply)
        self.received.append((0, reply))

    def _channel_message(self, chan: ClientChannel, ptype: int, r: _Reader) -> None:
        note = self.received.append
        if ptype == MSG_CHANNEL_OPEN_CONFIRMATION:
            chan.remote = r.uint32()
            chan.open_reply = "OPEN_CONFIRMATION"
            note((ptype, f"OPEN_CONFIRMATION ch{chan.id}"))
        elif ptype == MSG_CHANNEL_OPEN_FAILURE:
            chan.open_reply = f"OPEN_FAILURE({r.uint32()})"
            note((ptype, f"{chan.open_reply} ch{chan.id}"))
        elif ptype == MSG_CHANNEL_WINDOW_ADJUST:
            pass
        elif ptype in (MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA):
            if ptype == MSG_CHANNEL_EXTENDED_DATA:
                r.uint32()
            data = r.string()
            kind = "data" if ptype == MSG_CHANNEL_DATA else "extended"
            if chan.events and chan.events[-1].kind == kind:
                chan.events[-1].value += data
            else:
                chan.events.append(ChannelEvent(kind, data))
            chan.recv_window -= len(data)
            if chan.recv_window < WINDOW // 2 and not chan.close_sent and chan.remote is not None:
                adjust = uint32(chan.remote) + uint32(WINDOW - chan.recv_window)
                self._send_now(MSG_CHANNEL_WINDOW_ADJUST, adjust)
                chan.recv_window = WINDOW
        elif ptype == MSG_CHANNEL_EOF:
            chan.events.append(ChannelEvent("eof"))
            note((ptype, f"EOF ch{chan.id}"))
        elif ptype == MSG_CHANNEL_CLOSE:
            chan.events.append(ChannelEvent("close"))
            chan.close_received = True
            chan.server_closed_first = not chan.close_sent
            note((ptype, f"CLOSE ch{chan.id}"))
            if not chan.close_sent and chan.remote is not None and self.answer_close:
                # Every client answers a close; it goes out before anyone is told.
                chan.close_sent = True
                self._send_now(MSG_CHANNEL_CLOSE, uint32(chan.remote))
        elif ptype == MSG_CHANNEL_REQUEST:
            name, want_reply = r.string(), r.boolean()
            if name == b"exit-status":
                chan.events.append(ChannelEvent("exit-status", r.uint32()))
            elif name == b"exit-signal":
                chan.events.append(ChannelEvent("exit-signal", r.string().decode(errors="replace")))
            else:
                chan.events.append(ChannelEvent("request", name.decode(errors="replace")))
            note((ptype, f"CHANNEL_REQUEST {chan.events[-1]!r} ch{chan.id}"))
            if want_reply and chan.remote is not None and not chan.close_sent:
                self._send_now(MSG_CHANNEL_FAILURE, uint32(chan.remote))
        else:
            reply = "CHANNEL_SUCCESS" if ptype == MSG_CHANNEL_SUCCESS else "CHANNEL_FAILURE"
            chan.replies.append(reply)
            chan.all_replies.append(reply)
            note((ptype, f"{reply} ch{chan.id}"))

    def _send_now(self, msg_type: int, body: bytes) -> None:
        # From the transport thread: paramiko's own handlers send the same way.
        m = Message()
        m.add_byte(bytes([msg_type]))
        m.add_bytes(body)
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self.transport._send_message(m)

    # -- waiting (bounded)

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """True once ``predicate()`` holds; False after ``timeout`` (or when the
        connection ended and it still does not hold)."""
        deadline = time.monotonic() + (self.wait_timeout if timeout is None else timeout)
        with self._cv:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or (self.ended and not predicate()):
                    return predicate()
                self._cv.wait(left)
            return True

    def wait_message(self, timeout: float) -> None:
        """Until the next message from the server, or ``timeout``."""
        with self._cv:
            if not self.ended:
                self._cv.wait(timeout)

    def _ended_reply(self) -> str:
        if self.disconnect is not None:
            return f"DISCONNECT({self.disconnect[0]})"
        return "CONNECTION_LOST" if self.ended else "NOTHING"

    def next_auth_reply(self, timeout: float | None = None) -> str:
        """The next answer to an auth message, or DISCONNECT(code) / CONNECTION_LOST / NOTHING."""
        self.wait_until(lambda: bool(self.auth_replies) or self.ended, timeout)
        with self._cv:
            return self.auth_replies.popleft() if self.auth_replies else self._ended_reply()

    def next_global_reply(self, timeout: float | None = None) -> str:
        self.wait_until(lambda: bool(self.global_replies) or self.ended, timeout)
        with self._cv:
            return self.global_replies.popleft() if self.global_replies else self._ended_reply()

    def next_channel_reply(self, chan: int, timeout: float | None = None) -> str:
        ch = self.channels[chan]
        self.wait_until(lambda: bool(ch.replies) or self.ended, timeout)
        with self._cv:
            return ch.replies.popleft() if ch.replies else self._ended_reply()

    def open_reply(self, chan: int, timeout: float | None = None) -> str:
        ch = self.channels[chan]
        self.wait_until(lambda: ch.open_reply is not None or self.ended, timeout)
        with self._cv:
            return ch.open_reply or self._ended_reply()

    def wait_closed(self, chan: int, timeout: float | None = None) -> bool:
        """Until the server's CLOSE for the channel arrived (and was answered)."""
        ch = self.channels[chan]
        return self.wait_until(lambda: ch.close_received, timeout)

    def wait_ended(self, timeout: float | None = None) -> bool:
        return self.wait_until(lambda: self.ended, timeout)

    # -- the transport layer and authentication

    def service_request(self, name: bytes | str = b"ssh-userauth") -> None:
        self.send(MSG_SERVICE_REQUEST, string(name))

    def userauth(self, username: bytes | str, method: bytes | str, body: bytes = b"",
                 service: bytes | str = b"ssh-connection") -> None:
        """A USERAUTH_REQUEST of any method with any method-specific body."""
        self.last_auth_method = method.decode(errors="replace") if isinstance(method, bytes) else method
        self.send(MSG_USERAUTH_REQUEST, string(username) + string(service) + string(method) + body)

    def auth_none(self, username: str) -> None:
        self.userauth(username, "none")

    def auth_password(self, username: str, password: str | bytes) -> None:
        self.userauth(username, "password", boolean(False) + string(password))

    def auth_publickey(self, username: str, key: paramiko.PKey | None, *, signed: bool = True,
                       good_signature: bool = True, blob: bytes | None = None) -> None:
        """publickey with ``key`` (or a raw ``blob``); ``signed=False`` is the query step."""
        alg = key.get_name() if key is not None else "ssh-ed25519"
        keyblob = blob if blob is not None else key.asbytes()  # type: ignore[union-attr]
        body = boolean(signed) + string(alg) + string(keyblob)
        if signed:
            to_sign = (string(self.transport.session_id) + bytes([MSG_USERAUTH_REQUEST]) + string(username)
                       + string("ssh-connection") + string("publickey") + body)
            if key is None:
                sig = string(alg) + string(b"\x00" * 64)
            else:
                sig = key.sign_ssh_data(to_sign, alg).asbytes()
                if not good_signature:
                    sig = sig[:-1] + bytes([sig[-1] ^ 1])
            body += string(sig)
        self.userauth(username, "publickey", body)

    def auth_kbdint(self, username: str) -> None:
        self.userauth(username, "keyboard-interactive", string("") + string(""))

    def kbdint_respond(self, *responses: str) -> None:
        body = uint32(len(responses)) + b"".join(string(r) for r in responses)
        self.send(MSG_USERAUTH_INFO_RESPONSE, body)

    # -- the connection layer

    def global_request(self, name: bytes | str, want_reply: bool, payload: bytes = b"") -> None:
        self.send(MSG_GLOBAL_REQUEST, string(name) + boolean(want_reply) + payload)

    def raw(self, msg_type: int, body: bytes = b"") -> None:
        """Any message at all."""
        self.send(msg_type, body)

    def open_channel(self, kind: bytes | str = b"session", *, window: int = WINDOW,
                     max_packet: int = 32768, extra: bytes = b"") -> int:
        """CHANNEL_OPEN of any type; returns the client's channel number (the reply
        comes in its own time: `open_reply`)."""
        raw_kind = kind.encode() if isinstance(kind, str) else kind
        with self._cv:
            cid = self._next_channel
            self._next_channel += 1
            self.channels[cid] = ClientChannel(cid, raw_kind, recv_window=window)
        self.send(MSG_CHANNEL_OPEN,
                  string(raw_kind) + uint32(cid) + uint32(window) + uint32(max_packet) + extra)
        return cid

    def _remote(self, chan: int) -> int:
        remote = self.channels[chan].remote
        return remote if remote is not None else 0xFFFFFFFF

    def request(self, chan: int, name: bytes | str, payload: bytes = b"", *, want_reply: bool = True) -> None:
        """CHANNEL_REQUEST of any type with any payload."""
        self.send(MSG_CHANNEL_REQUEST,
                  uint32(self._remote(chan)) + string(name) + boolean(want_reply) + payload)

    def data(self, chan: int, data: bytes) -> None:
        self.send(MSG_CHANNEL_DATA, uint32(self._remote(chan)) + string(data))

    def window_adjust(self, chan: int, adjust: int, times: int = 1) -> None:
        """WINDOW_ADJUSTs the client owes nobody (a flood; `adjust` may overflow), in one write."""
        with self.burst():
            for _ in range(times):
                self.send(MSG_CHANNEL_WINDOW_ADJUST, uint32(self._remote(chan)) + uint32(adjust))

    def eof(self, chan: int) -> None:
        self.channels[chan].eof_sent = True
        self.send(MSG_CHANNEL_EOF, uint32(self._remote(chan)))

    def close(self, chan: int) -> None:
        with self._cv:
            ch = self.channels[chan]
            ch.close_sent = True
        self.send(MSG_CHANNEL_CLOSE, uint32(self._remote(chan)))

    def disconnect_now(self, code: int = 11, text: str = "bye") -> None:
        """DISCONNECT, then close the socket."""
        self.send(MSG_DISCONNECT, uint32(code) + string(text) + string(""))
        self.drop()

    def drop(self) -> None:
        """Close the TCP connection without a word."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.transport.close()
        self.wait_ended(2.0)

    def close_all(self) -> None:
        with contextlib.suppress(Exception):
            self.transport.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def transcript(self) -> list[str]:
        with self._cv:
            return [text for _, text in self.received]


# --- the spec oracle ---------------------------------------------------------------------------

# The limits the fuzzers run the server with (small, so every guard is reached).
FUZZ_LIMITS = {"maxAuthTries": 3, "maxSessions": 2, "maxEnv": 2, "clientAliveCountMax": 3, "maxStartups": 100}
MAX_QUEUED = 4  # limits.maxQueuedRequests
# /bin/sh as the login shell: the user's own may read rc files (bash reads ~/.bashrc when
# SSH_CLIENT is set) that are slow, or leave lock files behind when a program is killed
# in the middle of them (pyenv's rehash lock): the fuzzers must not depend on dotfiles.
SERVER_CONFIG = {
    "limits": {"maxAuthTries": 3, "maxSessions": 2, "maxEnv": 2, "maxQueuedRequests": MAX_QUEUED},
    "backend": {"shell": "/bin/sh"},
    # The model's core has the core's default forwarding policy: no agent forwarding.
    "forwarding": {"agent": False},
}

# The spec's reply names as they look on the wire (RFC 4253/4254 reason codes).
WIRE = {
    "auth_failure": "USERAUTH_FAILURE", "pk_ok": "USERAUTH_PK_OK",
    "send_challenge": "USERAUTH_INFO_REQUEST", "accept_user": "USERAUTH_SUCCESS",
    "disconnect_auth": "DISCONNECT(14)", "disconnect_protocol": "DISCONNECT(2)",
    "disconnect": "DISCONNECT(11)",
    "request_failure": "REQUEST_FAILURE", "open_session": "OPEN_CONFIRMATION",
    "reject_channel": "OPEN_FAILURE(1)", "reject_channel_type": "OPEN_FAILURE(3)",
    "success": "CHANNEL_SUCCESS", "failure": "CHANNEL_FAILURE",
}
DISCONNECTS = frozenset({"disconnect_auth", "disconnect_protocol", "disconnect"})
PENDING = frozenset({"setup_pending", "starting", "running_pending"})
START_EVENTS = frozenset({"shell", "exec", "subsystem"})
RUNNING = frozenset({"running", "running_pending"})
ALIVE = frozenset({"established", "draining"})


def wire_of(reply: str | None) -> str:
    return WIRE.get(reply or "", f"<spec reply {reply!r}>")


class CompiledDriver:
    """The specs compiled with the fuzzers' limits and checked against the core, once."""

    def __init__(self, limits: dict[str, int] | None = None, *, max_queued: int = MAX_QUEUED,
                 forwarding: core.ForwardPolicy | None = None) -> None:
        self.limits = dict(limits or FUZZ_LIMITS)
        self.machines = core.Machines.load(self.limits, max_queued_requests=max_queued)
        # The server's forwarding policy (the core's default: every target, no agent).
        self.forwarding = forwarding or core.ForwardPolicy()



# What the local backend (as `sshspec serve` configures it) decides, from its
# documentation: the env deny list, RFC 4254 6.10's signal names, what starts.
ENV_DENY = ("LD_*", "DYLD_*", "GLIBC_TUNABLES", "GCONV_PATH")
SSH_SIGNALS = frozenset("ABRT ALRM FPE HUP ILL INT KILL PIPE QUIT SEGV TERM USR1 USR2".split())
FATAL_SIGNALS = frozenset({"KILL", "USR1"})  # end every program the fuzzers start, pty or not


def env_allowed(name: str, value: str) -> bool:
    return (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None and len(name) <= 256
            and len(value) <= 32 * 1024 and "\0" not in value
            and not any(fnmatch.fnmatchcase(name, p) for p in ENV_DENY))


@dataclass(frozen=True)
class Program:
    """What a start request runs, and how it ends."""

    kind: str  # exec | shell | subsystem
    starts: bool  # the backend starts it
    waits_for_eof: bool  # runs until the client's EOF; else ends at once
    status: int | None  # its exit status (None: not predicted)
    output: bytes | None = None  # its exact output without a pty (None: not checked)
    pty_output: bytes | None = None  # with a pty


@dataclass(frozen=True)
class Req:
    """A channel request as the client sends it, and the spec event the adapter makes of it."""

    name: bytes
    payload: bytes
    event: str
    want_reply: bool = True
    env: tuple[str, str] | None = None
    signal: str | None = None
    program: Program | None = None
    code: str = ""  # the payload as a Python expression, for scripts

    def replying(self, want_reply: bool) -> Req:
        return Req(self.name, self.payload, self.event, want_reply, self.env, self.signal, self.program,
                   self.code)

    def call(self, chan: str) -> str:
        return (f"c.request({chan}, {self.name!r}, {self.code or repr(self.payload)}, "
                f"want_reply={self.want_reply})")

    def __repr__(self) -> str:  # hypothesis prints rule arguments with it
        return f"<{self.name.decode(errors='replace')} {self.code or self.payload!r} reply={self.want_reply}>"


@dataclass(frozen=True)
class Auth:
    """An authentication message and the backend's verdict on it."""

    method: str  # none | password | publickey | query | kbdint | kbdint_response | other
    verdict: str | None  # ok | bad | unavailable: what the backend says (None: not asked)
    code: str  # how a script sends it (``c`` the client, ``key`` / ``other_key`` the keys)

    def __repr__(self) -> str:
        return f"<{self.code}>"


# How a client's auth message reaches the core: the method name on the wire and,
# for publickey, whether it is signed.
AUTH_METHODS: dict[str, tuple[str, bool | None]] = {
    "none": ("none", None), "password": ("password", None), "publickey": ("publickey", True),
    "query": ("publickey", False), "kbdint": ("keyboard-interactive", None), "other": ("hostbased", None)}


class _View:
    """A machine instance of the core's (a session's or the connection's) as tests read
    it: its state and counters."""

    __slots__ = ("owner", "counter_names")

    def __init__(self, owner: core.Session | core.ConnectionCore, counter_names: tuple[str, ...]) -> None:
        self.owner = owner
        self.counter_names = counter_names

    @property
    def state(self) -> str:
        return self.owner.state

    def counters(self) -> dict[str, int]:
        return {c: getattr(self.owner.instance, c) for c in self.counter_names}


@dataclass
class SessionModel:
    """One session channel: the core's session (machine and queue), and what the world
    around it does (the client's side, asyncssh's holds, the program)."""

    session: core.Session  # the core's, kept after the core lets go of it
    counter_names: tuple[str, ...]
    client_id: int
    server_id: int
    pending_start: Req | None = None  # a start whose backend verdict is still out
    start: Req | None = None  # the start that was decided ok (its program runs once started)
    pty: bool = False
    eof_arrived: bool = False  # the server has the client's EOF (held until the program starts)
    started: bool = False  # the program started: reading resumed, its end may come
    starts: int = 0  # how often a program was started (at most once)
    program: Program | None = None
    ending: tuple[tuple[str, Any], ...] | None = None  # the ends that may come: ("exit", status | None)
    # or ("signal", name); more than one when a fatal signal races the program's own exit
    ended: bool = False
    server_closed: bool = False  # the server sent (or is sending) its CLOSE: no reply can follow
    client_eof: bool = False
    client_close: bool = False
    data_before_start: bool = False

    @property
    def inst(self) -> _View:
        return _View(self.session, self.counter_names)

    @property
    def closed(self) -> bool:
        return self.session.closed

    @property
    def queue(self) -> Any:
        return self.session.queue

    def key(self) -> tuple[Any, ...]:
        s = self.session
        return (s.state, tuple(self.inst.counters().items()), len(s.queue), s.held, s.busy, s.replying,
                self.pending_start is not None, self.eof_arrived, self.started, self.ending, self.ended,
                self.server_closed, s.closed, self.pty)


@dataclass
class ForwardModel:
    """One forward channel (direct-tcpip the client opened, forwarded-tcpip the server
    opened): the core's machine holds its state; this is what the world around it did."""

    client_id: int
    kind: str  # direct-tcpip | forwarded-tcpip
    outcome: str | None = None  # direct-tcpip: how the connect to its target ends (connected |
    # refused | timed_out; None: it does not end before the test moves on)
    server_id: int | None = None
    open: bool = False  # confirmed: bytes may flow
    gone: bool = False  # refused, or its open timed out: no channel
    eof_to_client: bool = False  # the server passed the target's EOF on (CHANNEL_EOF)
    eof_to_target: bool = False  # the server passed the client's EOF on (FIN to the target)
    server_closed: bool = False  # the server closed the channel and the target's connection

    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.server_id, self.open, self.gone, self.eof_to_client, self.eof_to_target,
                self.server_closed)


class Oracle:
    """One connection as the core prescribes it, in the world the live server lives in.

    The protocol is the core's (fsm/core.py, the server's own): the oracle hands it
    the events the adapter would and carries out its actions the way the world
    answers them: the local backend's documented verdicts, what asyncssh does
    before any hook sees a message (pre-auth connection messages, auth after
    success, EOF held until a program starts), sends that fail once the client
    dropped. ``log[key]`` holds the codes each machine logs (key "conn", or
    ("session", channelId)), ``wire[key]`` the replies the client must see (keys
    "auth", "global", "disconnect", ("open", chan), ("chan", chan), chan being the
    client's channel number).
    """

    def __init__(self, driver: CompiledDriver | None = None) -> None:
        self.driver = driver or _default_driver()
        machines = self.driver.machines
        server = core.ServerCore(machines, _no_log)
        for event in (core.ServerEvent.start, core.ServerEvent.listening, core.ServerEvent.accept):
            server.handle(event)
        self.core = core.ConnectionCore(machines, server, self._log, keepalive_interval=1.0,
                                        forwarding=self.driver.forwarding)
        # Forward channels by the client's channel number, and by the server's.
        self.forwards: dict[int, ForwardModel] = {}
        self.forwards_by_server: dict[int, ForwardModel] = {}
        self._forward_opening: ForwardModel | None = None  # the direct-tcpip open being handled
        self._server_open_id: int | None = None  # the client's number for the server's next open
        self._bind_result: int | None = None  # the port the listener being bound got (None: failed)
        self.counter_names = tuple(machines.session.counters)
        self.sessions: dict[int, SessionModel] = {}  # by the client's channel number
        self.by_server: dict[int, SessionModel] = {}
        self.log: dict[Any, list[str]] = {"conn": []}
        self.wire: dict[Any, list[str]] = {}
        self.trace: list[str] = []  # the events handed to the core, for failure messages
        self.clock = 0.0
        self.auth_final = False  # a connection-layer message followed the auth success
        self.transport_gone = False  # nothing can be sent to the client any more
        self.lost = False  # connection_lost was processed: nothing more happens
        self.client_dropped = False  # the client closed its socket: it answers nothing more
        self.answer_close = True  # the client answers a server's CLOSE at once (the engine: later)
        # After the client dropped: how many more sends succeed before one fails (the
        # peer's reset arrives at some point; None: they all do).
        self.send_budget: int | None = None
        self._want_reply = False  # of the global request being handled
        self._opening: int | None = None  # the client channel of the open being handled
        self._auth: Auth | None = None  # the auth message being handled

    def clone(self) -> Oracle:
        machines = self.driver.machines
        memo: dict[int, Any] = {id(self.driver): self.driver, id(machines): machines}
        for m in (machines.server, machines.connection, machines.session, machines.forward):
            memo[id(m)] = m
        new: Oracle = copy.deepcopy(self, memo)
        new.core.log = new._log
        return new

    def signature(self) -> tuple[Any, ...]:
        """What the log and the wire will show (alternatives with equal ones are one)."""
        return (tuple(sorted((repr(k), tuple(v)) for k, v in self.log.items())),
                tuple(sorted((repr(k), tuple(v)) for k, v in self.wire.items())),
                tuple(sorted((k, s.ending) for k, s in self.sessions.items() if s.ending)))

    def key(self) -> tuple[Any, ...]:
        conn = self.core.instance
        counters = tuple(getattr(conn, c) for c in self.driver.machines.connection.counters)
        return (self.signature(), self.core.state, counters, self.transport_gone, self.lost, self.send_budget,
                tuple(sorted((k, s.key()) for k, s in self.sessions.items())),
                tuple(sorted((k, f.key()) for k, f in self.forwards.items())))

    @property
    def state(self) -> str:
        return self.core.state

    @property
    def conn(self) -> _View:
        return _View(self.core, self.driver.machines.connection.counters)

    def open_sessions(self) -> list[SessionModel]:
        return [s for s in self.sessions.values() if not s.closed]

    # -- the core, and the world's answers to its actions

    def _log(self, codes: tuple[str, ...], event: str, *, channel_id: int | None = None, **_: Any) -> None:
        key = ("session", channel_id) if isinstance(event, core.SessionEvent) else "conn"
        self.log.setdefault(key, []).extend(codes)

    def _expect(self, key: Any, reply: str) -> None:
        self.wire.setdefault(key, []).append(reply)

    def _handle(self, event: core.Event) -> None:
        self.trace.append(repr(event))
        pending: list[core.Event] = [event]
        while pending:
            for action in self.core.handle(pending.pop()):
                answer = self._carry_out(action)
                if answer is not None:
                    pending.append(answer)

    def _carry_out(self, action: core.Action) -> core.Event | None:  # noqa: C901 - one case per action
        if isinstance(action, core.Disconnect):
            if not self.transport_gone:
                self._expect("disconnect", f"DISCONNECT({action.code})")
                self.transport_gone = True
        elif isinstance(action, core.AuthAnswer):
            if not self.transport_gone:
                self._expect("auth", wire_of(action.reply))
            if action.reply == core.ConnectionReply.accept_user:
                self.clock += 1
                return core.AuthCompleted(self.clock)
        elif isinstance(action, core.KeyAcceptable):
            # asyncssh checks the signature of an acceptable key and answers.
            return core.AuthAnswered("success" if action.ok else "failure", "publickey")
        elif isinstance(action, core.CheckCredentials):
            assert self._auth is not None
            return core.Credentials(self._auth.verdict, action.method)
        elif isinstance(action, core.AdmitUser):
            return core.UserVerdict(True, action.method)
        elif isinstance(action, core.GlobalReply):
            if self._want_reply and not self.transport_gone:
                self._expect("global", "REQUEST_SUCCESS" if action.ok else "REQUEST_FAILURE")
        elif isinstance(action, core.OpenSession):
            assert self._opening is not None
            s = SessionModel(self.core.sessions[action.channel], self.counter_names, self._opening,
                             action.channel)
            self.sessions[self._opening] = self.by_server[action.channel] = s
            self.log.setdefault(("session", action.channel), [])
            self._expect(("open", self._opening), "OPEN_CONFIRMATION")
        elif isinstance(action, core.RejectOpen):
            assert self._opening is not None
            self._expect(("open", self._opening), f"OPEN_FAILURE({action.code})")
        elif isinstance(action, core.SendKeepalive):
            pass  # the keepalive rule says whether the client answers
        elif isinstance(action, core.AskBackend):
            req = action.request.payload
            assert isinstance(req, Req)
            return core.RequestDone(action.channel, self._backend(self.by_server[action.channel], req))
        elif isinstance(action, core.StartProgram):
            req = action.request.payload
            assert isinstance(req, Req)
            self.by_server[action.channel].pending_start = req  # the backend starts it asynchronously
        elif isinstance(action, core.ChannelReply):
            s = self.by_server[action.channel]
            if s.server_closed or not self._can_send():
                problem = "channel closed" if s.server_closed else "send failed"
                return core.ChannelReplied(action.channel, problem)
            self._expect(("chan", s.client_id), WIRE["success" if action.ok else "failure"])
            return core.ChannelReplied(action.channel, None)
        elif isinstance(action, core.ProgramStarted):
            s = self.by_server[action.channel]
            assert s.start is not None and s.start.program is not None
            s.started = True
            s.starts += 1
            s.program = s.start.program
            if not s.program.waits_for_eof:
                self._due(s, ("exit", s.program.status))
            if s.eof_arrived:  # asyncssh delivers the held EOF as reading resumes
                self._handle(core.ClientEof(action.channel))
            return core.IoStarted(action.channel)
        elif isinstance(action, core.CloseStdin):
            s = self.by_server[action.channel]
            if s.program is not None and s.program.waits_for_eof:
                self._due(s, ("exit", s.program.status))
        elif isinstance(action, core.SendExit):
            s = self.by_server[action.channel]
            if s.server_closed:
                return None  # nothing goes out on a channel the server already closed
            if not self._can_send():
                return core.ExitSendFailed(action.channel, "send failed")
            s.server_closed = True  # EOF, exit-status/exit-signal, CLOSE go out
            if not self.client_dropped and self.answer_close:
                s.client_close = True  # the client answers CLOSE
                return core.ChannelClosed(action.channel)
        elif isinstance(action, core.TerminateProgram):
            self._due(self.by_server[action.channel], ("signal", "TERM"))  # its end still goes out
        elif isinstance(action, core.CloseChannel):
            self.by_server[action.channel].server_closed = True
        elif isinstance(action, core.EndProgram | core.ConnectionEnded):
            pass  # the program is killed / the connection is released: nothing on the wire
        elif isinstance(action, core.OpenForward | core.OpenForwarded | core.ConfirmForward
                        | core.RejectForward | core.ForwardSendEof | core.CloseForward | core.Bind
                        | core.Unbind):
            return self._carry_out_forward(action)
        else:
            raise AssertionError(f"the oracle cannot carry out {action!r}")
        return None

    def _carry_out_forward(self, action: core.Action) -> core.Event | None:
        """The world's answers to the forwarding actions: the adapter's sockets as the live
        fuzzer's targets and listeners behave (tests/test_fuzz_live.py)."""
        if isinstance(action, core.OpenForward):  # connect to the target: its outcome is known
            f = self._forward_opening
            assert f is not None
            f.server_id = action.channel
            self.forwards[f.client_id] = self.forwards_by_server[action.channel] = f
            if f.outcome == "connected":
                return core.ForwardConnected(action.channel)
            if f.outcome is not None:
                return core.ForwardFailed(action.channel, f.outcome == "timed_out", f.outcome)
        elif isinstance(action, core.OpenForwarded):  # CHANNEL_OPEN to the client
            assert self._server_open_id is not None
            f = ForwardModel(self._server_open_id, action.kind, server_id=action.channel)
            self.forwards[f.client_id] = self.forwards_by_server[action.channel] = f
            if not self.transport_gone:
                self._expect(("opened", f.client_id), action.kind)
        elif isinstance(action, core.ConfirmForward):
            f = self.forwards_by_server[action.channel]
            f.open = True
            if f.kind == "direct-tcpip" and not self.transport_gone:
                self._expect(("open", f.client_id), "OPEN_CONFIRMATION")
        elif isinstance(action, core.RejectForward):
            f = self.forwards_by_server[action.channel]
            f.gone = True
            if f.kind == "direct-tcpip" and not self.transport_gone:
                self._expect(("open", f.client_id), f"OPEN_FAILURE({action.code})")
        elif isinstance(action, core.ForwardSendEof):
            f = self.forwards_by_server[action.channel]
            if action.to_client:
                f.eof_to_client = True
            else:
                f.eof_to_target = True
            if action.close:  # both directions done: the server closes, the client answers
                f.server_closed = True
                if not self.transport_gone:
                    return core.ForwardClosed(action.channel, "channel closed by the client")
        elif isinstance(action, core.CloseForward):
            self.forwards_by_server[action.channel].server_closed = True
        elif isinstance(action, core.Bind):
            bound = self._bind_result
            return core.ListenResult(bound, None if bound is not None else "Address already in use")
        return None  # (Unbind: the listener closes, nothing on the wire)

    def _backend(self, s: SessionModel, req: Req) -> bool:
        if req.event == "env":
            assert req.env is not None
            return env_allowed(*req.env)
        if req.event == "pty_req":
            s.pty = True
            return True
        if req.event == "window_change":
            return s.pty
        if req.event == "signal":
            ok = req.signal in SSH_SIGNALS and s.program is not None
            if ok and req.signal in FATAL_SIGNALS:
                self._due(s, ("signal", req.signal))
            return ok
        raise AssertionError(f"no backend verdict for {req.event}")

    def _can_send(self) -> bool:
        """Whether the next send succeeds (the socket may fail it, see send_budget)."""
        if self.transport_gone:
            return False
        if self.send_budget is not None:
            if self.send_budget == 0:
                self.transport_gone = True
                return False
            self.send_budget -= 1
        return True

    @staticmethod
    def _due(s: SessionModel, end: tuple[str, Any]) -> None:
        if s.ended or s.closed:
            return
        if s.ending is None:
            s.ending = (end,)
        elif end not in s.ending:
            s.ending = (*s.ending, end)

    def _after_disconnect(self) -> None:
        # The server disconnected: its transport closes, connection_lost follows.
        if self.state == "closed" and not self.lost:
            self.connection_lost("lost")

    # -- the connection

    def connected(self) -> None:
        self._handle(core.Connected())
        self._handle(core.KexDone(1))  # the key exchange is done before the client sends anything

    def service_request(self) -> None:
        if self.transport_gone:
            return
        if self.state in ALIVE:
            self.protocol_error()  # asyncssh accepts ssh-userauth only until authenticated
        elif self.state != "closed":
            self._expect("auth", "SERVICE_ACCEPT")

    def auth(self, a: Auth) -> None:
        if self.transport_gone:
            return
        self._auth = a
        if a.method == "kbdint_response":
            if self.state != "kbdint_round":
                self.protocol_error()  # no challenge is out
                return
            self._handle(core.KbdintResponse())
            self._after_disconnect()
            return
        if self.state in ALIVE and self.auth_final:
            # RFC 4252 5.1: ignored after success until a connection-layer message; then an error
            self.protocol_error()
            return
        method, signed = AUTH_METHODS[a.method]
        self._handle(core.AuthRequested(method, signed))
        if self.state == "checking":
            if a.method == "kbdint":
                self._handle(core.KbdintChallenge(True))
            elif a.method == "password":
                self._handle(core.Credentials(a.verdict, "password"))
            else:
                self._handle(core.KeyChecked(a.verdict))
        elif self.state == "querying":
            self._handle(core.KeyChecked(a.verdict))
        self._after_disconnect()

    def global_request(self, *, malformed: bool = False, want_reply: bool = True) -> None:
        if self.transport_gone:
            return
        if self.state not in ALIVE:
            # asyncssh refuses a connection-layer message before authentication by
            # itself: the adapter sees a protocol error.
            self.protocol_error()
            return
        self.auth_final = True
        self._want_reply = want_reply
        self._handle(core.GlobalRequest("'\\xff'" if malformed else "foo@example.com",
                                        "malformed" if malformed else None))

    def open_channel(self, chan: int, *, session: bool, malformed: bool = False) -> None:
        """CHANNEL_OPEN from the client, its channel number ``chan``; ``malformed``: a
        type that is not ASCII, a maximum packet size of 0..."""
        if self.transport_gone:
            return
        if self.state not in ALIVE:
            self.protocol_error()  # asyncssh refuses it before authentication (see global_request)
            return
        self.auth_final = True
        self._opening = chan
        # (A non-session open is a type the server does not serve; direct-tcpip without
        # its target fields, as the fuzzer sends it, is malformed.)
        kind = "session" if session and not malformed else "x11" if not malformed else "direct-tcpip"
        self._handle(core.ChannelOpen(kind, "malformed" if malformed else None))

    # -- forwarding

    def _connection_message(self) -> bool:
        """A connection-layer message from the client: False if it ends the connection."""
        if self.transport_gone:
            return False
        if self.state not in ALIVE:
            self.protocol_error()  # before authentication (see global_request)
            return False
        self.auth_final = True
        return True

    def listen(self, host: str, port: int, *, cancel: bool = False, bound: int | None = None) -> None:
        """GLOBAL_REQUEST tcpip-forward (``cancel``: cancel-tcpip-forward), want-reply on;
        ``bound``: the port the server's bind gets (None: it fails)."""
        if self._connection_message():
            self._want_reply = True
            self._bind_result = bound
            self._handle(core.ListenRequest(host, port, cancel))

    def open_forward(self, chan: int, host: str, port: int, outcome: str | None) -> ForwardModel | None:
        """CHANNEL_OPEN direct-tcpip to ``host``:``port``, whose connect ends with ``outcome``."""
        if not self._connection_message():
            return None
        self._opening = chan
        self._forward_opening = ForwardModel(chan, "direct-tcpip", outcome)
        self._handle(core.ChannelOpen("direct-tcpip", None, host, port, "127.0.0.1:1"))
        self._forward_opening = None
        return self.forwards.get(chan)

    def forwarded_connection(self, host: str, port: int, chan: int) -> ForwardModel | None:
        """A listener (``host``:``port`` as the client asked) accepted a connection; the
        server's CHANNEL_OPEN, if it opens one, is the client's channel ``chan``."""
        if self.lost:
            return None
        self._server_open_id = chan
        self._handle(core.ForwardedConnection(host, port, "127.0.0.1", 1))
        self._server_open_id = None
        return self.forwards.get(chan)

    def answer_forward(self, chan: int, how: str) -> None:
        """The client answers the server's open (confirm | refuse), or its time runs out (timeout)."""
        f = self.forwards[chan]
        if self.lost or f.server_id is None:
            return
        if how == "confirm":
            self._handle(core.ForwardConnected(f.server_id))
        else:
            self._handle(core.ForwardFailed(f.server_id, how == "timeout", how))

    def forward_eof(self, chan: int, *, from_client: bool) -> None:
        f = self.forwards[chan]
        if self.lost or f.server_id is None:
            return
        if from_client:
            self.auth_final = True
        self._handle(core.ForwardEof(f.server_id, from_client))

    def forward_closed(self, chan: int, *, by_client: bool) -> None:
        """The client closed the channel (``by_client``), or the target reset its connection."""
        f = self.forwards[chan]
        if self.lost or f.server_id is None:
            return
        if by_client:
            self.auth_final = True
        self._handle(core.ForwardClosed(f.server_id, "closed"))

    def protocol_error(self) -> None:
        """The client broke the protocol: asyncssh sends DISCONNECT(2) itself, then
        reports the loss (the spec's disconnect_protocol, carried out by the SSH layer)."""
        if not self.transport_gone:
            self._expect("disconnect", f"DISCONNECT({core.DISCONNECT_PROTOCOL_ERROR})")
            self.transport_gone = True
        self.connection_lost("protocol_error")

    def drop(self) -> None:
        """The client disconnects (DISCONNECT or just closing the socket)."""
        self.client_dropped = True
        self.transport_gone = True
        self.connection_lost("lost")

    def connection_lost(self, event: str) -> None:
        """The transport is gone: the core closes every open session, then the connection."""
        if self.lost:
            return
        self.lost = True
        self._handle(core.ConnectionLost(core.Lost(event), event))
        self.transport_gone = True

    # -- channels

    def _channel(self, chan: int, *, data: bool = False) -> SessionModel | None:
        """The session a channel message is for, or None after a protocol error."""
        s = self.sessions.get(chan)
        if s is None or s.client_close or (data and s.client_eof):
            self.protocol_error()  # no such channel on the server, or not open for it
            return None
        self.auth_final = True
        return s

    def request(self, chan: int, req: Req) -> None:
        """A channel request, answered before anything else arrives."""
        s = self.request_arrives(chan, req)
        if s is not None:
            self.settle(s)

    def request_arrives(self, chan: int, req: Req) -> SessionModel | None:
        """A channel request reaches the server; a start stays pending (see settle)."""
        if self.transport_gone:
            return None
        s = self._channel(chan)
        if s is not None:
            self.arrive(s, req)
        return s

    def arrive(self, s: SessionModel, req: Req) -> None:
        malformed = "malformed" if req.event == "malformed_request" else None
        name = req.name.decode("ascii", "replace")
        self._handle(core.ChannelRequest(s.server_id, name, req.want_reply, req, malformed))

    def settle(self, s: SessionModel) -> None:
        """Let every pending start get its verdict and its answer."""
        while s.pending_start is not None:
            self.resolve_start(s)

    def resolve_start(self, s: SessionModel) -> None:
        """The backend decided the pending start; the core answers it and moves on."""
        req = s.pending_start
        assert req is not None and req.program is not None
        s.pending_start = None
        if req.program.starts:
            s.start = req
        self._handle(core.RequestDone(s.server_id, req.program.starts))

    def eof(self, chan: int) -> None:
        if self.transport_gone:
            return
        s = self._channel(chan, data=True)
        if s is not None:
            s.client_eof = True
            self.eof_arrives(s)

    def eof_arrives(self, s: SessionModel) -> None:
        s.eof_arrived = True
        if s.started and not s.closed:
            self._handle(core.ClientEof(s.server_id))  # else asyncssh holds it until the program starts

    def data(self, chan: int, size: int = 1) -> None:
        if self.transport_gone:
            return
        s = self.sessions.get(chan)
        if s is not None and s.client_eof and not s.client_close:
            # After the client's EOF: dropped (as OpenSSH does), the core logs it.
            self.auth_final = True
            if not s.closed:
                self._handle(core.DataAfterEof(s.server_id, size))
            return
        s = self._channel(chan, data=True)
        if s is not None and not s.started:
            s.data_before_start = True

    def close(self, chan: int) -> None:
        """The client closes the channel; the server answers CLOSE and the session closes."""
        if self.transport_gone:
            return
        s = self._channel(chan)
        if s is not None:
            self.close_arrives(s)
            self._session_close(s)

    def close_arrives(self, s: SessionModel) -> None:
        s.client_close = True
        s.server_closed = True  # asyncssh answers the CLOSE at once, the cleanup comes later

    def _session_close(self, s: SessionModel) -> None:
        if s.closed:
            return
        s.server_closed = True
        self._handle(core.ChannelClosed(s.server_id))
        self._after_disconnect()

    # -- the program's end (comes by itself)

    def program_end(self, chan: int, kind: str, value: Any) -> None:
        """The program ended: ``kind`` exit (value: status) or signal (value: name)."""
        s = self.sessions[chan]
        s.ended = True
        s.ending = None
        if kind == "exit":
            self._handle(core.ProgramEnded(s.server_id, value))
        else:
            self._handle(core.ProgramEnded(s.server_id, None, value))

    # -- server-side connection events (what the live fuzzer cannot trigger at will)

    def keepalive(self, answered: bool) -> None:
        if self.lost or self.state not in ALIVE or self.core.get_timer() is None:
            return
        self.clock = max(self.clock, self.core.get_timer() or 0.0)
        for action in self.core.handle_timer(self.clock):
            answer = self._carry_out(action)
            assert answer is None
        if self.state == "closed":  # no answer to too many: the server disconnects
            self._after_disconnect()
        else:
            self._handle(core.KeepaliveResult(answered, self.clock))

    def login_timeout(self) -> None:
        if not self.lost and self.state not in ALIVE and self.state != "closed":
            self.transport_gone = True  # asyncssh closes the socket itself
            self.connection_lost("login_timeout")

    def global_reply_failed(self) -> None:
        if not self.lost and self.state in ALIVE:
            self._handle(core.GlobalReplyFailed("send failed"))

    def shutdown(self) -> None:
        """The server shuts down (the adapter's Shutdown event)."""
        if self.lost:
            return
        self._handle(core.Shutdown())
        self._after_disconnect()

    def endings(self) -> dict[int, tuple[tuple[str, Any], ...]]:
        return {chan: s.ending for chan, s in self.sessions.items() if s.ending is not None and not s.closed}


def _no_log(codes: tuple[str, ...], event: str, reason: str | None, remote_addr: str | None) -> None:
    pass


_DRIVERS: dict[str, CompiledDriver] = {}


def _default_driver() -> CompiledDriver:
    if "default" not in _DRIVERS:
        _DRIVERS["default"] = CompiledDriver(FUZZ_LIMITS)
    return _DRIVERS["default"]


def burst_alternatives(oracle: Oracle, chan: int, reqs: list[Req], tail: str | None) -> list[Oracle]:
    """Every way the server may interleave a burst (``reqs`` on channel ``chan``, then
    ``tail``: eof, close, disconnect, drop or None) with what it does asynchronously:
    the packets arrive in order; a pending start's verdict (the core answers it at
    once), and the deferred effect of the tail (asyncssh cleans up a closed channel
    or connection with call_soon) may come between them. Alternatives that the log
    and the wire cannot tell apart are one."""
    first = oracle.clone()
    if first.transport_gone or first._channel(chan) is None:
        return [first]
    starts = [first]
    if tail in ("disconnect", "drop"):
        # The client's socket is closed at once: from some send on (the peer's reset
        # came back), every send of the server fails.
        first.client_dropped = True
        starts = []
        for budget in (None, *range(len(reqs) + 2)):
            start = first.clone()
            start.send_budget = budget
            starts.append(start)
    results: dict[Any, Oracle] = {}
    seen: set[Any] = set()
    # (oracle, requests arrived, tail arrived, tail's deferred effect done)
    stack: list[tuple[Oracle, int, bool, bool]] = [(o, 0, tail is None, tail is None) for o in starts]
    while stack:
        o, arrived, tail_in, tail_done = stack.pop()
        key = (o.key(), arrived, tail_in, tail_done)
        if key in seen:
            continue
        seen.add(key)
        s = o.sessions[chan]
        moves: list[tuple[str, int, bool, bool]] = []
        if arrived < len(reqs):
            moves.append(("arrive", arrived + 1, tail_in, tail_done))
        if not tail_in and arrived == len(reqs):  # read after the requests
            moves.append(("tail", arrived, True, tail_done))
        if s.pending_start is not None:
            moves.append(("verdict", arrived, tail_in, tail_done))
        if tail_in and not tail_done and arrived == len(reqs):
            moves.append(("effect", arrived, tail_in, True))
        if s.ending and not s.closed and (o.client_dropped or (tail_in and not tail_done)):
            # The program may end before the server notices the client is gone or
            # its close (else the client sees the end: test_fuzz_live feeds it).
            moves.extend((f"end{n}", arrived, tail_in, tail_done) for n in range(len(s.ending)))
        if not moves:
            results.setdefault(o.signature(), o)
            continue
        for move, *after in moves:
            new = o.clone()
            ns = new.sessions[chan]
            if move == "arrive":
                new.arrive(ns, reqs[arrived])
            elif move == "verdict":
                new.resolve_start(ns)
            elif move == "tail":
                _tail_arrives(new, ns, tail)
            elif move.startswith("end"):
                assert ns.ending is not None
                kind, value = ns.ending[int(move[3:])]
                new.program_end(chan, kind, value)
            else:
                _tail_effect(new, ns, tail)
            stack.append((new, *after))  # type: ignore[arg-type]
    return list(results.values())


def _tail_arrives(o: Oracle, s: SessionModel, tail: str | None) -> None:
    if tail == "eof":
        s.client_eof = True
        o.eof_arrives(s)
    elif tail == "close":
        o.close_arrives(s)
    else:  # disconnect, drop: the transport is closed at once
        o.transport_gone = True


def _tail_effect(o: Oracle, s: SessionModel, tail: str | None) -> None:
    if tail == "close":
        o._session_close(s)
    elif tail in ("disconnect", "drop"):
        o.connection_lost("lost")



# --- what the fuzzers send -----------------------------------------------------------------------

USER, PASSWORD = "alice", "correct horse"  # tests/conftest.py's user

EXIT3 = Program("exec", True, False, 3, b"", b"")
ECHO = Program("exec", True, False, 0, b"hi\n", b"hi\r\n")
READ = Program("exec", True, True, 4)  # `read x; exit 4`: ends at the client's EOF
NUL_COMMAND = Program("exec", False, False, None)  # cannot be exec'd: the start fails
SHELL = Program("shell", True, True, None)  # the login shell: ends at EOF, its status unknown
SFTP = Program("subsystem", True, True, None)
NO_SUBSYSTEM = Program("subsystem", False, False, None)


def _req(name: bytes, code: str, event: str, **kw: Any) -> Req:
    payload = eval(code, globals()) if code else b""  # noqa: S307 - our own literals
    return Req(name, payload, event, code=code, **kw)


def _env(name: str, value: str) -> Req:
    return _req(b"env", f"env_payload({name!r}, {value!r})", "env", env=(name, value))


def _start(name: bytes, code: str, program: Program) -> Req:
    return _req(name, code, name.decode(), program=program)


START_REQUESTS: list[Req] = [
    _start(b"exec", 'exec_payload("exit 3")', EXIT3),
    _start(b"exec", 'exec_payload("echo hi")', ECHO),
    _start(b"exec", 'exec_payload("read x; exit 4")', READ),
    _start(b"exec", 'exec_payload("a\\0b")', NUL_COMMAND),
    _start(b"shell", "", SHELL),
    _start(b"subsystem", 'subsystem_payload("sftp")', SFTP),
    _start(b"subsystem", 'subsystem_payload("nope")', NO_SUBSYSTEM),
]

OTHER_REQUESTS: list[Req] = [
    _env("FOO", "bar"), _env("LANG", "C.UTF-8"), _env("LD_PRELOAD", "/tmp/evil.so"),
    _env("GLIBC_TUNABLES", "x"), _env("DYLD_INSERT_LIBRARIES", "x"), _env("1BAD", "x"), _env("A-B", "x"),
    _env("FOO", "a\0b"),
    _req(b"env", 'string("FOO")', "malformed_request"),
    _req(b"env", 'env_payload("FOO", "bar") + b"!"', "malformed_request"),
    _req(b"env", 'env_payload(b"FOO", b"\\xff")', "malformed_request"),
    _req(b"pty-req", "pty_payload()", "pty_req"),
    _req(b"pty-req", 'pty_payload("vt100", 120, 40, b"\\x35\\x00\\x00\\x00\\x01\\x00")', "pty_req"),
    _req(b"pty-req", "pty_payload()[:-3]", "malformed_request"),
    _req(b"pty-req", 'pty_payload(modes=b"\\x01\\x00")', "malformed_request"),
    _req(b"pty-req", 'pty_payload(b"\\xff")', "malformed_request"),
    _req(b"window-change", "window_change_payload()", "window_change"),
    _req(b"window-change", "window_change_payload()[:12]", "malformed_request"),
    _req(b"signal", 'signal_payload("KILL")', "signal", signal="KILL"),
    _req(b"signal", 'signal_payload("USR1")', "signal", signal="USR1"),
    _req(b"signal", 'signal_payload("STOP")', "signal", signal="STOP"),
    _req(b"signal", 'signal_payload("FOO")', "signal", signal="FOO"),
    _req(b"signal", 'signal_payload(b"\\xff")', "malformed_request"),
    _req(b"signal", 'signal_payload("KILL") + b"!"', "malformed_request"),
    _req(b"exec", 'exec_payload(b"\\xff\\xfe")', "malformed_request"),
    _req(b"exec", "", "malformed_request"),
    _req(b"shell", 'b"!"', "malformed_request"),
    _req(b"subsystem", 'b"\\x00\\x00"', "malformed_request"),
    _req(b"x11-req", "x11_payload()", "not_implemented"),
    _req(b"x11-req", "", "malformed_request"),
    _req(b"break", "break_payload()", "not_implemented"),
    _req(b"break", "", "malformed_request"),
    _req(b"auth-agent-req@openssh.com", "", "agent_denied"),
    _req(b"auth-agent-req@openssh.com", 'b"!"', "malformed_request"),
    _req(b"keepalive@openssh.com", "", "not_implemented"),
    _req(b"xon-xoff", "boolean(True)", "not_implemented"),
    _req(b"eow@openssh.com", "", "not_implemented"),
    _req(b"foo@example.com", 'b"anything"', "unknown_request"),
    _req(b"exit-status", "uint32(0)", "unknown_request"),
    _req(b"", "", "unknown_request"),
    _req(b"\xff", "", "malformed_request"),
]

REQUESTS: list[Req] = START_REQUESTS + OTHER_REQUESTS


def request_groups(reqs: list[Req]) -> list[list[Req]]:
    """The requests by kind (type, and well formed or not): a fuzzer picks a kind,
    then one of it, so that no kind is starved by the long tail of variants."""
    groups: dict[tuple[bytes, bool], list[Req]] = {}
    for r in reqs:
        malformed = r.event == "malformed_request"
        groups.setdefault((b"?" if malformed else r.name, malformed), []).append(r)
    return list(groups.values())

AUTHS: list[Auth] = [
    Auth("none", None, 'c.auth_none("alice")'),
    Auth("password", "ok", 'c.auth_password("alice", "correct horse")'),
    Auth("password", "bad", 'c.auth_password("alice", "wrong")'),
    Auth("password", "bad", 'c.auth_password("mallory", "correct horse")'),
    Auth("publickey", "ok", 'c.auth_publickey("alice", key)'),
    Auth("publickey", "bad", 'c.auth_publickey("alice", other_key)'),
    Auth("publickey", "bad", 'c.auth_publickey("alice", key, good_signature=False)'),
    Auth("publickey", "bad", 'c.auth_publickey("mallory", key)'),
    Auth("publickey", "bad", 'c.auth_publickey("alice", None, blob=b"garbage")'),
    Auth("query", "ok", 'c.auth_publickey("alice", key, signed=False)'),
    Auth("query", "bad", 'c.auth_publickey("alice", other_key, signed=False)'),
    Auth("query", "bad", 'c.auth_publickey("alice", None, signed=False, blob=b"garbage")'),
    Auth("kbdint", None, 'c.auth_kbdint("alice")'),
    Auth("kbdint_response", "ok", 'c.kbdint_respond("correct horse")'),
    Auth("kbdint_response", "bad", 'c.kbdint_respond("wrong")'),
    Auth("other", None, 'c.userauth("alice", "hostbased")'),
    Auth("other", None, 'c.userauth("alice", "gssapi-with-mic")'),
]


def send_auth(c: ProtocolClient, a: Auth, key: paramiko.PKey, other_key: paramiko.PKey) -> None:
    exec(a.code, {"c": c, "key": key, "other_key": other_key})  # noqa: S102 - our own literals
