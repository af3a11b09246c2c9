"""adapters/asyncssh_internals.py: (a) the asyncssh privates it touches still exist with
the expected shape, (b) every hook works end to end with real clients (asyncssh and
paramiko) over real sockets on 127.0.0.1.

Raw / malformed packets come from client internals: paramiko's
`Transport._send_user_message(Message)` and asyncssh's `SSHClientChannel._make_request`,
`SSHChannel.send_packet` and `SSHClientConnection._make_global_request`.  Nothing is
mocked; synchronisation is by asyncio futures (paramiko's blocking calls run in
threads via asyncio.to_thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import io
import logging
import random
import socket
import struct
import threading
import typing
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncssh
import paramiko
import pytest
from asyncssh.packet import Boolean, Byte, String, UInt32
from hypothesis import given, settings
from hypothesis import strategies as st
from paramiko.common import (
    cMSG_CHANNEL_OPEN,
    cMSG_CHANNEL_REQUEST,
    cMSG_GLOBAL_REQUEST,
    cMSG_USERAUTH_REQUEST,
)
from paramiko.message import Message
from send_breaker import REACH_INS as SEND_BREAKER_REACH_INS
from send_breaker import BreakMode, break_send

from sshspec.adapters import asyncssh_internals as ai
from sshspec.adapters.asyncssh_internals import (
    ASYNCSSH_DEFAULT,
    AuthRequest,
    AuthResult,
    ChannelOpenRequest,
    ChannelRequest,
    ConnectionHooks,
    EnvRequest,
    ExecRequest,
    GlobalRequest,
    HookedServerChannel,
    KeepaliveResult,
    PtyRequest,
    ReplyFailure,
    RequestDecodeError,
    SignalRequest,
    WindowChange,
    connection_factory,
    connection_owner,
    decode_request,
    install_hooks,
    is_login_timeout,
    send_keepalive,
)
from sshspec.adapters.proxy_protocol import Listener

HOST_KEY = asyncssh.generate_private_key("ssh-ed25519")
GOOD_KEY = asyncssh.generate_private_key("ssh-ed25519")
OTHER_KEY = asyncssh.generate_private_key("ssh-ed25519")
TIMEOUT = 10.0  # safety net per test; nothing waits on it in a passing run


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(TIMEOUT):
            await main()

    asyncio.run(guarded())


def settle(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


# --------------------------------------------------------------------------- (a) compat


def test_asyncssh_version_is_in_vetted_range() -> None:
    low, high = ai.SUPPORTED_ASYNCSSH
    version = ai._version_tuple(asyncssh.__version__)
    assert low <= version < high, (
        f"asyncssh {asyncssh.__version__} is outside >=2.24.1,<2.25: the reach-ins in "
        "adapters/asyncssh_internals.py (see HACKS.md) must be re-vetted before upgrading")


@pytest.mark.parametrize("item", ai.REACH_INS,
                         ids=lambda i: f"{getattr(i.owner, '__name__', i.owner)}.{i.name}")
def test_reach_in_still_matches_installed_asyncssh(item: ai.ReachIn) -> None:
    problem = ai.check_reach_in(item)
    assert problem is None, f"asyncssh internals changed: {problem} (see HACKS.md)"


@pytest.mark.parametrize("item", SEND_BREAKER_REACH_INS,
                         ids=lambda i: f"{i.owner.__name__}.{i.name}: {i.source_has or 'signature'}")
def test_send_breaker_reach_in_still_matches_installed_asyncssh(item: ai.ReachIn) -> None:
    """tests/send_breaker.py (failure injection, HACKS.md section 6) is a tests-only reach-in."""
    problem = ai.check_reach_in(item)
    assert problem is None, f"asyncssh internals changed: {problem} (see HACKS.md section 6)"


def test_compat_checker_reports_missing_and_changed_things() -> None:
    conn_cls = asyncssh.SSHServerConnection
    assert "missing" in (ai.check_reach_in(ai.ReachIn(conn_cls, "_no_such_thing", ())) or "")
    changed = ai.check_reach_in(ai.ReachIn(conn_cls, "send_userauth_failure", ("x",)))
    assert changed is not None and "signature changed" in changed
    gone = ai.check_reach_in(ai.ReachIn(conn_cls, "_gone", attr_in=conn_cls.__init__))
    assert gone is not None and "no longer set" in gone
    moved = ai.check_reach_in(ai.ReachIn(conn_cls, "_login_timer_callback", (),
                                         source_has="something else"))
    assert moved is not None and "behaviour changed" in moved


def test_full_compat_check_passes() -> None:
    ai.assert_asyncssh_compat()  # dispatch tables + version + every reach-in


def test_the_bounded_zlib_decompressor_is_asyncssh_s_with_a_bound() -> None:
    """What replaces asyncssh's `_ZLibDecompress` after NEWKEYS (HACKS.md row 27): the same
    stream (asyncssh's own compressor's packets inflate alike, a sync-flushed stream
    across packets), at most MAX_DECOMPRESSED bytes a packet, None for corrupt data (as
    asyncssh's: CompressionError), DecompressionLimitError past the bound."""
    from asyncssh.compression import get_compressor, get_decompressor
    compressor, theirs = get_compressor(b"zlib@openssh.com"), get_decompressor(b"zlib@openssh.com")
    ours = ai._BoundedZlibDecompress()
    assert type(theirs) is asyncssh.compression._ZLibDecompress
    for payload in (b"x", bytes(1000), b"abc" * 5000, bytes(ai.MAX_DECOMPRESSED)):
        packet = compressor.compress(payload)
        assert packet is not None
        assert ours.decompress(packet) == theirs.decompress(packet) == payload
    bomb = compressor.compress(bytes(ai.MAX_DECOMPRESSED + 1))
    assert bomb is not None and len(bomb) < 1024
    with pytest.raises(ai.DecompressionLimitError, match="exceeds 262144 bytes"):
        ours.decompress(bomb)
    assert isinstance(ai.DecompressionLimitError("x"), asyncssh.ProtocolError)  # DISCONNECT 2
    assert ai._BoundedZlibDecompress().decompress(b"not zlib at all") is None
def test_connection_factory_serves_a_transport_accepted_elsewhere() -> None:
    """HACKS.md row 29: a connection made by `connection_factory` and given a
    transport with `set_protocol` + `connection_made` serves a real client; the
    peername set before connection_made is what its SSHServer sees; and
    `connection_owner` returns that SSHServer."""
    seen: list[tuple[asyncssh.SSHServer, Any]] = []
    made: list[asyncssh.SSHServerConnection] = []

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            seen.append((self, conn.get_extra_info("peername")))

        def begin_auth(self, username: str) -> bool:
            return False  # no auth: the connection is what is tested

    class Gate(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            conn = factory()
            made.append(conn)
            conn.set_extra_info(peername=("198.51.100.1", 4242))
            typing.cast(asyncio.Transport, transport).set_protocol(conn)
            conn.connection_made(transport)

    async def main() -> None:
        nonlocal factory
        factory = connection_factory(server_factory=Server, server_host_keys=[HOST_KEY], login_timeout=0)
        server = await asyncio.get_running_loop().create_server(Gate, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with await aconnect(port) as conn:  # key exchange and (no) auth went through
                assert conn.get_extra_info("server_version") == f"SSH-2.0-AsyncSSH_{asyncssh.__version__}"
                assert connection_owner(made[0]) is seen[0][0]  # (cleared once the connection is gone)
        finally:
            server.close()
            await server.wait_closed()

    factory: Any = None
    run(main)
    (_, peer), = seen
    assert peer == ("198.51.100.1", 4242)


# --------------------------------------------------------------------------- harness


def phase_of(state: ai.HookState) -> str:
    """How far a connection got (HACKS.md section 4), from the hooks' bookkeeping."""
    if state.authenticated:
        return "connected"
    if state.kex_count:
        return "auth"
    if state.conn.get_extra_info("client_version") is not None:
        return "kex"
    return "version"


class Ctx:
    """Per-test recorder.  Created inside the running loop."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.conns: list[asyncssh.SSHServerConnection] = []
        self.conn_made: asyncio.Future[asyncssh.SSHServerConnection] = loop.create_future()
        self.lost: asyncio.Future[tuple[BaseException | None, str]] = loop.create_future()
        self.auth_completed: asyncio.Future[None] = loop.create_future()
        self.sessions: list[AdapterSession] = []
        self.session_made: asyncio.Future[AdapterSession] = loop.create_future()
        self.hook_states: dict[asyncssh.SSHServerConnection, ai.HookState] = {}
        self.turn_events: list[Any] = []  # TurnServer's before_send calls, socket writes, abort

    def future(self) -> asyncio.Future[Any]:
        return self.loop.create_future()


class AdapterSession(asyncssh.SSHServerSession[bytes]):
    """What an adapter's session looks like: raw bytes, keeps control of its EOF."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.chan: HookedServerChannel | None = None
        self.data = b""
        self.started = ctx.future()
        self.eof = ctx.future()
        self.lost: asyncio.Future[BaseException | None] = ctx.future()
        self.paused = ctx.future()
        self.resumed = ctx.future()
        self.on_data: Callable[[bytes], None] | None = None

    def connection_made(self, chan: Any) -> None:
        self.chan = chan
        self.ctx.sessions.append(self)
        settle(self.ctx.session_made, self)

    def session_started(self) -> None:
        settle(self.started, True)

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.data += data
        if self.on_data is not None:
            self.on_data(data)

    def eof_received(self) -> bool:
        settle(self.eof, True)
        return True  # asyncssh would otherwise send our EOF for us

    def pause_writing(self) -> None:
        settle(self.paused, True)

    def resume_writing(self) -> None:
        settle(self.resumed, True)

    def connection_lost(self, exc: BaseException | None) -> None:
        settle(self.lost, exc)



class VerdictChannel(HookedServerChannel):
    """The channel as the adapter drives it, in miniature (sshspec's core does this for
    real, with its spec): each request's verdict, a bool or an awaitable of one, is
    answered in arrival order, one at a time; a start that succeeds starts the I/O and
    tells the session (`session_started`); a reply that cannot be sent is reported."""

    def __init__(self, conn: asyncssh.SSHServerConnection,
                 on_verdict: Callable[[HookedServerChannel, ChannelRequest], Any], *,
                 on_reply_failed: Callable[[HookedServerChannel, ReplyFailure], None] | None = None) -> None:
        super().__init__(conn, self._arrive)
        self._on_verdict = on_verdict
        self._on_reply_failed = on_reply_failed
        self._queue: deque[ChannelRequest] = deque()
        self._busy = False

    def _arrive(self, chan: HookedServerChannel, req: ChannelRequest) -> None:
        self._queue.append(req)
        self._pump()

    def _pump(self) -> None:
        while self._queue and not self._busy:
            req = self._queue[0]
            self._busy = True
            verdict = self._on_verdict(self, req)
            if inspect.isawaitable(verdict):
                asyncio.ensure_future(verdict).add_done_callback(
                    lambda fut, req=req: self._done(req, not fut.cancelled() and fut.exception() is None
                                                    and bool(fut.result())))
                return
            self._done(req, bool(verdict), pump=False)

    def _done(self, req: ChannelRequest, ok: bool, *, pump: bool = True) -> None:
        self._queue.popleft()
        self._busy = False
        if req.want_reply:
            problem = self.reply(ok)
            if problem is not None and self._on_reply_failed is not None:
                self._on_reply_failed(self, ReplyFailure(req, problem))
        if ok and req.type in ("shell", "exec", "subsystem") and self._conn is not None:
            session = self._session
            if session is not None and hasattr(session, "session_started"):
                session.session_started()
            self.start_io()
        if pump:
            self._pump()


class HookServer(asyncssh.SSHServer, ConnectionHooks):
    """asyncssh.SSHServer + ConnectionHooks, the way the adapter is meant to combine them.

    Default: no authentication (begin_auth -> False), every session accepted with a
    HookedServerChannel whose verdicts come from `self.on_request`.
    """

    max_pending_global = 32

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.ctx.hook_states[conn] = install_hooks(conn, self,
                                                   max_pending_global=self.max_pending_global)
        self.ctx.conns.append(conn)
        settle(self.ctx.conn_made, conn)

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.conn is not None
        settle(self.ctx.lost, (exc, phase_of(self.ctx.hook_states[self.conn])))

    def begin_auth(self, username: str) -> bool:
        return False

    def auth_completed(self) -> None:
        settle(self.ctx.auth_completed, None)

    # -- channel requests (per channel) --
    def on_request(self, chan: HookedServerChannel, req: ChannelRequest) -> Any:
        return req.type in ("shell", "exec", "pty-req", "env")

    def make_channel(self, conn: asyncssh.SSHServerConnection) -> HookedServerChannel:
        return VerdictChannel(conn, self.on_request)

    def on_channel_open(self, conn: asyncssh.SSHServerConnection,
                        req: ChannelOpenRequest) -> Any:
        if req.type == "session":
            return self.make_channel(conn), AdapterSession(self.ctx)
        return asyncssh.ChannelOpenError(asyncssh.OPEN_UNKNOWN_CHANNEL_TYPE, "unsupported")


@contextlib.asynccontextmanager
async def serve(ctx: Ctx, factory: Callable[[], asyncssh.SSHServer],
                **options: Any) -> AsyncIterator[int]:
    options.setdefault("login_timeout", 0)  # per-test safety net is asyncio.timeout
    acceptor = await asyncssh.listen("127.0.0.1", 0, server_factory=factory,
                                     server_host_keys=[HOST_KEY], config=None, **options)
    try:
        yield acceptor.get_port()
    finally:
        acceptor.close()
        for conn in ctx.conns:
            conn.abort()
        await acceptor.wait_closed()
        for conn in ctx.conns:
            await conn.wait_closed()


async def aconnect(port: int, **options: Any) -> asyncssh.SSHClientConnection:
    options.setdefault("client_keys", None)
    return await asyncssh.connect("127.0.0.1", port, known_hosts=None, config=None,
                                  username="alice", **options)


class ClientSession(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.data += data


async def exec_session(conn: asyncssh.SSHClientConnection, command: str = "cmd",
                       **kwargs: Any) -> tuple[asyncssh.SSHClientChannel, ClientSession]:
    chan, session = await conn.create_session(ClientSession, command, encoding=None, **kwargs)
    return chan, session


async def started_server_channel(ctx: Any, interactive: bool) -> tuple[Any, Any]:
    """The server's side of the session the client just opened, once its program started:
    (session, channel), the channel set interactive (a pty's) or not (bulk)."""
    server_session = await ctx.session_made
    await server_session.started
    chan = server_session.chan
    assert chan is not None
    chan.set_interactive(interactive)
    return server_session, chan


class PTransport:
    """A paramiko client Transport driven from asyncio (blocking calls in threads)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.t = paramiko.Transport(self.sock)

    async def start(self) -> PTransport:
        await asyncio.to_thread(self.t.start_client, timeout=TIMEOUT)
        return self

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def send_raw(self, *parts: tuple[str, Any]) -> None:
        """Send one message built field by field: ("byte", b"\\x62"), ("int", 5), ..."""
        m = Message()
        for kind, value in parts:
            getattr(m, "add_" + kind)(value)
        self.t._send_user_message(m)

    def close(self) -> None:
        self.t.close()
        self.sock.close()


@contextlib.asynccontextmanager
async def paramiko_client(port: int, *, auth_none: bool = True) -> AsyncIterator[PTransport]:
    client = PTransport(port)
    try:
        await client.start()
        if auth_none:
            await client.call(client.t.auth_none, "alice")
        yield client
    finally:
        await asyncio.to_thread(client.close)


# --------------------------------------------------------------------------- 1. channel requests


def test_session_requests_get_async_verdicts_and_data_flows_asyncssh_client() -> None:
    """env / pty-req / exec / window-change / unknown / signal reach one callback, each
    decoded; verdicts are futures or coroutines; exec starts data; exit-status arrives."""

    async def main() -> None:
        ctx = Ctx()
        seen: list[tuple[str | None, bool, Any]] = []

        class Server(HookServer):
            def on_request(self, chan: HookedServerChannel, req: ChannelRequest) -> Any:
                decoded = decode_request(req)
                seen.append((req.type, req.want_reply, decoded))
                if isinstance(decoded, SignalRequest):
                    async def stop() -> bool:  # coroutine verdict
                        chan.write(b"bye\n")
                        chan.exit(3)
                        return True
                    return stop()
                fut: asyncio.Future[bool] = ctx.future()  # future verdict, decided later
                ctx.loop.call_soon(settle, fut, req.type != "x-refused@example.com")
                return fut

        async with serve(ctx, lambda: Server(ctx)) as port, await aconnect(port) as conn:
            chan, client = await exec_session(
                conn, "run me", env={"LANG": "C.UTF-8"}, request_pty=True,
                term_type="xterm-256color", term_size=(80, 24, 640, 480),
                term_modes={53: 1, 128: 38400})
            server_session = await ctx.session_made
            await server_session.started  # exec accepted -> session_started()
            chan.write(b"hello")
            chan.write_eof()
            await server_session.eof
            assert server_session.data == b"hello"
            chan.change_terminal_size(100, 40)
            assert await chan._make_request(b"x-refused@example.com", String("x")) is False
            chan.send_signal("INT")
            await chan.wait_closed()
            assert chan.get_exit_status() == 3
            assert client.data == b"bye\n"

        assert seen == [
            ("env", False, EnvRequest("LANG", "C.UTF-8")),
            ("pty-req", True, PtyRequest("xterm-256color", 80, 24, 640, 480,
                                         {53: 1, 128: 38400})),
            ("exec", True, ExecRequest("run me")),
            ("window-change", False, WindowChange(100, 40, 0, 0)),
            ("x-refused@example.com", True, None),
            ("signal", False, SignalRequest("INT")),
        ]

    run(main)


def test_session_requests_paramiko_client_and_malformed_request_keeps_connection() -> None:
    async def main() -> None:
        ctx = Ctx()
        log: list[Any] = []
        decode_failed = ctx.future()

        class Server(HookServer):
            def on_request(self, chan: HookedServerChannel, req: ChannelRequest) -> bool:
                try:
                    decoded = decode_request(req)
                except RequestDecodeError as exc:
                    log.append(("decode failed", exc.request_type, exc.reason))
                    settle(decode_failed, req)
                    return False
                log.append(decoded)
                if decoded == ExecRequest("second"):
                    ctx.loop.call_soon(chan.exit, 0)
                return True

        async with serve(ctx, lambda: Server(ctx)) as port, paramiko_client(port) as pc:
            chan = await pc.call(pc.t.open_session)
            await pc.call(chan.get_pty, "vt100", 100, 30)
            await pc.call(chan.set_environment_variable, "FOO", "bar")
            await pc.call(chan.exec_command, "echo hi")
            await pc.call(chan.resize_pty, 120, 40)
            # window-change with one int instead of four, want_reply=True
            pc.send_raw(("byte", cMSG_CHANNEL_REQUEST), ("int", chan.remote_chanid),
                        ("string", "window-change"), ("boolean", True), ("int", 1))
            req = await decode_failed
            assert req.want_reply and req.type == "window-change"
            first = ctx.sessions[0]
            await first.lost  # paramiko closes a channel whose request failed (its policy)
            # ... but the connection is alive: a second session works end to end
            chan2 = await pc.call(pc.t.open_session)
            await pc.call(chan2.exec_command, "second")
            assert await pc.call(chan2.recv_exit_status) == 0
            assert pc.t.is_active()

        assert log[0] == PtyRequest("vt100", 100, 30, 0, 0, {})
        assert log[1:4] == [EnvRequest("FOO", "bar"), ExecRequest("echo hi"),
                            WindowChange(120, 40, 0, 0)]
        assert log[4] == ("decode failed", "window-change", "truncated rows")
        assert log[5] == ExecRequest("second")

    run(main)


def test_malformed_channel_requests_are_refused_without_disconnect() -> None:
    """Truncated, trailing garbage, wrong text, non-ASCII name, missing want_reply: each
    reaches the callback (which decodes and refuses) and the channel keeps working."""

    async def main() -> None:
        ctx = Ctx()
        outcomes: list[tuple[str | None, str | None, str]] = []

        class Server(HookServer):
            def on_request(self, chan: HookedServerChannel, req: ChannelRequest) -> bool:
                if req.seq == 0:  # the session's exec
                    return True
                try:
                    decode_request(req)
                except RequestDecodeError as exc:
                    outcomes.append((req.type, req.malformed, exc.reason))
                    return False
                outcomes.append((req.type, None, "ok"))
                return True

        async with serve(ctx, lambda: Server(ctx)) as port, await aconnect(port) as conn:
            chan, _ = await exec_session(conn)
            mk = chan._make_request
            assert await mk(b"env", String("A")) is False  # truncated
            assert await mk(b"env", String("A"), String("B"), b"junk") is False  # trailing
            assert await mk(b"env", String(b"\xff"), String("v")) is False  # not UTF-8
            assert await mk(b"pty-req", String("vt100"), UInt32(1), UInt32(2), UInt32(3),
                            UInt32(4), String(Byte(53) + b"\0\0")) is False  # short mode
            assert await mk(b"exec", UInt32(7)) is False  # wrong type (truncated string)
            assert await mk(b"\xff\xfe") is False  # undecodable request name
            # no want_reply byte at all: reported, and NOT answered (the client would
            # otherwise mis-attribute the reply to its next request)
            chan.send_packet(98, String("signal"))
            assert await mk(b"env", String("A"), String("B")) is True
            # connection alive: a new session works
            chan2, _ = await exec_session(conn, "again")
            chan2.close()

        assert outcomes == [
            ("env", None, "truncated value length"),
            ("env", None, "4 trailing byte(s)"),
            ("env", None, "name is not utf-8"),
            ("pty-req", None, "truncated value of terminal mode 53"),
            ("exec", None, "truncated command"),
            (None, "name is not ASCII", "name is not ASCII"),
            ("signal", "missing want_reply", "missing want_reply"),
            ("env", None, "ok"),
        ]

    run(main)


def test_other_standard_requests_reach_the_callback_decoded() -> None:
    """shell, subsystem, break, x11-req, auth-agent-req, keepalive: asyncssh would act
    on some of these itself (x11/agent forwarding, keepalive refusal); here the adapter
    sees and decides them all."""

    async def main() -> None:
        ctx = Ctx()
        decoded: list[Any] = []

        class Server(HookServer):
            def on_request(self, chan: HookedServerChannel, req: ChannelRequest) -> bool:
                decoded.append(decode_request(req))
                return req.type in ("shell", "break")

        async with serve(ctx, lambda: Server(ctx)) as port, await aconnect(port) as conn:
            chan = await conn.create_session(ClientSession, encoding=None)  # shell
            mk = chan[0]._make_request
            assert await mk(b"subsystem", String("sftp")) is False  # shell already on
            assert await mk(b"break", UInt32(500)) is True
            assert await mk(b"x11-req", Boolean(True), String("MIT-MAGIC-COOKIE-1"),
                            String("0123abcd"), UInt32(0)) is False
            assert await mk(b"auth-agent-req@openssh.com") is False
            assert await mk(b"keepalive@openssh.com") is False

        assert decoded == [
            ai.NoArgsRequest("shell"), ai.SubsystemRequest("sftp"), ai.BreakRequest(500),
            ai.X11Request(True, "MIT-MAGIC-COOKIE-1", "0123abcd", 0),
            ai.NoArgsRequest("auth-agent-req@openssh.com"),
            ai.NoArgsRequest("keepalive@openssh.com"),
        ]

    run(main)


@settings(max_examples=300, deadline=None)
@given(request_type=st.sampled_from(sorted(ai._DECODERS)), payload=st.binary(max_size=64))
def test_decoders_never_raise_anything_but_request_decode_error(request_type: str,
                                                               payload: bytes) -> None:
    req = ChannelRequest(0, request_type, request_type.encode(), True, payload)
    try:
        decode_request(req)
    except RequestDecodeError as exc:
        assert exc.request_type == request_type


def test_decoders_reject_trailing_bytes_and_accept_exact_payloads() -> None:
    good = {
        "env": String("A") + String("b"),
        "pty-req": String("vt100") + UInt32(80) + UInt32(24) + UInt32(0) + UInt32(0)
        + String(Byte(53) + UInt32(1) + Byte(0) + b"ignored after TTY_OP_END"),
        "shell": b"",
        "exec": String("ls"),
        "subsystem": String("sftp"),
        "window-change": UInt32(1) + UInt32(2) + UInt32(3) + UInt32(4),
        "signal": String("TERM"),
        "break": UInt32(0),
        "x11-req": Boolean(False) + String("p") + String("c") + UInt32(1),
        "auth-agent-req@openssh.com": b"",
        "keepalive@openssh.com": b"",
    }
    assert set(good) == set(ai._DECODERS)
    for name, payload in good.items():
        req = ChannelRequest(0, name, name.encode(), True, payload)
        assert decode_request(req) is not None
        with pytest.raises(RequestDecodeError, match="trailing"):
            decode_request(ChannelRequest(0, name, name.encode(), True, payload + b"!"))
    pty = decode_request(ChannelRequest(0, "pty-req", b"pty-req", True, good["pty-req"]))
    assert isinstance(pty, PtyRequest) and pty.modes == {53: 1}
    assert decode_request(ChannelRequest(0, "foo@x", b"foo@x", True, b"any")) is None


# --------------------------------------------------------------------------- 1b. failures


def test_reply_owed_on_closed_channel_is_reported() -> None:
    async def main() -> None:
        ctx = Ctx()
        held: asyncio.Future[asyncio.Future[bool]] = ctx.future()
        failures: list[ReplyFailure] = []
        reported = ctx.future()

        def on_reply_failed(chan: HookedServerChannel, failure: ReplyFailure) -> None:
            failures.append(failure)
            settle(reported, None)

        class Server(HookServer):
            def make_channel(self, conn: asyncssh.SSHServerConnection) -> HookedServerChannel:
                return VerdictChannel(conn, self.on_request, on_reply_failed=on_reply_failed)

            def on_request(self, chan: HookedServerChannel, req: ChannelRequest) -> Any:
                if req.type == "exec":
                    return True
                fut: asyncio.Future[bool] = ctx.future()
                settle(held, fut)
                return fut

        async with serve(ctx, lambda: Server(ctx)) as port, await aconnect(port) as conn:
            chan, _ = await exec_session(conn)
            reply = asyncio.ensure_future(chan._make_request(b"slow@example.com"))
            verdict = await held
            server_session = ctx.sessions[0]
            assert server_session.chan is not None
            server_session.chan.close()  # the adapter closes while a verdict is pending
            await server_session.lost
            verdict.set_result(True)
            await reported
            assert await reply is False  # asyncssh client: channel closed, no reply

        assert len(failures) == 1
        assert failures[0].reason == "channel closed" and failures[0].error is None
        assert isinstance(failures[0].request, ChannelRequest)
        assert failures[0].request.type == "slow@example.com"

    run(main)


def test_broken_send_of_request_reply_raise_mode_is_reported_and_connection_survives() -> None:
    async def main() -> None:
        ctx = Ctx()
        reported: asyncio.Future[ReplyFailure] = ctx.future()

        class Server(HookServer):
            def make_channel(self, conn: asyncssh.SSHServerConnection) -> HookedServerChannel:
                return VerdictChannel(conn, self.on_request,
                                      on_reply_failed=lambda ch, f: settle(reported, f))

            def on_request(self, chan: HookedServerChannel, req: ChannelRequest) -> bool:
                return True

        async with serve(ctx, lambda: Server(ctx)) as port, await aconnect(port) as conn:
            chan, _ = await exec_session(conn)
            server_conn = await ctx.conn_made
            undo = break_send(server_conn, pkttype=ai.MSG_CHANNEL_SUCCESS)
            lost_reply = asyncio.ensure_future(chan._make_request(b"x@example.com"))
            failure = await reported
            undo()
            assert failure.reason == "send failed"
            # the connection is alive (the client still waits for the lost reply)
            chan2, _ = await exec_session(conn, "again")
            assert not lost_reply.done()
            chan2.close()

    run(main)


def test_broken_send_lose_connection_mode_reaches_connection_lost() -> None:
    async def main() -> None:
        ctx = Ctx()
        reply_failures: list[ReplyFailure] = []
        boom = ConnectionResetError(104, "reset by test")

        class Server(HookServer):
            def make_channel(self, conn: asyncssh.SSHServerConnection) -> HookedServerChannel:
                return VerdictChannel(conn, self.on_request,
                                      on_reply_failed=lambda ch, f: reply_failures.append(f))

            def on_request(self, chan: HookedServerChannel, req: ChannelRequest) -> bool:
                return req.type == "exec"

        async with serve(ctx, lambda: Server(ctx)) as port, await aconnect(port) as conn:
            chan, _ = await exec_session(conn)
            break_send(await ctx.conn_made, pkttype=ai.MSG_CHANNEL_FAILURE,
                       mode="lose_connection", error=boom)
            [outcome] = await asyncio.gather(chan._make_request(b"x@example.com"),
                                             return_exceptions=True)
            assert isinstance(outcome, asyncssh.ConnectionLost)  # client: socket closed
            assert await ctx.sessions[0].lost is boom
            exc, phase = await ctx.lost
            assert exc is boom and phase == "connected"
        # asyncio swallowed the socket error; the channel notices right after the send
        failures = [(f.request.type, f.reason, f.error) for f in reply_failures]  # type: ignore[union-attr]
        assert failures == [("x@example.com", "send failed", None)]

    run(main)


@pytest.mark.parametrize("mode", ["raise", "lose_connection"])
def test_broken_send_of_exit_status(mode: BreakMode) -> None:
    async def main() -> None:
        ctx = Ctx()
        exit_error: asyncio.Future[BaseException | None] = ctx.future()
        boom = BrokenPipeError(32, "exit-status broken by test")

        class Server(HookServer):
            def on_request(self, chan: HookedServerChannel, req: ChannelRequest) -> bool:
                if req.type != "exec":
                    return False

                def finish() -> None:
                    assert self.conn is not None
                    break_send(self.conn, pkttype=ai.MSG_CHANNEL_REQUEST,
                               channel_request="exit-status", mode=mode, error=boom)
                    try:
                        chan.exit(7)
                    except OSError as exc:
                        settle(exit_error, exc)
                        assert not chan.is_closing()  # exit() raised before close()
                        chan.close()  # the adapter's fallback
                    else:
                        settle(exit_error, None)

                ctx.loop.call_soon(finish)
                return True

        async with serve(ctx, lambda: Server(ctx)) as port, await aconnect(port) as conn:
            chan, _ = await exec_session(conn)
            await chan.wait_closed()
            assert chan.get_exit_status() is None  # exit-status never reached the client
            if mode == "raise":
                assert await exit_error is boom
                assert await ctx.sessions[0].lost is None  # clean close after the fallback
                assert not conn.is_closed()
            else:
                assert await exit_error is None  # the failure is not synchronous...
                assert await ctx.sessions[0].lost is boom  # ...it is a lost connection
                assert (await ctx.lost)[0] is boom

    run(main)


def test_flow_control_pause_and_resume_writing() -> None:
    """The client stops reading -> its window closes -> our buffer passes the high-water
    mark -> session.pause_writing(); it reads again -> resume_writing()."""

    async def main() -> None:
        ctx = Ctx()
        payload = bytes(range(256)) * 1024  # 256 KiB

        class PausedClient(ClientSession):
            def connection_made(self, chan: Any) -> None:
                self.chan = chan
                chan.pause_reading()

        async with serve(ctx, lambda: HookServer(ctx)) as port, await aconnect(port) as conn:
            chan, client = await conn.create_session(PausedClient, "cat", encoding=None,
                                                     window=16384)
            server_session = await ctx.session_made
            await server_session.started
            assert server_session.chan is not None
            server_session.chan.write(payload)
            await server_session.paused  # 16 KiB window, 64 KiB high-water mark
            assert not server_session.resumed.done()
            chan.resume_reading()
            await server_session.resumed
            server_session.chan.exit(0)
            await chan.wait_closed()
            assert client.data == payload

    run(main)


def _sent(caplog: pytest.LogCaptureFixture, name: str) -> int:
    return sum(f"Sent {name} " in r.getMessage() for r in caplog.records
               if r.name.startswith("asyncssh"))


@pytest.mark.parametrize("interactive", [True, False])
def test_ignore_before_each_packet_only_on_interactive_channels(
        caplog: pytest.LogCaptureFixture, interactive: bool) -> None:
    """asyncssh sends an empty IGNORE before every packet (HACKS.md row 33): kept for an
    interactive channel (a pty's keystrokes), dropped for a bulk one; the data arrives
    whole either way."""
    payload = bytes(range(256)) * 512  # 128 KiB: 4 packets of 32 KiB

    async def main() -> None:
        ctx = Ctx()
        async with serve(ctx, lambda: HookServer(ctx)) as port, await aconnect(port) as conn:
            chan, client = await exec_session(conn, "cat")
            server_session = await ctx.session_made
            await server_session.started
            assert server_session.chan is not None
            server_session.chan.set_interactive(interactive)
            caplog.set_level(logging.DEBUG, logger="asyncssh")
            asyncssh.set_debug_level(3)
            try:
                server_session.chan.write(payload)
                server_session.chan.exit(0)
                await chan.wait_closed()
            finally:
                asyncssh.set_debug_level(1)
            assert client.data == payload

    run(main)
    # Logged from the write on, both ends (one process): the server's 4 data packets,
    # exit-status and CLOSE, and the client's CLOSE, which stock asyncssh (the client)
    # precedes with an IGNORE.
    data = _sent(caplog, "MSG_CHANNEL_DATA")
    assert data == 4
    ignores = _sent(caplog, "MSG_IGNORE")
    client_packets = 1
    if interactive:
        assert ignores == data + 2 + client_packets  # + exit-status, CLOSE
    else:
        assert ignores == client_packets


class TurnServer(HookServer):
    """HookServer whose connections record, in `ctx.turn_events`, each `before_send`
    call ("log"), each write to the socket transport (its size) and the transport's
    abort, in the order they happen."""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        events = self.ctx.turn_events
        self.conn = conn
        self.ctx.hook_states[conn] = install_hooks(conn, self, before_send=lambda: events.append("log"))
        self.ctx.conns.append(conn)
        settle(self.ctx.conn_made, conn)


def record_transport(ctx: Ctx, conn: asyncssh.SSHServerConnection) -> None:
    transport = conn._transport  # test reach-in (HACKS.md row 15)
    write, abort = transport.write, transport.abort

    def counting_write(data: Any) -> None:
        ctx.turn_events.append(len(data))
        write(data)

    def recorded_abort() -> None:
        ctx.turn_events.append("abort")
        abort()

    transport.write, transport.abort = counting_write, recorded_abort


def test_one_turn_of_packets_is_one_socket_write_after_before_send() -> None:
    """The packets a connection sends in one turn of the event loop (a write, a window
    adjust letting held data go) are held and reach the socket in one write, in order,
    at the end of that turn, after `before_send` (a durable log's write: HACKS.md row
    32). `asyncio.sleep(0)` is one turn of the loop: the turn's end was queued first."""
    payload = bytes(range(256)) * 1024  # 256 KiB: 8 packets of 32 KiB

    async def main() -> None:
        ctx = Ctx()
        async with serve(ctx, lambda: TurnServer(ctx)) as port, await aconnect(port) as conn:
            chan, client = await exec_session(conn, "cat", window=96 * 1024)
            server_session = await ctx.session_made
            await server_session.started
            assert server_session.chan is not None
            record_transport(ctx, ctx.conns[0])
            ctx.turn_events.clear()
            server_session.chan.write(payload)
            assert ctx.turn_events == []  # held until the turn ends
            await asyncio.sleep(0)
            # the window (96 KiB) lets 3 packets go: one write, the rest waits
            assert len(ctx.turn_events) == 2 and ctx.turn_events[0] == "log"
            assert ctx.turn_events[1] > 96 * 1024
            server_session.chan.exit(0)
            await chan.wait_closed()
            assert client.data == payload
            # each window adjust of the client let its packets go in one write, the log first
            writes = [e for e in ctx.turn_events if isinstance(e, int)]
            assert len(writes) < 8
            assert all(e == "log" for e in ctx.turn_events[0::2])

    run(main)


def test_a_disconnect_goes_out_at_once_and_held_packets_before_an_abort() -> None:
    """A DISCONNECT is written when it is sent, with what the turn held before it and
    after `before_send` (asyncssh closes the connection right after it); packets held
    when the connection is aborted are written before the abort (asyncssh forgets its
    transport at once and aborts it from a later callback)."""

    async def main() -> None:
        for how in ("disconnect", "abort"):
            ctx = Ctx()
            async with serve(ctx, functools.partial(TurnServer, ctx)) as port, \
                    await aconnect(port) as conn:
                chan, client = await exec_session(conn, "cat")
                server_session = await ctx.session_made
                await server_session.started
                assert server_session.chan is not None
                server_conn = ctx.conns[0]
                record_transport(ctx, server_conn)
                ctx.turn_events.clear()
                server_session.chan.write(b"last words")
                if how == "disconnect":
                    server_conn.disconnect(asyncssh.DISC_BY_APPLICATION, "bye")
                    assert ctx.turn_events[:1] == ["log"] and len(ctx.turn_events) == 2
                else:
                    server_conn.abort()
                    assert ctx.turn_events == []
                await conn.wait_closed()
                assert ctx.turn_events[:2] == ["log", ctx.turn_events[1]]
                assert isinstance(ctx.turn_events[1], int) and ctx.turn_events[2:] == ["abort"]
                assert client.data == b"last words"

    run(main)


def test_a_key_exchange_in_the_middle_of_a_flush_holds_the_data_it_cuts() -> None:
    """A re-key starts in the middle of a corked flush (rekey_bytes passed): asyncssh
    holds the channel's packets until it ends; what it holds are copies, so the data
    arrives whole and in order after the new keys (a 1 GiB download with the default
    rekey_bytes ended in a broken connection before)."""
    payload = bytes(range(256)) * 4096  # 1 MiB, about 10 re-keys

    async def main() -> None:
        ctx = Ctx()
        async with serve(ctx, lambda: HookServer(ctx), rekey_bytes=100_000) as port, \
                await aconnect(port) as conn:
            chan, client = await exec_session(conn, "cat")
            server_session = await ctx.session_made
            await server_session.started
            assert server_session.chan is not None
            server_session.chan.set_interactive(False)
            for i in range(0, len(payload), 65536):
                server_session.chan.write(payload[i:i + 65536])
            server_session.chan.exit(0)
            await chan.wait_closed()
            assert client.data == payload
            assert ctx.hook_states[ctx.conns[0]].kex_count > 5

    run(main)


# Every cipher and MAC shape the send and receive ports meet: AES-GCM (the sealer, the
# GCM receive branch), chacha20 (its own header decryption), CTR with an EtM MAC and with
# a MAC over the plaintext (asyncssh's stateful decrypt_header), and zlib on top.
_WIRE_SHAPES = [
    pytest.param({"encryption_algs": ["aes128-gcm@openssh.com"]}, id="aes128-gcm"),
    pytest.param({"encryption_algs": ["aes256-gcm@openssh.com"]}, id="aes256-gcm"),
    pytest.param({"encryption_algs": ["chacha20-poly1305@openssh.com"]}, id="chacha20"),
    pytest.param({"encryption_algs": ["aes128-ctr"], "mac_algs": ["hmac-sha2-256-etm@openssh.com"]},
                 id="ctr-etm"),
    pytest.param({"encryption_algs": ["aes128-ctr"], "mac_algs": ["hmac-sha2-256"]}, id="ctr-hmac"),
    pytest.param({"encryption_algs": ["aes128-ctr"], "mac_algs": ["umac-128-etm@openssh.com"]},
                 id="ctr-umac"),
    pytest.param({"encryption_algs": ["aes128-gcm@openssh.com"], "compression_algs": ["zlib"]},
                 id="gcm-zlib"),
]


class SplitClient(ClientSession):
    def __init__(self) -> None:
        super().__init__()
        self.stderr = b""

    def data_received(self, data: bytes, datatype: Any) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.stderr += data
        else:
            self.data += data


@pytest.mark.parametrize("algs", _WIRE_SHAPES)
def test_a_stream_each_way_through_re_keys_arrives_whole(
        algs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Data both ways across about ten re-keys, for each cipher shape: downloads through
    the data sealer (AES-GCM) or asyncssh's send_packet, uploads through the ported packet
    parsers, which read at an offset and cut the buffer once per read (HACKS.md row 35).
    The client's 2 MiB window lets many packets arrive in one read. A download write of
    ~6 packets meets a re-key inside it: the sealer seals the packets before it and
    send_packet takes the rest."""
    payload = random.Random(17).randbytes(1_000_003)  # incompressible (zlib), not a packet multiple
    cut_by_re_key = []  # flush entries the sealer sealed only in part
    new_sealer = ai._new_sealer

    def counted(*args: Any) -> Any:
        send = new_sealer(*args)

        def seal(view: memoryview, cuts: list[tuple[int, int]], datatype: int | None) -> int:
            assert send is not None
            sealed = send(view, cuts, datatype)
            if 0 < sealed < len(cuts):
                cut_by_re_key.append(sealed)
            return sealed
        return None if send is None else seal

    monkeypatch.setattr(ai, "_new_sealer", counted)

    async def main() -> None:
        ctx = Ctx()
        async with serve(ctx, lambda: HookServer(ctx), rekey_bytes=100_000, **algs) as port, \
                await aconnect(port, **algs) as conn:
            chan, client = await conn.create_session(SplitClient, "cat", encoding=None)
            server_session = await ctx.session_made
            await server_session.started
            assert server_session.chan is not None
            server_session.chan.set_interactive(False)
            got_all = ctx.future()
            server_session.on_data = lambda _d: (len(server_session.data) >= len(payload)
                                                 and settle(got_all, True))
            for i in range(0, len(payload), 100_000):
                chan.write(payload[i:i + 100_000])
            await got_all
            assert server_session.data == payload
            for i in range(0, len(payload), 200_000):
                server_session.chan.write(payload[i:i + 200_000])
                server_session.chan.write_stderr(payload[i:i + 999])
            server_session.chan.exit(0)
            await chan.wait_closed()
            assert client.data == payload
            assert client.stderr == b"".join(payload[i:i + 999] for i in range(0, len(payload), 200_000))
            gcm = "gcm" in algs["encryption_algs"][0] and "compression_algs" not in algs
            assert bool(cut_by_re_key) is gcm
            state = ctx.hook_states[ctx.conns[0]]
            assert state.kex_count > 5
            # everything read was parsed: the buffer was let go (test reach-in, row 35)
            assert state.inpos == 0 and ctx.conns[0]._inpbuf == b""

    run(main)


@pytest.mark.parametrize("mac_alg", [b"umac-64-etm@openssh.com", b"umac-128-etm@openssh.com",
                                     b"umac-128@openssh.com"])
def test_a_keyed_umac_tags_every_packet_as_asyncssh_does(mac_alg: bytes) -> None:
    """_KeyedUMAC (HACKS.md row 37) keeps one nettle context where asyncssh's _UMAC keys
    a new one per packet: the same tag for every sequence number (the nonce, up to 2^64
    - 1) and size, one packet after another on the one context, whether the sequence
    number jumps or counts on (nettle then counts the nonce itself: odd and even starts,
    SSH's wrap from 2^32 - 1 to 0), and a tag for another packet, sequence number or key
    refused."""
    key_size, _, _ = asyncssh.mac.get_mac_params(mac_alg)
    rng = random.Random(37)
    key = rng.randbytes(key_size)
    stock = asyncssh.mac.get_mac(mac_alg, key)
    keyed = ai._KeyedUMAC(stock)
    other = ai._KeyedUMAC(asyncssh.mac.get_mac(mac_alg, rng.randbytes(key_size)))
    edges = [0, 1, 255, 256, 257, 2**32 - 1, 2**32, 2**63, 2**64 - 1]
    counting = [*range(300), *range(2**32 - 5, 2**32), *range(7), *range(1001, 1300),
                *range(2**32 - 4, 2**32)]
    for seq in [*edges, *(rng.getrandbits(64) for _ in range(20)), *counting, *counting]:
        packet = rng.randbytes(rng.choice([0, 1, 15, 16, 17, 1023, 1024, 1025, 32_768, 35_000]))
        tag = stock.sign(seq, packet)
        assert keyed.sign(seq, packet) == tag
        assert keyed.verify(seq, packet, tag) and stock.verify(seq, packet, keyed.sign(seq, packet))
        assert not keyed.verify(seq ^ 1, packet, tag)
        assert not keyed.verify(seq, packet + b"x", tag)
        assert not other.verify(seq, packet, tag)


@pytest.mark.parametrize(("algs", "keyed"), [
    pytest.param({"encryption_algs": ["aes128-ctr"], "mac_algs": ["umac-128-etm@openssh.com"]}, True,
                 id="ctr-umac"),
    pytest.param({"encryption_algs": ["aes128-ctr"], "mac_algs": ["hmac-sha2-256-etm@openssh.com"]}, False,
                 id="ctr-hmac"),
    pytest.param({"encryption_algs": ["chacha20-poly1305@openssh.com"]}, False, id="chacha20")])
def test_a_busy_umac_connection_keys_its_macs_once_and_every_packet_arrives(
        algs: dict[str, Any], keyed: bool) -> None:
    """A CTR + UMAC connection (what an OpenSSH client gets by default) keeps asyncssh's
    per-packet UMAC for its first _KEEP_AFTER packets each way, then the keyed one
    (HACKS.md row 37): hundreds of small packets each way arrive whole and in order
    across the switch, made once per direction. Past _KEEP_AFTER an HMAC stays
    asyncssh's, and chacha20-poly1305 (no MAC object of its own) goes on as it was."""
    pieces = [bytes([i % 251]) * (1 + i % 97) for i in range(2 * ai._KEEP_AFTER)]

    async def main() -> None:
        ctx = Ctx()
        async with serve(ctx, lambda: HookServer(ctx), **algs) as port, \
                await aconnect(port, **algs) as conn:
            chan, client = await conn.create_session(SplitClient, "cat", encoding=None)
            server_session = await ctx.session_made
            await server_session.started
            assert server_session.chan is not None
            server = ctx.conns[0]
            mac_type = type(getattr(server._send_encryption, "_mac", None))
            assert mac_type is not ai._KeyedUMAC  # not keyed yet
            after = ai._KeyedUMAC if keyed else mac_type
            got_all = ctx.future()
            wanted = sum(map(len, pieces))
            server_session.on_data = lambda _d: (len(server_session.data) >= wanted and settle(got_all, True))
            for piece in pieces:  # a packet each (each write goes out at once, window allowing)
                chan.write(piece)
                await asyncio.sleep(0)
            await got_all
            assert server_session.data == b"".join(pieces)
            assert server._recv_seq > ai._KEEP_AFTER
            assert type(getattr(server._recv_encryption, "_mac", None)) is after
            for piece in pieces:
                server_session.chan.write(piece)
                await asyncio.sleep(0)
            server_session.chan.exit(0)
            await chan.wait_closed()
            assert client.data == b"".join(pieces)
            assert server._send_seq > ai._KEEP_AFTER
            assert type(getattr(server._send_encryption, "_mac", None)) is after

    run(main)


@pytest.mark.parametrize("wrap", [False, True], ids=["iv", "iv-wraps"])
@pytest.mark.parametrize("busy", [False, True], ids=["fresh-key", "busy-key"])
@pytest.mark.parametrize("interactive", [False, True], ids=["bulk", "pty"])
@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"])
def test_the_data_sealer_sends_the_bytes_send_packet_would(
        cipher: str, interactive: bool, busy: bool, wrap: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sealer (HACKS.md row 35) is a shortcut through asyncssh's send_packet for data
    packets (and, on a pty's channel, the IGNORE before each, row 33): from the same keys,
    IV, sequence number and padding, one flush of stdout and stderr data gives byte for
    byte the wire bytes the general path gives, each flush's packets in one buffer. The
    sealer counts the GCM nonce itself: also when its 64-bit counter wraps mid-flush."""
    payload = bytes(range(256)) * 300  # 75 KiB: packets of 32, 32 and 11 KiB

    async def main() -> None:
        ctx = Ctx()
        async with serve(ctx, lambda: HookServer(ctx)) as port, \
                await aconnect(port, encryption_algs=[cipher]) as conn:
            await exec_session(conn, "cat")
            server_session, chan = await started_server_channel(ctx, interactive)
            server_conn: Any = ctx.conns[0]
            state = ctx.hook_states[server_conn]
            cipher_obj = server_conn._send_encryption._cipher  # test reach-ins (row 35)
            state.pad, state.pad_pos = bytes(range(256)) * 64, 0
            if busy:  # past ai._KEEP_AFTER packets: the AESGCM and the sealer are kept
                server_conn._send_seq = ai._KEEP_AFTER + 1000
            if wrap:  # the nonce's invocation counter two packets before it wraps to 0
                cipher_obj._iv = cipher_obj._iv[:4] + (2**64 - 2).to_bytes(8, "big")
            start = (cipher_obj._iv, server_conn._send_seq, server_conn._rekey_bytes_sent)
            wire: list[bytes] = []
            server_conn._transport.write = lambda data: wire.append(bytes(data))

            held: list[int] = []

            def flush() -> bytes:
                cipher_obj._iv, server_conn._send_seq, server_conn._rekey_bytes_sent = start
                state.pad_pos = 0
                wire.clear()
                chan.write(payload)
                chan.write_stderr(payload[:5000])
                held.append(len(state.corked))
                ai.send_now(server_conn)  # what the turn holds, written now (row 32)
                return b"".join(wire)

            used: list[bool] = []
            sealer = ai._data_sealer

            def watched(ch: HookedServerChannel) -> Any:
                fast = sealer(ch)
                used.append(fast is not None)
                return fast

            monkeypatch.setattr(ai, "_data_sealer", watched)
            sealed = flush()
            assert used == [True, True]  # stdout's flush, stderr's flush
            assert held == [2]  # each flush's packets sealed into one buffer
            assert (chan._hk_sealer[1] is not None) is busy  # kept only for a busy key
            assert hasattr(cipher_obj, "_hk_aead") is busy
            server_conn._transport, transport = None, server_conn._transport
            assert sealer(chan) is None  # the connection let its transport go: nothing to hold
            server_conn._transport = transport
            general = server_conn.send_packet
            server_conn.send_packet = lambda *a, **k: general(*a, **k)  # sealer steps aside
            by_send_packet = flush()
            assert used[2:] == [False, False]
            assert held[1] > 2  # send_packet holds each packet's parts on their own
            assert sealed == by_send_packet
            assert len(sealed) > len(payload) + 5000 + (4 * 48 if interactive else 0)
            if wrap:  # past the wrap, both paths went on from 0
                assert int.from_bytes(cipher_obj._iv[4:], "big") == (4 * (2 if interactive else 1)) - 2
            conn.abort()  # the client saw none of this: its sequence numbers are behind

    run(main)


def test_a_long_stream_each_way_keeps_one_aead_per_key() -> None:
    """Past ai._KEEP_AFTER packets into a key, the AESGCM object is built once and kept on
    the cipher, each way (HACKS.md row 35); an idle session's few packets keep none (no
    OpenSSL contexts held for ever). The data arrives whole either way."""
    payload = random.Random(5).randbytes(12 << 20)  # ~400 packets of 32 KiB each way

    async def main() -> None:
        ctx = Ctx()
        algs = {"encryption_algs": ["aes128-gcm@openssh.com"]}
        async with serve(ctx, lambda: HookServer(ctx), **algs) as port, \
                await aconnect(port, **algs) as conn:
            chan, client = await exec_session(conn, "cat")
            server_session, chan_s = await started_server_channel(ctx, False)
            server_conn: Any = ctx.conns[0]
            send_cipher = server_conn._send_encryption._cipher  # test reach-ins (row 35)
            recv_cipher = server_conn._recv_encryption._cipher
            assert not hasattr(send_cipher, "_hk_aead") and not hasattr(recv_cipher, "_hk_aead")
            got_all = ctx.future()
            server_session.on_data = lambda _d: (len(server_session.data) >= len(payload)
                                                 and settle(got_all, True))
            chan.write(payload)
            await got_all
            assert server_session.data == payload
            assert hasattr(recv_cipher, "_hk_aead")
            chan_s.write(payload)
            chan_s.exit(0)
            await chan.wait_closed()
            assert client.data == payload
            assert hasattr(send_cipher, "_hk_aead") and chan_s._hk_sealer[1] is not None

    run(main)


def test_write_queues_bytes_uncopied_and_copies_what_may_change() -> None:
    """HookedServerChannel.write (HACKS.md row 35) queues a bytes object as it is (the flush
    cuts views of it; a window-held rest is cut once), but copies a bytearray: its owner
    may reuse it before the window lets it go, and the client must get what was written."""
    held = bytes(range(256)) * 256  # 64 KiB, more than the 16 KiB window

    async def main() -> None:
        ctx = Ctx()
        async with serve(ctx, lambda: HookServer(ctx)) as port, await aconnect(port) as conn:
            chan, client = await exec_session(conn, "cat", window=16384)
            server_session, chan_s = await started_server_channel(ctx, False)
            chan_s.write(held)
            queued = chan_s._send_buf  # test reach-in (row 35)
            assert queued and queued[0][0] == held[16384:] and type(queued[0][0]) is bytes
            reused = bytearray(b"A" * 1000)
            chan_s.write(reused)
            reused[:] = b"B" * 1000  # the owner reuses its buffer at once
            chan_s.exit(0)
            await chan.wait_closed()
            assert client.data == held + b"A" * 1000

    run(main)


def test_padding_is_csprng_output_used_once_in_growing_blocks() -> None:
    state = ai.HookState(typing.cast(Any, None), ConnectionHooks(), 1)
    pieces = [ai._padding(state, 4 + i % 16) for i in range(2000)]
    assert all(len(p) == 4 + i % 16 for i, p in enumerate(pieces))
    assert len(state.pad) == ai._PAD_MAX  # grew from _PAD_FIRST
    # no byte is handed out twice: the pieces of the current block are its prefix
    tail = b"".join(pieces[-50:])
    assert state.pad[state.pad_pos - len(tail):state.pad_pos] == tail
    assert len(set(pieces)) > 1990  # unpredictable bytes, not a repeated pattern


# --------------------------------------------------------------------------- 2. global requests


def test_global_requests_all_reach_the_callback_paramiko_client() -> None:
    async def main() -> None:
        ctx = Ctx()
        seen: list[GlobalRequest] = []
        truncated_seen = ctx.future()

        class Server(HookServer):
            def on_global_request(self, conn: asyncssh.SSHServerConnection,
                                  req: GlobalRequest) -> Any:
                seen.append(req)
                if req.malformed == "missing want_reply":
                    settle(truncated_seen, req)
                if req.name in ("keepalive@openssh.com", "tcpip-forward"):
                    return ASYNCSSH_DEFAULT  # asyncssh: keepalive ok, forward refused

                if req.name == "foo@example.com":
                    async def later() -> bytes:
                        return UInt32(4242)  # success with response data
                    return later()
                return False

        async with serve(ctx, lambda: Server(ctx)) as port, paramiko_client(port) as pc:
            greq = pc.t.global_request
            ok = await pc.call(greq, "foo@example.com", None, True)
            assert ok is not None and ok.get_int() == 4242
            assert await pc.call(greq, "keepalive@openssh.com", None, True) is not None
            assert await pc.call(greq, "tcpip-forward", ("127.0.0.1", 0), True) is None
            # malformed: truncated tcpip-forward (asyncssh's handler would disconnect)
            assert await pc.call(greq, "tcpip-forward", ("127.0.0.1",), True) is None
            assert await pc.call(greq, b"\xff\xfe", None, True) is None  # non-ASCII name
            pc.send_raw(("byte", cMSG_GLOBAL_REQUEST), ("string", "no-want-reply@x"))
            await truncated_seen
            # still alive, and answers still line up with requests
            ok = await pc.call(greq, "foo@example.com", None, True)
            assert ok is not None and ok.get_int() == 4242
            assert pc.t.is_active()

        assert [(r.name, r.want_reply, r.malformed) for r in seen] == [
            ("foo@example.com", True, None),
            ("keepalive@openssh.com", True, None),
            ("tcpip-forward", True, None),
            ("tcpip-forward", True, None),
            (None, True, "name is not ASCII"),
            ("no-want-reply@x", False, "missing want_reply"),
            ("foo@example.com", True, None),
        ]
        assert seen[2].payload == String("127.0.0.1") + UInt32(0)
        assert seen[4].raw_name == b"\xff\xfe"

    run(main)


def test_global_requests_in_order_with_async_verdicts_and_bounded_queue() -> None:
    async def main() -> None:
        ctx = Ctx()
        verdicts: asyncio.Queue[asyncio.Future[bool]] = asyncio.Queue()
        overflowed: list[str | None] = []
        last = ctx.future()

        class Server(HookServer):
            max_pending_global = 2

            def on_global_request(self, conn: asyncssh.SSHServerConnection,
                                  req: GlobalRequest) -> Any:
                fut: asyncio.Future[bool] = ctx.future()
                verdicts.put_nowait(fut)
                return fut

            def on_global_overflow(self, conn: asyncssh.SSHServerConnection,
                                   req: GlobalRequest) -> None:
                overflowed.append(req.name)
                if req.name == "g5@x":
                    settle(last, None)

        async with serve(ctx, lambda: Server(ctx)) as port, await aconnect(port) as conn:
            answers = [asyncio.ensure_future(conn._make_global_request(f"g{i}@x".encode()))
                       for i in range(6)]
            await last
            assert verdicts.qsize() == 1
            (await verdicts.get()).set_result(False)
            (await verdicts.get()).set_result(True)
            results = [pkttype for pkttype, _ in await asyncio.gather(*answers)]
            assert results == [ai.MSG_REQUEST_FAILURE, ai.MSG_REQUEST_SUCCESS] + \
                [ai.MSG_REQUEST_FAILURE] * 4
        assert overflowed == ["g2@x", "g3@x", "g4@x", "g5@x"]

    run(main)


def test_server_keepalive_answered_by_asyncssh_and_paramiko_clients() -> None:
    async def main() -> None:
        ctx = Ctx()
        async with serve(ctx, lambda: HookServer(ctx)) as port:
            async with await aconnect(port) as conn:
                await ctx.auth_completed
                server_conn = ctx.conns[0]
                assert await send_keepalive(server_conn) is KeepaliveResult.SUCCESS
                # a client that never answers (drop the server's global requests)
                conn._packet_handlers = {k: v for k, v in conn._packet_handlers.items()
                                         if k != ai.MSG_GLOBAL_REQUEST}
                conn._packet_handlers[ai.MSG_GLOBAL_REQUEST] = lambda *args: None
                assert await send_keepalive(server_conn, timeout=0.2) is \
                    KeepaliveResult.TIMEOUT
                pending = asyncio.ensure_future(send_keepalive(server_conn))
                conn.close()
                assert await pending is KeepaliveResult.CLOSED
                assert await send_keepalive(server_conn) is KeepaliveResult.CLOSED
            async with paramiko_client(port):
                server_conn = ctx.conns[1]
                result = await send_keepalive(server_conn)
                assert result is KeepaliveResult.FAILURE and result.answered  # paramiko refuses

    run(main)


# --------------------------------------------------------------------------- 3. channel opens


def test_every_channel_open_reaches_the_callback_paramiko_client() -> None:
    async def main() -> None:
        ctx = Ctx()
        opens: list[ChannelOpenRequest] = []
        seen: dict[int, asyncio.Future[ChannelOpenRequest]] = {}

        def saw(seq: int) -> asyncio.Future[ChannelOpenRequest]:
            return seen.setdefault(seq, ctx.future())

        class Server(HookServer):
            def on_channel_open(self, conn: asyncssh.SSHServerConnection,
                                req: ChannelOpenRequest) -> Any:
                opens.append(req)
                settle(saw(req.seq), req)
                if req.malformed is not None:
                    return ASYNCSSH_DEFAULT  # our default for malformed: refuse, stay up
                if req.type == "session":
                    if req.seq == 4:  # refuse later, asynchronously
                        async def refuse() -> asyncssh.SSHServerSession[bytes]:
                            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE,
                                                            "busy")
                        return self.make_channel(conn), refuse()
                    return self.make_channel(conn), AdapterSession(self.ctx)
                if req.type == "direct-tcpip":
                    return asyncssh.ChannelOpenError(
                        asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "no forwarding")
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_UNKNOWN_CHANNEL_TYPE,
                                                f"unsupported: {req.type}")

        async def refused(pc: PTransport, *args: Any, **kwargs: Any) -> int:
            with pytest.raises(paramiko.ChannelException) as info:
                await pc.call(pc.t.open_channel, *args, **kwargs)
            return info.value.code

        async with serve(ctx, lambda: Server(ctx)) as port, paramiko_client(port) as pc:
            assert await refused(pc, "foo") == asyncssh.OPEN_UNKNOWN_CHANNEL_TYPE
            assert await refused(pc, "direct-tcpip", dest_addr=("10.0.0.1", 22),
                                 src_addr=("127.0.0.1", 5555)) == \
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            assert await refused(pc, "x11", src_addr=("127.0.0.1", 6010)) == \
                asyncssh.OPEN_UNKNOWN_CHANNEL_TYPE
            assert await refused(pc, "forwarded-tcpip", dest_addr=("0.0.0.0", 8080),
                                 src_addr=("127.0.0.1", 5555)) == \
                asyncssh.OPEN_UNKNOWN_CHANNEL_TYPE
            assert await refused(pc, "session") == asyncssh.OPEN_RESOURCE_SHORTAGE
            chan = await pc.call(pc.t.open_session)  # seq 5: accepted
            # malformed opens (asyncssh alone would disconnect for both)
            pc.send_raw(("byte", cMSG_CHANNEL_OPEN), ("string", b"\xffbad"), ("int", 4242),
                        ("int", 1000), ("int", 1000))
            pc.send_raw(("byte", cMSG_CHANNEL_OPEN), ("string", "session"), ("int", 4243),
                        ("int", 1000), ("int", 0))
            await saw(7)
            chan2 = await pc.call(pc.t.open_session)  # still alive
            chan.close()
            chan2.close()
            # too short to even name a sender channel: nobody to refuse -> disconnect
            pc.send_raw(("byte", cMSG_CHANNEL_OPEN), ("string", "session"))
            exc, _ = await ctx.lost
            assert isinstance(exc, asyncssh.ProtocolError)

        assert [(o.type, o.malformed) for o in opens] == [
            ("foo", None), ("direct-tcpip", None), ("x11", None), ("forwarded-tcpip", None),
            ("session", None), ("session", None),
            (None, "channel type is not ASCII"), ("session", "maximum packet size is 0"),
            ("session", None), ("session", "truncated sender channel"),
        ]
        assert opens[1].payload == String("10.0.0.1") + UInt32(22) + String("127.0.0.1") + \
            UInt32(5555)
        assert opens[6].raw_type == b"\xffbad" and opens[6].sender_channel == 4242

    run(main)


# --------------------------------------------------------------------------- 4. authentication


def _same_key(key: asyncssh.SSHKey, ref: asyncssh.SSHKey) -> bool:
    return key.public_data == ref.public_data


class AuthServer(HookServer):
    """Adapter-style auth: every request and answer recorded; decisions by the adapter."""

    def on_service_request(self, conn: asyncssh.SSHServerConnection,
                           service: str | None) -> bool:
        return service == "ssh-userauth"  # paramiko asks again before each attempt

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.events: list[tuple[Any, ...]] = []
        self.key_checks: list[bool] = []

    def begin_auth(self, username: str) -> bool:
        return True

    def on_auth_request(self, conn: asyncssh.SSHServerConnection, req: AuthRequest) -> None:
        pk = req.publickey
        self.events.append(("request", req.method, None if pk is None else pk.is_query))

    def on_auth_result(self, conn: asyncssh.SSHServerConnection, res: AuthResult) -> None:
        method = res.request.method if res.request else None
        self.events.append(("result", method, res.kind))

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        ok = _same_key(key, GOOD_KEY)
        self.key_checks.append(ok)
        return ok

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> Any:
        return "", "", "", [("Code: ", True)]

    def validate_kbdint_response(self, username: str, responses: Any) -> bool:
        return list(responses) == ["42"]


def test_auth_publickey_query_vs_signed_and_kbdint_asyncssh_client() -> None:
    async def main() -> None:
        ctx = Ctx()
        servers: list[AuthServer] = []

        def factory() -> AuthServer:
            servers.append(AuthServer(ctx))
            return servers[-1]

        class Client(asyncssh.SSHClient):
            def kbdint_auth_requested(self) -> str:
                return ""  # take part in keyboard-interactive

            def kbdint_challenge_received(self, name: str, instructions: str, lang: str,
                                          prompts: Any) -> list[str]:
                return ["42"]

        async with serve(ctx, factory) as port:
            async with await aconnect(port, client_keys=[OTHER_KEY, GOOD_KEY]):
                await ctx.auth_completed
            assert servers[0].events == [
                ("request", "none", None), ("result", "none", "failure"),
                ("request", "publickey", True), ("result", "publickey", "failure"),
                ("request", "publickey", True), ("result", "publickey", "pk_ok"),
                ("request", "publickey", False), ("result", "publickey", "success"),
            ]
            # validate_public_key runs for the query AND again for the signed request
            assert servers[0].key_checks == [False, True, True]

            async with await aconnect(port, client_keys=[OTHER_KEY],
                                      client_factory=Client):
                pass
            assert servers[1].events == [
                ("request", "none", None), ("result", "none", "failure"),
                ("request", "publickey", True), ("result", "publickey", "failure"),
                ("request", "keyboard-interactive", None),
                ("result", "keyboard-interactive", "info_request"),
                ("result", "keyboard-interactive", "success"),
            ]

    run(main)


def test_success_waits_for_the_awaitable_on_auth_result_returns() -> None:
    """A backend that decides after the credentials: USERAUTH_SUCCESS goes out when the
    awaitable the hook returned is done; a disconnect meanwhile suppresses it."""

    async def main() -> None:
        ctx = Ctx()
        verdicts: list[asyncio.Future[None]] = []
        servers: list[AuthServer] = []

        class Deciding(AuthServer):
            def on_auth_result(self, conn: asyncssh.SSHServerConnection, res: AuthResult) -> Any:
                super().on_auth_result(conn, res)
                if res.kind != "success":
                    return None
                verdicts.append(asyncio.get_running_loop().create_future())
                return verdicts[-1]

        def factory() -> AuthServer:
            servers.append(Deciding(ctx))
            return servers[-1]

        async with serve(ctx, factory) as port:
            login = asyncio.ensure_future(aconnect(port, client_keys=[GOOD_KEY]))
            while not verdicts:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            assert not login.done() and not ctx.auth_completed.done()  # SUCCESS is held
            verdicts[0].set_result(None)
            async with await login:
                await ctx.auth_completed
            # The second client: refused while its SUCCESS waits.
            login = asyncio.ensure_future(aconnect(port, client_keys=[GOOD_KEY]))
            while len(verdicts) < 2:
                await asyncio.sleep(0.01)
            assert servers[1].conn is not None
            servers[1].conn.disconnect(asyncssh.DISC_BY_APPLICATION, "backend says no")
            verdicts[1].set_result(None)
            with pytest.raises(asyncssh.DisconnectError) as info:
                await login
            assert info.value.reason.startswith("backend says no")

    run(main)


def test_adapter_disconnects_on_too_many_failures_asyncssh_client() -> None:
    """The adapter counts failures and, at the limit, sends DISCONNECT (14) INSTEAD of
    the USERAUTH_FAILURE asyncssh was about to send."""

    async def main() -> None:
        ctx = Ctx()
        servers: list[AuthServer] = []

        class Limited(AuthServer):
            failures = 0

            def password_auth_supported(self) -> bool:
                return True

            def validate_password(self, username: str, password: str) -> bool:
                return False

            def on_auth_result(self, conn: asyncssh.SSHServerConnection,
                               res: AuthResult) -> None:
                super().on_auth_result(conn, res)
                if res.kind == "failure" and res.request and res.request.method != "none":
                    self.failures += 1
                    if self.failures == 2:
                        conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                        "too many authentication failures")

        def factory() -> AuthServer:
            servers.append(Limited(ctx))
            return servers[-1]

        class Client(asyncssh.SSHClient):
            def kbdint_auth_requested(self) -> str:
                return ""  # take part in keyboard-interactive

            def kbdint_challenge_received(self, name: str, instructions: str, lang: str,
                                          prompts: Any) -> list[str]:
                return ["wrong"]

        async with serve(ctx, factory) as port:
            with pytest.raises(asyncssh.PermissionDenied) as info:
                await aconnect(port, password="wrong", client_factory=Client)
            assert info.value.code == asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE
            assert info.value.reason == "too many authentication failures"
            exc, phase = await ctx.lost
            assert exc is None and phase == "auth"  # our own disconnect: reason None
        # the 2nd counted failure was replaced by DISCONNECT; the client never got it
        assert servers[0].events == [
            ("request", "none", None), ("result", "none", "failure"),
            ("request", "keyboard-interactive", None),
            ("result", "keyboard-interactive", "info_request"),
            ("result", "keyboard-interactive", "failure"),
            ("request", "keyboard-interactive", None),
            ("result", "keyboard-interactive", "info_request"),
            ("result", "keyboard-interactive", "failure"),
        ]

    run(main)


class BadSignatureKey(paramiko.Ed25519Key):
    """A key whose signatures never verify (paramiko signs without querying first)."""

    def sign_ssh_data(self, data: bytes, algorithm: str | None = None) -> Message:
        m = Message()
        m.add_string("ssh-ed25519")
        m.add_string(bytes(64))
        return m


def _paramiko_key(cls: type[paramiko.Ed25519Key] = paramiko.Ed25519Key) -> paramiko.PKey:
    return cls(file_obj=io.StringIO(GOOD_KEY.export_private_key("openssh").decode()))


def test_auth_every_method_seen_paramiko_client() -> None:
    """none, an unknown method, hostbased (raw), password, a signed publickey with a bad
    signature (no query first), then a good one."""

    async def main() -> None:
        ctx = Ctx()
        servers: list[AuthServer] = []
        results: asyncio.Queue[AuthResult] = asyncio.Queue()

        class Server(AuthServer):
            def on_auth_result(self, conn: asyncssh.SSHServerConnection,
                               res: AuthResult) -> None:
                super().on_auth_result(conn, res)
                results.put_nowait(res)

            def password_auth_supported(self) -> bool:
                return True

            def validate_password(self, username: str, password: str) -> bool:
                return False

        def factory() -> AuthServer:
            servers.append(Server(ctx))
            return servers[-1]

        async def raw_auth(pc: PTransport, method: str, *fields: tuple[str, Any]) -> None:
            # paramiko's auth handler sets auth_event when the failure has been processed
            answered = threading.Event()
            pc.t.auth_handler.auth_event = answered
            pc.send_raw(("byte", cMSG_USERAUTH_REQUEST), ("string", "alice"),
                        ("string", "ssh-connection"), ("string", method), *fields)
            await asyncio.to_thread(answered.wait, TIMEOUT)

        async with serve(ctx, factory) as port, paramiko_client(port, auth_none=False) as pc:
            with pytest.raises(paramiko.BadAuthenticationType):
                await pc.call(pc.t.auth_none, "alice")
            assert (await results.get()).kind == "failure"
            await raw_auth(pc, "foo@example.com", ("string", "whatever"))
            assert (await results.get()).request.method == "foo@example.com"
            await raw_auth(pc, "hostbased", ("string", "ssh-ed25519"), ("string", b"blob"),
                     ("string", "client.example"), ("string", "alice"), ("string", b"sig"))
            assert (await results.get()).request.method == "hostbased"
            with pytest.raises(paramiko.AuthenticationException):
                # fallback=False: no automatic keyboard-interactive retry by paramiko
                await pc.call(pc.t.auth_password, "alice", "bad", fallback=False)
            with pytest.raises(paramiko.AuthenticationException):
                await pc.call(pc.t.auth_publickey, "alice", _paramiko_key(BadSignatureKey))
            await pc.call(pc.t.auth_publickey, "alice", _paramiko_key())
            assert pc.t.is_authenticated()

        server = servers[0]
        assert server.events == [
            ("request", "none", None), ("result", "none", "failure"),
            ("request", "foo@example.com", None), ("result", "foo@example.com", "failure"),
            ("request", "hostbased", None), ("result", "hostbased", "failure"),
            ("request", "password", None), ("result", "password", "failure"),
            # signed without a query; the key is fine (validate_public_key said True),
            # so this failure can only be the signature: asyncssh reports nothing more
            ("request", "publickey", False), ("result", "publickey", "failure"),
            ("request", "publickey", False), ("result", "publickey", "success"),
        ]
        assert server.key_checks == [True, True]

    run(main)


def test_adapter_disconnect_code_2_seen_by_paramiko(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        ctx = Ctx()

        class Server(AuthServer):
            def password_auth_supported(self) -> bool:
                return True

            def validate_password(self, username: str, password: str) -> bool:
                return False

            failures = 0

            def on_auth_result(self, conn: asyncssh.SSHServerConnection,
                               res: AuthResult) -> None:
                self.failures += res.kind == "failure"
                if res.kind == "failure" and self.failures >= 3:
                    conn.disconnect(asyncssh.DISC_PROTOCOL_ERROR,
                                    "too many authentication failures")

        async with serve(ctx, lambda: Server(ctx)) as port, \
                paramiko_client(port, auth_none=False) as pc:
            with pytest.raises(paramiko.BadAuthenticationType):
                await pc.call(pc.t.auth_none, "alice")  # failure 1
            with pytest.raises(paramiko.AuthenticationException) as second:
                await pc.call(pc.t.auth_password, "alice", "bad", fallback=False)
            assert "Authentication failed." in str(second.value)
            with pytest.raises(paramiko.AuthenticationException) as third:
                await pc.call(pc.t.auth_password, "alice", "bad", fallback=False)
            # paramiko only says "transport shut down"; the reason is in its log
            assert "transport shut down" in str(third.value)
            exc, phase = await ctx.lost
            assert exc is None and phase == "auth"

    with caplog.at_level("INFO", logger="paramiko.transport"):
        run(main)
    assert any("too many authentication failures" in r.getMessage() for r in caplog.records)


def test_superseded_auth_request_is_reported() -> None:
    """A USERAUTH_REQUEST arriving while the previous one is still being decided makes
    asyncssh cancel the previous one, which is then never answered."""

    async def main() -> None:
        ctx = Ctx()
        servers: list[AuthServer] = []
        second_answered = ctx.future()
        first_checked = ctx.future()
        never: asyncio.Future[bool] = ctx.future()

        class Server(AuthServer):
            def password_auth_supported(self) -> bool:
                return True

            async def validate_password(self, username: str, password: str) -> bool:
                if password == "first":
                    settle(first_checked, None)
                    return await never  # still deciding when the next request comes
                return False

            def on_auth_result(self, conn: asyncssh.SSHServerConnection,
                               res: AuthResult) -> None:
                super().on_auth_result(conn, res)
                if res.request and res.request.seq == 2:
                    settle(second_answered, None)

        def factory() -> AuthServer:
            servers.append(Server(ctx))
            return servers[-1]

        def password(pc: PTransport, pw: str) -> None:
            pc.send_raw(("byte", cMSG_USERAUTH_REQUEST), ("string", "alice"),
                        ("string", "ssh-connection"), ("string", "password"),
                        ("boolean", False), ("string", pw))

        async with serve(ctx, factory) as port, paramiko_client(port, auth_none=False) as pc:
            with pytest.raises(paramiko.BadAuthenticationType):
                await pc.call(pc.t.auth_none, "alice")
            password(pc, "first")
            await first_checked
            password(pc, "second")
            await second_answered

        assert servers[0].events[2:] == [
            ("request", "password", None),
            ("result", "password", "superseded"),
            ("request", "password", None),
            ("result", "password", "failure"),
        ]
        assert never.cancelled()  # asyncssh cancelled the first validate_password

    run(main)


def test_truncated_auth_request_is_an_abort_without_disconnect_message() -> None:
    """Documented (HACKS.md): malformed method data in USERAUTH_REQUEST kills the
    connection from an asyncssh task: no DISCONNECT, connection_lost(PacketDecodeError)."""

    async def main() -> None:
        ctx = Ctx()
        seen: asyncio.Future[AuthRequest] = ctx.future()

        class Server(AuthServer):
            def password_auth_supported(self) -> bool:
                return True

            def on_auth_request(self, conn: asyncssh.SSHServerConnection,
                                req: AuthRequest) -> None:
                if req.method == "password":
                    settle(seen, req)

        async with serve(ctx, lambda: Server(ctx)) as port, \
                paramiko_client(port, auth_none=False) as pc:
            with pytest.raises(paramiko.BadAuthenticationType):
                await pc.call(pc.t.auth_none, "alice")
            pc.send_raw(("byte", cMSG_USERAUTH_REQUEST), ("string", "alice"),
                        ("string", "ssh-connection"), ("string", "password"),
                        ("boolean", False))
            req = await seen
            assert req.malformed == "truncated password length" and req.payload == b""
            exc, phase = await ctx.lost
            assert type(exc).__name__ == "PacketDecodeError" and phase == "auth"

    run(main)


# --------------------------------------------------------------------------- 6/7. lifetime


def _packet(payload: bytes) -> bytes:
    padlen = 8 - (5 + len(payload)) % 8
    padlen += 8 if padlen < 4 else 0
    return struct.pack(">IB", 1 + len(payload) + padlen, padlen) + payload + bytes(padlen)


def _kexinit(kex: bytes) -> bytes:
    lists = [kex, b"ssh-ed25519", b"aes128-ctr", b"aes128-ctr", b"hmac-sha2-256",
             b"hmac-sha2-256", b"none", b"none", b"", b""]
    return Byte(20) + bytes(16) + b"".join(String(x) for x in lists) + Boolean(False) + UInt32(0)


def _messages(stream: bytes) -> tuple[bytes, list[bytes]]:
    """Split what an unencrypted server sent: (version line, message payloads)."""
    line, _, rest = stream.partition(b"\r\n")
    payloads = []
    while rest:
        length, padlen = struct.unpack(">IB", rest[:5])
        payloads.append(rest[5:4 + length - padlen])
        rest = rest[4 + length:]
    return line, payloads


@pytest.mark.parametrize("stall", ["version", "kex", "auth"])
def test_login_timeout_covers_version_kex_and_auth_stalls(stall: str) -> None:
    async def main() -> None:
        ctx = Ctx()
        kex_done: list[int] = []

        class Server(AuthServer):
            def on_kex_done(self, conn: asyncssh.SSHServerConnection, count: int) -> None:
                kex_done.append(count)

        async with serve(ctx, lambda: Server(ctx), login_timeout=0.25) as port:
            if stall == "auth":
                client = await PTransport(port).start()  # kex done, then silence
                try:
                    exc, phase = await ctx.lost
                finally:
                    await asyncio.to_thread(client.close)
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                conn = await ctx.conn_made  # TCP accepted: connection_made, pre-version
                assert phase_of(ctx.hook_states[conn]) == "version"
                if stall == "kex":
                    writer.write(b"SSH-2.0-stalling\r\n")
                received = await reader.read()  # until the server closes
                writer.close()
                exc, phase = await ctx.lost
                line, payloads = _messages(received)
                assert line.startswith(b"SSH-2.0-AsyncSSH_")
                # no DISCONNECT (1): the socket is just closed
                assert [p[0] for p in payloads] == ([] if stall == "version" else [20])
        assert is_login_timeout(exc) and phase == stall
        assert kex_done == ([1] if stall == "auth" else [])

    run(main)


def test_key_exchange_failure_and_normal_lifecycle_phases() -> None:
    async def main() -> None:
        ctx = Ctx()
        trace: list[tuple[str, str]] = []

        class Server(AuthServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                super().connection_made(conn)
                trace.append(("connection_made", phase_of(ctx.hook_states[conn])))

            def on_kex_done(self, conn: asyncssh.SSHServerConnection, count: int) -> None:
                trace.append((f"kex_done {count}", phase_of(ctx.hook_states[conn])))

            def auth_completed(self) -> None:
                assert self.conn is not None
                trace.append(("auth_completed", phase_of(ctx.hook_states[self.conn])))
                super().auth_completed()

        async with serve(ctx, lambda: Server(ctx)) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"SSH-2.0-raw\r\n" + _packet(_kexinit(b"bogus-kex@example.com")))
            received = await reader.read()
            writer.close()
            exc, phase = await ctx.lost
            assert isinstance(exc, asyncssh.KeyExchangeFailed) and phase == "kex"
            kexinit, disconnect = _messages(received)[1]
            assert kexinit[0] == 20 and disconnect[0] == 1
            code, reason_len = struct.unpack(">II", disconnect[1:9])
            assert code == asyncssh.DISC_KEY_EXCHANGE_FAILED
            assert disconnect[9:9 + reason_len] == exc.reason.encode()

            trace.clear()
            ctx.lost = ctx.future()
            async with await aconnect(port, client_keys=[GOOD_KEY]):
                await ctx.auth_completed
            exc, phase = await ctx.lost
            assert exc is None and phase == "connected"
        assert trace == [("connection_made", "version"), ("kex_done 1", "auth"),
                         ("auth_completed", "connected")]

    run(main)


# --------------------------------------------------------------------------- 5. documented


def test_stock_asyncssh_disconnects_paramiko_second_auth_attempt() -> None:
    """Without on_service_request -> True, paramiko's SERVICE_REQUEST before its second
    auth attempt makes asyncssh disconnect (ServiceNotAvailable, code 7)."""

    async def main() -> None:
        ctx = Ctx()

        class Stock(AuthServer):
            def on_service_request(self, conn: asyncssh.SSHServerConnection,
                                   service: str | None) -> Any:
                return ASYNCSSH_DEFAULT

            def password_auth_supported(self) -> bool:
                return True

        async with serve(ctx, lambda: Stock(ctx)) as port, \
                paramiko_client(port, auth_none=False) as pc:
            with pytest.raises(paramiko.BadAuthenticationType):
                await pc.call(pc.t.auth_none, "alice")
            with pytest.raises(paramiko.AuthenticationException):
                await pc.call(pc.t.auth_password, "alice", "pw", fallback=False)
            exc, phase = await ctx.lost
            assert isinstance(exc, asyncssh.ServiceNotAvailable) and phase == "auth"

    run(main)


def test_malformed_channel_data_is_a_protocol_error_disconnect() -> None:
    """Documented (HACKS.md): only channel *requests* are kept alive; a malformed
    CHANNEL_DATA is still asyncssh's protocol-error disconnect."""

    async def main() -> None:
        ctx = Ctx()
        async with serve(ctx, lambda: HookServer(ctx)) as port, await aconnect(port) as conn:
            chan, _ = await exec_session(conn)
            chan.send_packet(94, UInt32(100))  # CHANNEL_DATA whose string is truncated
            await conn.wait_closed()
            exc, phase = await ctx.lost
            assert isinstance(exc, asyncssh.ProtocolError) and phase == "connected"

    run(main)


@pytest.mark.parametrize(("debug_level", "level", "packets", "info"), [
    (3, logging.DEBUG, True, True),  # packet logging on: every packet line is there
    (1, logging.DEBUG, False, True),  # the default debug level: no packet lines
    (3, logging.WARNING, False, False),  # the logger is off: nothing at all
])
def test_log_lazily_logs_what_asyncssh_logged(caplog: pytest.LogCaptureFixture, debug_level: int,
                                             level: int, packets: bool, info: bool) -> None:
    """log_lazily only moves asyncssh's checks ahead of the formatting: what
    set_debug_level and the logger's level let through still comes out."""
    ai.log_lazily()

    async def main() -> None:
        ctx = Ctx()
        async with serve(ctx, lambda: AuthServer(ctx)) as port:
            caplog.set_level(level, logger="asyncssh")
            asyncssh.set_debug_level(debug_level)
            try:
                async with await aconnect(port, client_keys=[GOOD_KEY]):
                    pass
            finally:
                asyncssh.set_debug_level(1)

    run(main)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("asyncssh")]
    assert any("Sent MSG_KEXINIT" in line for line in lines) is packets, lines
    assert any("Received MSG_USERAUTH_REQUEST" in line for line in lines) is packets, lines
    assert any("Auth for user alice succeeded" in line for line in lines) is info, lines


def test_the_listener_refuses_before_asyncssh_and_hands_over_the_rest() -> None:
    """The server's one accept path (`proxy_protocol.Listener`, HACKS.md row 29), with
    ssh.proxyProtocol off: a refused socket is aborted before any SSH connection
    exists (the client sees no version line); an admitted one becomes a normal
    asyncssh server connection made by `connection_factory` (a login works through it)."""
    made: list[asyncssh.SSHServer] = []
    refuse = {"127.0.0.2"}

    class Server(asyncssh.SSHServer):
        def __init__(self) -> None:
            made.append(self)

        def begin_auth(self, username: str) -> bool:
            return False  # no authentication: enough to prove the connection works

    async def main() -> None:
        asked: list[str] = []

        def admit(peer: tuple[str, int]) -> bool:
            asked.append(peer[0])
            return asked[-1] not in refuse

        factory = connection_factory(server_factory=Server, server_host_keys=[HOST_KEY])
        listener = Listener(None, None, 5.0, factory, admit)  # type: ignore[arg-type]  # no PROXY: no core
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.setblocking(False)
        port = sock.getsockname()[1]
        await listener.start(sock)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            assert await asyncio.wait_for(reader.read(100), 5) == b""  # closed: no version line
            writer.close()
            assert made == []  # asyncssh made nothing for it
            async with await aconnect(port, local_addr=("127.0.0.3", 0)) as conn:
                assert conn.get_extra_info("server_version").startswith("SSH-2.0-")  # kex and auth done
            assert len(made) == 1 and asked == ["127.0.0.2", "127.0.0.3"]
        finally:
            listener.close()
            await listener.wait_closed()
    run(main)


def test_certificate_facts_from_asyncssh_certificates() -> None:
    """`user_certificate` (HACKS.md row 31) reads what asyncssh's certificate hides:
    key id, serial, validity, and the CA's signature algorithm, SHA-1 included
    (asyncssh still signs with `ssh-rsa` when asked, and accepts such certificates)."""
    ca = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    user = asyncssh.generate_private_key("ssh-ed25519")
    for sig_alg in ("ssh-rsa", "rsa-sha2-256", "rsa-sha2-512"):
        cert = ca.generate_user_certificate(user, "key-id", principals=["alice", "ops"], serial=42,
                                            valid_after=1000, valid_before=2000, sig_alg=sig_alg,
                                            force_command="echo forced",
                                            source_address=["127.0.0.2/32", "10.0.0.0/8"])
        decoded = asyncssh.import_certificate(cert.export_certificate())  # as the wire gives it
        facts = ai.user_certificate(decoded)
        assert facts == ai.UserCertificate(
            ca=ca.public_data, signature_algorithm=sig_alg, key_id="key-id", serial=42,
            principals=("alice", "ops"), valid_after=1000, valid_before=2000,
            source_addresses=("127.0.0.2/32", "10.0.0.0/8"), force_command="echo forced")
    ed_ca = asyncssh.generate_private_key("ssh-ed25519")
    plain = ed_ca.generate_user_certificate(user, "k", principals=["a"])
    assert ai.user_certificate(plain).signature_algorithm == "ssh-ed25519"
    facts = ai.user_certificate(plain)
    assert (facts.source_addresses, facts.force_command) == ((), None)
