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
closed (as every client does) and window adjusts. Every message the server sends
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


class ProtocolClient:
    """A raw SSH client over paramiko's transport (see the module docstring)."""

    def __init__(self, host: str, port: int, *, timeout: float = 10.0, wait: float = 5.0,
                 answer_close: bool = True) -> None:
        self.wait_timeout = wait  # bound for every wait on a reply
        self.answer_close = answer_close  # False: a server's CLOSE waits for our own `close`
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.local_port: int = self.sock.getsockname()[1]
        self.transport = paramiko.Transport(self.sock)
        self._cv = threading.Condition()
        self.received: list[tuple[int, str]] = []  # (message number, summary), for transcripts
        self.auth_replies: deque[str] = deque()
        self.all_auth_replies: list[str] = []
        self.global_replies: deque[str] = deque()
        self.all_global_replies: list[str] = []
        self.channels: dict[int, ClientChannel] = {}
        self.disconnect: tuple[int, str] | None = None  # (reason code, text) from the server
        self.ended = False  # the transport stopped (DISCONNECT, EOF or error)
        self.info_prompts: list[str] = []
        self.last_auth_method: str | None = None
        self._next_channel = 0
        self._cork: list[bytes] | None = None
        self._cork_lock = threading.Lock()
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

    def _read_message(self) -> tuple[int, Message]:
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
            self.global_replies.append(reply)
            self.all_global_replies.append(reply)
            note((ptype, reply))
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


class CompiledInstance:
    """A machine instance on the compiled table (what the server runs)."""

    __slots__ = ("machine", "inst")

    def __init__(self, machine: Any, inst: Any = None) -> None:
        self.machine = machine
        self.inst = inst if inst is not None else machine.new()

    @property
    def state(self) -> str:
        return self.inst.state  # type: ignore[no-any-return]

    def counters(self) -> dict[str, int]:
        return {c: getattr(self.inst, c) for c in self.machine.counters}

    def fire(self, event: str) -> tuple[tuple[str, ...], str | None]:
        step = self.machine.fire(self.inst, event)
        return step.codes, step.reply

    def clone(self) -> CompiledInstance:
        new = self.machine.new()
        new.state = self.inst.state
        for c in self.machine.counters:
            setattr(new, c, getattr(self.inst, c))
        return CompiledInstance(self.machine, new)


class ReferenceInstance:
    """A machine instance on the `transitions` build (the reference semantics)."""

    def __init__(self, loaded: Any, limits: dict[str, int]) -> None:
        from sshspec.fsm.machine import reference_machine
        self.counter_names = tuple(loaded.spec.counters)
        self.machine, self.model = reference_machine(loaded, limits)

    @property
    def state(self) -> str:
        return self.model.state  # type: ignore[attr-defined, no-any-return]

    def counters(self) -> dict[str, int]:
        return {c: getattr(self.model, c) for c in self.counter_names}

    def fire(self, event: str) -> tuple[tuple[str, ...], str | None]:
        emitted, replies = len(self.model.emitted), len(self.model.replies)
        self.model.trigger(event)  # type: ignore[attr-defined]
        reply = self.model.replies[-1] if len(self.model.replies) > replies else None
        return tuple(self.model.emitted[emitted:]), reply

    def clone(self) -> ReferenceInstance:
        raise NotImplementedError("the reference is never forked")


class CompiledDriver:
    def __init__(self, limits: dict[str, int] | None = None) -> None:
        from sshspec.fsm.machine import Machine
        self.limits = dict(limits or FUZZ_LIMITS)
        self.machines = {name: Machine.load(name, self.limits) for name in ("connection", "session")}

    def new(self, name: str) -> CompiledInstance:
        return CompiledInstance(self.machines[name])


class ReferenceDriver:
    """Reference instances are costly (~10 ms each): `release` puts them back for reuse."""

    def __init__(self, limits: dict[str, int] | None = None) -> None:
        from sshspec.fsm.spec import load_spec
        self.limits = dict(limits or FUZZ_LIMITS)
        self.loaded = {name: load_spec(name) for name in ("connection", "session")}
        self.pool: dict[str, list[ReferenceInstance]] = {"connection": [], "session": []}
        self.names: dict[int, str] = {}

    def new(self, name: str) -> ReferenceInstance:
        inst = self.pool[name].pop() if self.pool[name] else ReferenceInstance(self.loaded[name], self.limits)
        self.names[id(inst)] = name
        return inst

    def release(self, inst: ReferenceInstance) -> None:
        name = self.names[id(inst)]
        inst.machine.set_state(self.loaded[name].spec.initial, inst.model)
        for c in inst.counter_names:
            setattr(inst.model, c, 0)
        inst.model.emitted.clear()
        inst.model.replies.clear()
        self.pool[name].append(inst)


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


AUTH_EVENTS = {"none": "none_auth", "password": "password", "publickey": "publickey",
               "query": "publickey_query", "kbdint": "kbdint_begin", "other": "other_method"}


@dataclass
class _Overflow:
    replies: int


@dataclass
class SessionModel:
    """One session channel: its machine, and the adapter's request queue around it."""

    inst: Any
    client_id: int
    server_id: int
    queue: deque[Req | _Overflow] = field(default_factory=deque)
    held: int = 0
    busy: bool = False
    pending_start: Req | None = None  # a start whose backend verdict is still out
    verdict: bool | None = None  # that verdict, fired but not yet answered
    pty: bool = False
    eof_arrived: bool = False  # the server has the client's EOF (held until the program starts)
    started: bool = False  # session_started: reading resumed, the program runs (or ran)
    program: Program | None = None
    ending: tuple[tuple[str, Any], ...] | None = None  # the ends that may come: ("exit", status | None)
    # or ("signal", name); more than one when a fatal signal races the program's own exit
    ended: bool = False
    server_closed: bool = False  # the server sent its CLOSE: no reply can follow
    closed: bool = False  # the session machine got its close
    client_eof: bool = False
    client_close: bool = False
    data_before_start: bool = False
    history: list[tuple[str, str, str]] = field(default_factory=list)  # (state, event, state after)

    def clone(self) -> SessionModel:
        new = copy.copy(self)
        new.inst = self.inst.clone()
        new.history = list(self.history)
        new.queue = deque(_Overflow(q.replies) if isinstance(q, _Overflow) else q for q in self.queue)
        return new

    def key(self) -> tuple[Any, ...]:
        return (self.inst.state, tuple(self.inst.counters().items()), len(self.queue), self.held, self.busy,
                self.pending_start is not None, self.verdict, self.eof_arrived, self.started, self.ending,
                self.ended, self.server_closed, self.closed, self.pty)


class Oracle:
    """One connection as the specs say it goes (see the module docstring).

    ``log[key]`` holds the codes each machine logs (key "conn", or ("session", channelId)),
    ``wire[key]`` the replies the client must see (keys "auth", "global", "disconnect",
    ("open", chan), ("chan", chan), chan being the client's channel number).
    """

    def __init__(self, driver: Any, *, max_queued: int = MAX_QUEUED) -> None:
        self.driver = driver
        self.max_queued = max_queued
        self.conn = driver.new("connection")
        self.sessions: dict[int, SessionModel] = {}
        self.next_server_channel = 0
        self.log: dict[Any, list[str]] = {"conn": []}
        self.wire: dict[Any, list[str]] = {}
        self.trace: list[str] = []  # the events fired, for failure messages
        self.auth_final = False  # a connection-layer message followed the auth success
        self.transport_gone = False  # nothing can be sent to the client any more
        self.lost = False  # connection_lost was processed: nothing more happens
        self.client_dropped = False  # the client closed its socket: it answers nothing more
        self.answer_close = True  # the client answers a server's CLOSE at once (the engine: later)
        # After the client dropped: how many more sends succeed before one fails (the
        # peer's reset arrives at some point; None: they all do).
        self.send_budget: int | None = None

    def clone(self) -> Oracle:
        new = copy.copy(self)
        new.conn = self.conn.clone()
        new.sessions = {k: s.clone() for k, s in self.sessions.items()}
        new.log = {k: list(v) for k, v in self.log.items()}
        new.wire = {k: list(v) for k, v in self.wire.items()}
        new.trace = list(self.trace)
        return new

    def signature(self) -> tuple[Any, ...]:
        """What the log and the wire will show (alternatives with equal ones are one)."""
        return (tuple(sorted((repr(k), tuple(v)) for k, v in self.log.items())),
                tuple(sorted((repr(k), tuple(v)) for k, v in self.wire.items())),
                tuple(sorted((k, s.ending) for k, s in self.sessions.items() if s.ending)))

    def key(self) -> tuple[Any, ...]:
        return (self.signature(), self.conn.state, tuple(self.conn.counters().items()), self.transport_gone,
                self.lost, self.send_budget, tuple(sorted((k, s.key()) for k, s in self.sessions.items())))

    @property
    def state(self) -> str:
        return self.conn.state

    def _expect(self, key: Any, reply: str) -> None:
        self.wire.setdefault(key, []).append(reply)

    def _fire_conn(self, event: str) -> str | None:
        codes, reply = self.conn.fire(event)
        self.trace.append(f"connection.{event} -> {self.conn.state}")
        self.log["conn"].extend(codes)
        if reply in DISCONNECTS and not self.transport_gone:
            self._expect("disconnect", wire_of(reply))
            self.transport_gone = True
        return reply

    def _fire(self, s: SessionModel, event: str) -> str | None:
        before = s.inst.state
        codes, reply = s.inst.fire(event)
        s.history.append((before, event, s.inst.state))
        self.trace.append(f"session[{s.server_id}].{event} -> {s.inst.state}")
        self.log[("session", s.server_id)].extend(codes)
        return reply

    def open_sessions(self) -> list[SessionModel]:
        return [s for s in self.sessions.values() if not s.closed]

    # -- the connection

    def connected(self) -> None:
        self._fire_conn("connected")
        self._fire_conn("auth_begin")  # the key exchange is done before the client sends anything

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
        state = self.state
        if a.method == "kbdint_response":
            if state != "kbdint_round":
                self.protocol_error()  # no challenge is out
                return
            self._fire_conn("kbdint_response")
            if self.state == "checking":
                self._verdict(a.verdict)
            self._after_disconnect()
            return
        if state in ALIVE:
            # RFC 4252 5.1: ignored after success, until the client sends a connection-layer message
            if self.auth_final:
                self.protocol_error()
            else:
                self._fire_conn(AUTH_EVENTS[a.method])
            return
        reply = self._fire_conn(AUTH_EVENTS[a.method])
        if reply == "auth_failure":
            self._expect("auth", wire_of(reply))
        if self.state == "checking":
            if a.method == "kbdint":
                self._expect("auth", wire_of(self._fire_conn("challenge")))
            else:
                self._verdict(a.verdict)
        elif self.state == "querying":
            self._expect("auth", wire_of(self._fire_conn(f"auth_{a.verdict}")))
        self._after_disconnect()

    def _verdict(self, verdict: str | None) -> None:
        reply = self._fire_conn(f"auth_{verdict}")
        if self.state == "authenticated":
            reply = self._fire_conn("backend_accepted")
        if reply in ("auth_failure", "accept_user"):
            self._expect("auth", wire_of(reply))

    def _after_disconnect(self) -> None:
        # The server disconnected: its transport closes, connection_lost follows.
        if self.state == "closed" and not self.lost:
            self.connection_lost("lost")

    def global_request(self, *, malformed: bool = False, want_reply: bool = True) -> None:
        if self.transport_gone:
            return
        event = "global_request_malformed" if malformed else "global_request"
        if self.state not in ALIVE:
            # asyncssh refuses a connection-layer message before authentication by
            # itself: the adapter sees a protocol error.
            self._fire_conn("protocol_error")
            self._after_disconnect()
            return
        self.auth_final = True
        reply = self._fire_conn(event)
        if want_reply and reply is not None:
            self._expect("global", wire_of(reply))

    def open_channel(self, chan: int, *, session: bool, malformed: bool = False) -> None:
        """CHANNEL_OPEN from the client, its channel number ``chan``; ``malformed``: a
        type that is not ASCII, a maximum packet size of 0..."""
        if self.transport_gone:
            return
        event = ("channel_open_malformed" if malformed else
                 "session_open" if session else "channel_open_unsupported")
        if self.state not in ALIVE:
            # asyncssh refuses a connection-layer message before authentication by
            # itself: the adapter sees a protocol error.
            self._fire_conn("protocol_error")
            self._after_disconnect()
            return
        self.auth_final = True
        if event != "session_open":
            self._expect(("open", chan), wire_of(self._fire_conn(event)))
            return
        server_id = self.next_server_channel
        self.next_server_channel += 1
        reply = self._fire_conn("session_open")
        self._expect(("open", chan), wire_of(reply))
        if reply == "open_session":
            self.log[("session", server_id)] = []
            self.sessions[chan] = SessionModel(self.driver.new("session"), chan, server_id)

    def protocol_error(self) -> None:
        """The client broke the protocol: the server disconnects."""
        self.connection_lost("protocol_error")

    def drop(self) -> None:
        """The client disconnects (DISCONNECT or just closing the socket)."""
        self.client_dropped = True
        self.transport_gone = True
        self.connection_lost("lost")

    def connection_lost(self, event: str) -> None:
        """The transport is gone: every open session closes first, then the connection
        gets ``event`` (lost, protocol_error, login_timeout), as in the adapter."""
        if self.lost:
            return
        self.lost = True
        for s in self.open_sessions():
            self._session_close(s)
        self._fire_conn(event)
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
        if self.transport_gone:
            return
        s = self._channel(chan)
        if s is None:
            return
        self.arrive(s, req)
        self.settle(s)

    def request_arrives(self, chan: int, req: Req) -> SessionModel | None:
        """A channel request reaches the server; a start stays pending (see settle)."""
        if self.transport_gone:
            return None
        s = self._channel(chan)
        if s is not None:
            self.arrive(s, req)
        return s

    def settle(self, s: SessionModel) -> None:
        """Let every pending start get its verdict and its answer."""
        while s.pending_start is not None:
            if s.verdict is None:
                self.resolve_start(s)
            self.finish_start(s)

    def eof(self, chan: int) -> None:
        if self.transport_gone:
            return
        s = self._channel(chan, data=True)
        if s is not None:
            s.client_eof = True
            self.eof_arrives(s)

    def eof_arrives(self, s: SessionModel) -> None:
        s.eof_arrived = True
        if s.started:
            self._deliver_eof(s)  # else asyncssh holds it until the program starts

    def _deliver_eof(self, s: SessionModel) -> None:
        if self._fire(s, "client_eof") == "close_stdin" and s.program is not None \
                and s.program.waits_for_eof:
            self._due(s, ("exit", s.program.status))

    @staticmethod
    def _due(s: SessionModel, end: tuple[str, Any]) -> None:
        if s.ended or s.closed:
            return
        if s.ending is None:
            s.ending = (end,)
        elif end not in s.ending:
            s.ending = (*s.ending, end)

    def data(self, chan: int) -> None:
        if self.transport_gone:
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
        s.closed = True
        s.server_closed = True
        self._fire(s, "close")
        self._fire_conn("channel_closed")
        if self.state == "draining" and not self.open_sessions():
            self._fire_conn("drained")
            self._after_disconnect()

    # -- the request queue (HookedServerChannel's contract: one at a time, bounded)

    def arrive(self, s: SessionModel, req: Req) -> None:
        if s.held >= self.max_queued:
            self._fire(s, "request_overflow")
            if req.want_reply:
                tail = s.queue[-1] if s.queue else None
                if isinstance(tail, _Overflow):
                    tail.replies += 1
                else:
                    s.queue.append(_Overflow(1))
            return
        s.queue.append(req)
        s.held += 1
        self._pump(s)

    def _pump(self, s: SessionModel) -> None:
        while s.queue and not s.busy:
            head = s.queue[0]
            if isinstance(head, _Overflow):
                s.queue.popleft()
                for _ in range(head.replies):
                    self._reply(s, False)
                continue
            s.busy = True
            self._process(s, head)

    def _process(self, s: SessionModel, req: Req) -> None:
        before = s.inst.state
        reply = self._fire(s, req.event)
        if s.inst.state in PENDING and before not in PENDING:
            if req.event in START_EVENTS:
                s.pending_start = req  # the backend starts it asynchronously
                return
            ok = self._backend(s, req)
            reply = self._fire(s, "request_ok" if ok else "request_failed")
        self._finish(s, req, reply == "success")

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

    def resolve_start(self, s: SessionModel) -> None:
        """The backend's verdict on the pending start (fired; answered by finish_start)."""
        req = s.pending_start
        assert req is not None and req.program is not None and s.verdict is None
        reply = self._fire(s, "request_ok" if req.program.starts else "request_failed")
        s.verdict = reply == "success"

    def finish_start(self, s: SessionModel) -> None:
        """The pending start is answered; the queue moves on."""
        req, ok = s.pending_start, s.verdict
        assert req is not None and ok is not None
        s.pending_start, s.verdict = None, None
        self._finish(s, req, ok)
        self._pump(s)

    def _finish(self, s: SessionModel, req: Req, ok: bool) -> None:
        popped = s.queue.popleft()
        assert popped is req
        s.held -= 1
        s.busy = False
        if req.want_reply:
            self._reply(s, ok)
        if ok and req.event in START_EVENTS and not s.started and not s.closed:
            s.started = True
            if s.inst.state in RUNNING:
                assert req.program is not None
                s.program = req.program
                if not req.program.waits_for_eof:
                    self._due(s, ("exit", req.program.status))
            if s.eof_arrived:
                self._deliver_eof(s)

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

    def _reply(self, s: SessionModel, ok: bool) -> None:
        if s.server_closed or not self._can_send():
            self._fire(s, "reply_send_failed")
        else:
            self._expect(("chan", s.client_id), WIRE["success" if ok else "failure"])

    # -- the program's end (comes by itself)

    def program_end(self, chan: int, kind: str, value: Any) -> None:
        """The program ended: ``kind`` exit (value: status) or signal (value: name)."""
        s = self.sessions[chan]
        s.ended = True
        s.ending = None
        reply = self._fire(s, "program_exited" if kind == "exit" else "program_killed")
        if reply not in ("send_exit_status", "send_exit_signal") or s.server_closed:
            return  # nothing goes out on a channel the server already closed
        if not self._can_send():
            self._fire(s, "exit_send_failed")
        else:
            s.server_closed = True  # EOF, exit-status/exit-signal, CLOSE go out
            if not self.client_dropped and self.answer_close:
                self.close_arrives(s)  # the client answers CLOSE
                self._session_close(s)

    def exit_send_failed(self, chan: int) -> None:
        """The exit status could not be sent (the adapter's send raised)."""
        s = self.sessions[chan]
        if s.inst.state == "exited":
            self._fire(s, "exit_send_failed")

    # -- server-side connection events (what the live fuzzer cannot trigger at will)

    def keepalive(self, answered: bool) -> None:
        if self.lost or self.state not in ALIVE:
            return
        self._fire_conn("keepalive_due")
        if self.state == "closed":  # no answer to too many: the server disconnects
            self._after_disconnect()
        elif answered:
            self._fire_conn("keepalive_answered")

    def login_timeout(self) -> None:
        if not self.lost and self.state not in ALIVE and self.state != "closed":
            self.transport_gone = True  # asyncssh closes the socket itself
            self.connection_lost("login_timeout")

    def global_reply_failed(self) -> None:
        if not self.lost:
            self._fire_conn("reply_send_failed")

    def shutdown(self) -> None:
        """The server shuts down (adapters/server.py SpecConnection.shutdown)."""
        if self.lost:
            return
        self._fire_conn("shutdown")
        if self.state == "closed":
            self._after_disconnect()
            return
        if self.state != "draining":
            return
        if not self.open_sessions():
            self._fire_conn("drained")
            self._after_disconnect()
            return
        for s in self.open_sessions():
            if s.inst.state in RUNNING:
                self._due(s, ("signal", "TERM"))  # SIGTERM to the program; its end still goes out
            elif s.inst.state != "exited":
                s.server_closed = True  # the server closes a channel with no program

    def endings(self) -> dict[int, tuple[tuple[str, Any], ...]]:
        return {chan: s.ending for chan, s in self.sessions.items() if s.ending is not None and not s.closed}


def burst_alternatives(oracle: Oracle, chan: int, reqs: list[Req], tail: str | None) -> list[Oracle]:
    """Every way the server may interleave a burst (``reqs`` on channel ``chan``, then
    ``tail``: eof, close, disconnect, drop or None) with what it does asynchronously:
    the packets arrive in order; a pending start's verdict, its answer, and the
    deferred effect of the tail (asyncssh cleans up a closed channel or connection
    with call_soon) may come between them. Alternatives that the log and the wire
    cannot tell apart are one."""
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
            moves.append(("verdict" if s.verdict is None else "answer", arrived, tail_in, tail_done))
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
            elif move == "answer":
                new.finish_start(ns)
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
    _req(b"auth-agent-req@openssh.com", "", "not_implemented"),
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
