"""The asyncssh adapter: real SSH events in, spec events through the machines,
spec verdicts out as SSH replies, every emitted code logged.

The adapter holds no protocol rule of its own. For each SSH event it fires
the spec event that names it, then carries out the `reply` of the step the
machine took. Where asyncssh decides something by itself, the reach-ins in
`asyncssh_internals` hand the decision back (see HACKS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import getpass
import inspect
import itertools
import os
import secrets
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import msgspec

from sshspec.adapters import asyncssh_internals as internals
from sshspec.adapters.algorithms import server_options
from sshspec.adapters.backend_local import BackendError, ExitStatus, PtyRequest
from sshspec.adapters.config import Config, resolve_state_dir
from sshspec.adapters.handlers import (
    ConfiguredHandler,
    ConnectionHandler,
    ConnectionInfo,
    Handler,
    SessionHandler,
    SessionIO,
    UserEntry,
)
from sshspec.adapters.logs import Kind, Labels, Logger, kind
from sshspec.codes import CATALOG
from sshspec.fsm.machine import Machine, Step

# --- logging: one record per emitted code ------------------------------------------------


def _short(explanation: str) -> str:
    return explanation.split(". ")[0].rstrip(".")


# code -> (level, code, message): the part of a record its code fixes.
_KINDS: dict[str, Kind] = {name: kind(code.level, name, _short(code.explanation))
                           for name, code in CATALOG.items()}


class Emitter:
    """The log records of a step's codes. Records nobody reads are not built."""

    def __init__(self, logger: Logger) -> None:
        self.enabled = {name: logger.enabled(k.level) for name, k in _KINDS.items()}
        self._records: dict[tuple[str, ...], tuple[Kind, ...]] = {}

    def records(self, codes: tuple[str, ...]) -> tuple[Kind, ...]:
        """The records of these codes that are logged; with none, the caller skips
        building the labels (a step's codes tuple is shared, so this caches well)."""
        records = self._records.get(codes)
        if records is None:
            records = self._records[codes] = tuple(_KINDS[c] for c in codes if self.enabled[c])
        return records


# --- the machines, compiled once per server with the configured limits ------------------


@dataclass(frozen=True)
class Machines:
    server: Machine
    connection: Machine
    session: Machine

    @classmethod
    def from_config(cls, config: Config) -> Machines:
        limits = {
            "maxStartups": config.limits.max_startups,
            "maxAuthTries": config.limits.max_auth_tries,
            "maxSessions": config.limits.max_sessions,
            "clientAliveCountMax": config.ssh.client_alive_count_max,
            "maxEnv": config.limits.max_env,
        }
        return cls(Machine.load("server", limits), Machine.load("connection", limits),
                   Machine.load("session", limits))


# --- one session channel ------------------------------------------------------------------

# Known request types this server does not implement (SSH_NOT_IMPLEMENTED), as
# opposed to types nobody knows (unknown_request).
NOT_IMPLEMENTED = frozenset({"x11-req", "auth-agent-req@openssh.com", "break", "xon-xoff",
                             "keepalive@openssh.com", "eow@openssh.com"})
EVENT_OF_REQUEST = {"env": "env", "pty-req": "pty_req", "window-change": "window_change",
                    "signal": "signal", "shell": "shell", "exec": "exec", "subsystem": "subsystem"}


class SpecSession(asyncssh.SSHServerSession[bytes]):
    """Drives one session-channel machine from its channel's events."""

    def __init__(self, conn: SpecConnection, channel_id: int, handler: SessionHandler) -> None:
        self.conn = conn
        self.channel_id = channel_id
        self.handler = handler
        self.machine = conn.server.machines.session
        self.state = self.machine.new()
        self.chan: internals.HookedServerChannel | None = None
        self._paused = False  # asyncssh holds output for the client's window
        self._resumed: asyncio.Future[None] | None = None  # made only when someone waits
        self._waiter: asyncio.Task[None] | None = None

    def fire(self, event: str, request_type: str | None = None, *, reason: str | None = None,
             exit_code: int | None = None, signal: str | None = None) -> Step:
        step = self.machine.fire(self.state, event)
        if records := self.conn.server.emitter.records(step.codes):
            info = self.conn.info  # Labels' field values in order, taken now; the batch encodes them
            self.conn.server.logger.add(records, Labels(info.connection_id, info.remote_addr, info.username,
                                        self.channel_id, request_type, None, reason, exit_code, signal,
                                        event))
        return step

    # -- requests: every one goes through the spec, then (if it says so) the backend.

    def on_request(self, chan: internals.HookedServerChannel,
                   req: internals.ChannelRequest) -> bool | asyncio.Future[bool] | Any:
        name = req.type if req.type is not None else repr(req.raw_type)
        if req.malformed is not None:
            return self._replied(self.fire("malformed_request", name, reason=req.malformed))
        try:
            decoded = internals.decode_request(req)
        except internals.RequestDecodeError as exc:
            return self._replied(self.fire("malformed_request", name, reason=exc.reason))
        event = EVENT_OF_REQUEST.get(name)
        if event is None:
            kind = "not_implemented" if name in NOT_IMPLEMENTED else "unknown_request"
            return self._replied(self.fire(kind, name))
        step = self.fire(event, name)
        if step.kind != "transition" or step.reply is not None:
            return step.reply == "success"  # refused in this state: the spec's failure
        if event in ("shell", "exec", "subsystem"):
            return self._start(name, decoded)
        try:
            ok = self._ask_backend(decoded)
        except Exception as exc:  # a handler bug is a failed request, not a dead channel
            return self._outcome(False, name, reason=f"handler error: {exc!r}")
        return self._outcome(ok, name)

    @staticmethod
    def _replied(step: Step) -> bool:
        return step.reply == "success"

    def _outcome(self, ok: bool, name: str, reason: str | None = None) -> bool:
        step = self.fire("request_ok" if ok else "request_failed", name, reason=reason)
        return step.reply == "success"

    def _ask_backend(self, decoded: Any) -> bool:
        h = self.handler
        if isinstance(decoded, internals.EnvRequest):
            return h.set_env(decoded.name, decoded.value)
        if isinstance(decoded, internals.PtyRequest):
            return h.set_pty(PtyRequest(decoded.term, decoded.cols, decoded.rows, decoded.width_px,
                                        decoded.height_px, dict(decoded.modes)))
        if isinstance(decoded, internals.WindowChange):
            return h.window_change(decoded.cols, decoded.rows, decoded.width_px, decoded.height_px)
        if isinstance(decoded, internals.SignalRequest):
            return h.signal(decoded.name)
        return False

    async def _start(self, name: str, decoded: Any) -> bool:
        assert self.chan is not None
        chan = self.chan
        io = SessionIO(
            kind=name, command=getattr(decoded, "command", None),  # type: ignore[arg-type]
            subsystem=getattr(decoded, "name", None) if name == "subsystem" else None,
            env=self.handler.env, pty=self.handler.pty_request,
            write=chan.write, write_stderr=chan.write_stderr,
            pause_input=lambda paused: chan.pause_reading() if paused else chan.resume_reading(),
            server_env=self._server_env(chan))
        try:
            await self.handler.start(io)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # BackendError or a handler bug: the request fails
            reason = str(exc) if isinstance(exc, BackendError) else f"handler error: {exc!r}"
            return self._outcome(False, name, reason=reason)
        if self.state.state == "closed":
            # The channel closed while the program was starting: the close step's
            # reply ("end the program") could not reach a program that did not exist yet.
            self.handler.close()
        return self._outcome(True, name)

    def session_started(self) -> None:
        # Called by the channel right after the SUCCESS reply went out: only now
        # may the program's end (exit status, close) follow, or the reply would
        # come after the close and be lost.
        if self.state.state in ("running", "running_pending"):
            self.handler.started()
            self._waiter = asyncio.get_running_loop().create_task(self._wait_for_exit())

    def _server_env(self, chan: asyncssh.SSHServerChannel[bytes]) -> dict[str, str]:
        peer = chan.get_extra_info("peername") or ("", 0)
        sock = chan.get_extra_info("sockname") or ("", 0)
        env = {"SSH_CONNECTION": f"{peer[0]} {peer[1]} {sock[0]} {sock[1]}",
               "SSH_CLIENT": f"{peer[0]} {peer[1]} {sock[1]}"}
        return env

    async def _wait_for_exit(self) -> None:
        try:
            status = await self.handler.wait()
        except asyncio.CancelledError:
            return
        except Exception as exc:  # could not obtain the status: report an abnormal end
            status = ExitStatus(None, "ABRT")
            reason: str | None = f"handler error: {exc!r}"
        else:
            reason = None
        if status.signal is not None:
            step = self.fire("program_killed", signal=status.signal, reason=reason)
        else:
            step = self.fire("program_exited", exit_code=status.code)
        if step.reply in ("send_exit_status", "send_exit_signal"):
            await self._send_exit(step.reply, status)

    async def _send_exit(self, reply: str, status: ExitStatus) -> None:
        chan = self.chan
        assert chan is not None
        # Output first, then EOF, then the status: wait until asyncssh's send
        # buffer (held back by the client's window) is empty.
        if self._paused:
            self._resumed = asyncio.get_running_loop().create_future()
            await self._resumed
        try:
            chan.write_eof()
            if reply == "send_exit_status":
                chan.exit(status.code if status.code is not None else 255)
            else:
                chan.exit_with_signal(status.signal or "KILL", status.core_dumped)
        except Exception as exc:  # the client went away under us
            self.fire("exit_send_failed", reason=str(exc) or type(exc).__name__)
            chan.abort()
            return
        if internals.connection_gone(chan):  # a socket send failed (asyncio swallowed it)
            self.fire("exit_send_failed", reason="send failed")

    def on_reply_failed(self, chan: internals.HookedServerChannel,
                        failure: internals.ReplyFailure) -> None:
        request = failure.request
        name = getattr(request, "type", None) if request is not None else None
        self.fire("reply_send_failed", name, reason=failure.reason)

    def on_overflow(self, chan: internals.HookedServerChannel, req: internals.ChannelRequest) -> None:
        self.fire("request_overflow", req.type, reason="too many pending requests")

    # -- data and flow control (asyncssh's session API)

    def connection_made(self, chan: asyncssh.SSHChannel[bytes]) -> None:
        # high-water 0: asyncssh tells us the moment anything waits for the
        # client's window, so the program pauses instead of the server buffering.
        chan.set_write_buffer_limits(high=0, low=0)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.handler.stdin_data(data)

    def eof_received(self) -> bool:
        if self.fire("client_eof").reply == "close_stdin":
            self.handler.stdin_eof()
        return True  # half-close: output may still flow

    def pause_writing(self) -> None:
        self._paused = True
        self.handler.pause_output()

    def resume_writing(self) -> None:
        self._wake()
        self.handler.resume_output()

    def _wake(self) -> None:
        self._paused = False
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        step = self.fire("close", reason=str(exc) if exc else None)
        if step.reply == "close":
            self.handler.close()
        if self._waiter is not None and not self._waiter.done() and step.moved:
            # The program may still finish; its status can no longer be sent.
            pass
        self._wake()
        self.conn.channel_closed(self)

    def shutdown(self) -> None:
        """The server is shutting down: end the program (its status still goes
        out), or close a channel that has none."""
        if self.state.state in ("running", "running_pending"):
            self.handler.signal("TERM") or self.handler.close()
        elif self.chan is not None and self.state.state != "exited":
            self.chan.close()


# --- one connection -----------------------------------------------------------------------

_connection_ids = itertools.count(1)

DISCONNECT_REASON = {
    "disconnect_auth": (asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "Too many authentication failures"),
    "disconnect_protocol": (asyncssh.DISC_PROTOCOL_ERROR, "Protocol error"),
    "disconnect": (asyncssh.DISC_BY_APPLICATION, "Disconnected by server"),
}
AUTH_EVENT = {"password": "password", "keyboard-interactive": "kbdint_begin", "none": "none_auth"}
# The connection spec's channel-open refusals, as RFC 4254 reason codes.
OPEN_FAILURE = {"reject_channel": asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                "reject_channel_type": asyncssh.OPEN_UNKNOWN_CHANNEL_TYPE}


def _open_failure(step: Step, text: str) -> asyncssh.ChannelOpenError:
    # A refusal the spec did not name (a disconnect before authentication) still
    # must not open anything.
    return asyncssh.ChannelOpenError(OPEN_FAILURE.get(step.reply or "", asyncssh.OPEN_CONNECT_FAILED), text)


class SpecConnection(asyncssh.SSHServer, internals.ConnectionHooks):
    """Drives one connection machine; asyncssh makes one per TCP connection."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.machine = server.machines.connection
        self.state = self.machine.new()
        self.info = ConnectionInfo(f"{os.getpid():x}-{next(_connection_ids):x}", "")
        self.conn: asyncssh.SSHServerConnection | None = None
        self.backend: ConnectionHandler | None = None
        self.sessions: dict[int, SpecSession] = {}
        self.admitted = False
        self.lost = False  # the transport is gone: nothing can be sent any more
        self.counted_as_startup = False
        self._channel_ids = itertools.count(0)
        self._signed_key_verdict: str | None = None
        self._keepalive: asyncio.Task[None] | None = None

    def fire(self, event: str, *, reason: str | None = None, method: str | None = None,
             channel_id: int | None = None, request_type: str | None = None) -> Step:
        step = self.machine.fire(self.state, event)
        if step.moved and step.target == "closed" and self.sessions:
            # The server ends the connection (keepalive NORESP...): its channels end
            # first, so SSH_DISCONNECTED stays the connection's last record.
            for session in list(self.sessions.values()):
                session.connection_lost(None)
        if records := self.server.emitter.records(step.codes):
            info = self.info  # Labels' field values in order, taken now; the batch encodes them
            self.server.logger.add(records, Labels(info.connection_id, info.remote_addr, info.username,
                                   channel_id, request_type, method, reason, None, None, event))
        if step.reply in DISCONNECT_REASON and self.conn is not None and not self.lost:
            code, text = DISCONNECT_REASON[step.reply]
            self.conn.disconnect(code, reason or text)
        if step.moved and step.target == "closed":
            self._closed()
        return step

    def _closed(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        self._startup_done()
        self.server.connection_closed(self)

    def _startup_done(self) -> None:
        if self.counted_as_startup:
            self.counted_as_startup = False
            self.server.fire("startup_done")

    # -- asyncssh's SSHServer callbacks

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.info.remote_addr = f"{peer[0]}:{peer[1]}"
        step = self.server.fire("accept", remote_addr=self.info.remote_addr)
        if step.reply != "admit":
            conn.abort()
            return
        self.admitted = self.counted_as_startup = True
        self.server.connections.add(self)
        internals.install_hooks(conn, self, max_pending_global=self.server.config.limits.max_queued_requests,
                                per_user_config=False)  # no config file: nothing to re-evaluate per user
        try:
            self.backend = self.server.handler.connection(self.info)
        except Exception as exc:  # a handler bug ends this connection, logged, and frees its slot
            self.fire("connected")
            self.fire("lost", reason=f"handler error: {exc!r}")
            self.lost = True
            conn.abort()
            return
        self.fire("connected")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        self.lost = True
        for session in list(self.sessions.values()):
            session.connection_lost(exc)
        if internals.is_login_timeout(exc):
            self.fire("login_timeout", reason="login timeout expired")
        elif isinstance(exc, asyncssh.ProtocolError):
            self.fire("protocol_error", reason=str(exc))
        else:
            self.fire("lost", reason=str(exc) if exc else "closed")

    def begin_auth(self, username: str) -> bool:
        self.info.username = username
        banner = self.server.config.ssh.banner
        if banner and self.conn is not None:
            self.conn.send_auth_banner(banner)
        return True  # authentication is always required; "none" never succeeds

    def password_auth_supported(self) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def kbdint_auth_supported(self) -> bool:
        return True

    def auth_completed(self) -> None:
        self._startup_done()
        interval = self.server.config.ssh.client_alive_interval
        if interval > 0:
            self._keepalive = asyncio.get_running_loop().create_task(self._keepalives(interval))

    # -- hooks: every USERAUTH_REQUEST, answer, global request and channel open

    def on_service_request(self, conn: asyncssh.SSHServerConnection, service: str | None) -> bool:
        # paramiko asks for ssh-userauth before every attempt; OpenSSH allows it.
        return service == "ssh-userauth"

    def on_kex_done(self, conn: asyncssh.SSHServerConnection, count: int) -> None:
        if count == 1:
            self.fire("auth_begin")

    def on_auth_request(self, conn: asyncssh.SSHServerConnection, req: internals.AuthRequest) -> None:
        method = req.method or repr(req.raw_method)
        if req.username is not None:
            self.info.username = req.username
        if req.malformed is not None:
            return  # asyncssh disconnects on it (HACKS.md); connection_lost reports it
        if method == "publickey" and req.publickey is not None:
            event = "publickey_query" if req.publickey.is_query else "publickey"
        else:
            event = AUTH_EVENT.get(method, "other_method")
        self.fire(event, method=method)

    def on_auth_result(self, conn: asyncssh.SSHServerConnection, res: internals.AuthResult) -> None:
        if self.state.state not in ("checking", "querying"):
            return
        method = res.request.method if res.request else None
        if self._signed_key_verdict is not None:
            # asyncssh verifies a publickey signature after asking validate_public_key,
            # so the attempt's verdict is known only now, just before the answer goes out.
            verdict, self._signed_key_verdict = self._signed_key_verdict, None
            if res.kind == "success":
                self._verdict(verdict, "publickey")  # may disconnect instead of the success
            else:
                self.fire(f"auth_{verdict if verdict != 'ok' else 'bad'}", method=method,
                          reason=None if verdict != "ok" else "bad signature")
        elif res.kind == "failure":
            # asyncssh answered without asking a validator (an undecodable key).
            self.fire("auth_bad", method=method, reason="rejected by the SSH layer")

    async def validate_password(self, username: str, password: str) -> bool:
        assert self.backend is not None
        try:
            verdict = await self.backend.check_password(username, password.encode("utf-8", "surrogateescape"))
        except Exception as exc:  # a handler bug is a failure reply, not a dead connection
            return self._verdict("unavailable", "password", reason=f"handler error: {exc!r}")
        return self._verdict(verdict, "password")

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        assert self.backend is not None
        asked_in, reason = self.state.state, None
        try:
            verdict = self.backend.check_publickey(username, key)
            if inspect.isawaitable(verdict):  # a backend that asks elsewhere
                verdict = await verdict
        except Exception as exc:  # a handler bug is a failure reply, not a dead connection
            verdict, reason = "unavailable", f"handler error: {exc!r}"
        if self.state.state != asked_in:
            return False  # the connection ended while the check ran
        if asked_in == "querying":
            return self.fire(f"auth_{verdict}", method="publickey", reason=reason).reply == "pk_ok"
        self._signed_key_verdict = verdict  # fired in on_auth_result, after the signature check
        return verdict == "ok"

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> Any:
        assert self.backend is not None
        if self.state.state != "checking":
            return False
        reason = None
        try:
            supported = self.backend.kbdint_supported(username)
        except Exception as exc:  # a handler bug is a failure reply, not a dead connection
            supported, reason = False, f"handler error: {exc!r}"
        if not supported:
            self.fire("auth_unavailable", method="keyboard-interactive", reason=reason)
            return False
        self.fire("challenge", method="keyboard-interactive")
        return ("", "", "", [("Password: ", False)])

    async def validate_kbdint_response(self, username: str, responses: Any) -> Any:
        assert self.backend is not None
        step = self.fire("kbdint_response", method="keyboard-interactive")
        if step.target != "checking":
            return False
        password = (responses[0] if responses else "").encode("utf-8", "surrogateescape")
        try:
            verdict = await self.backend.check_password(username, password)
        except Exception as exc:  # a handler bug is a failure reply, not a dead connection
            return self._verdict("unavailable", "keyboard-interactive", reason=f"handler error: {exc!r}")
        return self._verdict(verdict, "keyboard-interactive")

    def _verdict(self, verdict: str, method: str, reason: str | None = None) -> bool:
        if self.state.state != "checking":
            return False  # the connection ended while the check ran
        step = self.fire(f"auth_{verdict}", method=method, reason=reason)
        if step.target != "authenticated":
            return False
        assert self.backend is not None and self.info.username is not None
        reason = None
        try:
            accepted = self.backend.accept_user(self.info.username)
        except Exception as exc:
            accepted, reason = False, f"handler error: {exc!r}"
        step = self.fire("backend_accepted" if accepted else "backend_rejected", method=method,
                         reason=reason)
        return step.reply == "accept_user"

    def on_global_request(self, conn: asyncssh.SSHServerConnection,
                          req: internals.GlobalRequest) -> bool:
        if req.malformed is not None:
            step = self.fire("global_request_malformed", request_type=repr(req.raw_name),
                             reason=req.malformed)
        else:
            step = self.fire("global_request", request_type=req.name)
        return step.reply == "success"

    def on_global_overflow(self, conn: asyncssh.SSHServerConnection, req: internals.GlobalRequest) -> None:
        self.fire("global_request", request_type=req.name, reason="too many pending global requests")

    def on_reply_failed(self, conn: asyncssh.SSHServerConnection, failure: internals.ReplyFailure) -> None:
        self.fire("reply_send_failed", reason=failure.reason)

    def on_channel_open(self, conn: asyncssh.SSHServerConnection,
                        req: internals.ChannelOpenRequest) -> Any:
        kind = req.type or repr(req.raw_type)
        if req.malformed is not None:
            return _open_failure(self.fire("channel_open_malformed", request_type=kind,
                                           reason=req.malformed), "Malformed channel open")
        if req.type != "session":
            return _open_failure(self.fire("channel_open_unsupported", request_type=kind),
                                 f"Unsupported channel type {kind!r}")
        channel_id = next(self._channel_ids)
        step = self.fire("session_open", channel_id=channel_id, request_type="session")
        if step.reply != "open_session":
            return _open_failure(step, "Session refused")
        assert self.backend is not None
        try:
            handler = self.backend.session()
        except Exception as exc:
            return _open_failure(self.fire("session_open_failed", channel_id=channel_id,
                                           reason=f"handler error: {exc!r}"), "Session refused by backend")
        session = SpecSession(self, channel_id, handler)
        chan = internals.HookedServerChannel(
            conn, session.on_request, on_reply_failed=session.on_reply_failed,
            on_overflow=session.on_overflow,
            max_pending=self.server.config.limits.max_queued_requests)
        session.chan = chan
        self.sessions[channel_id] = session
        return chan, session

    def channel_closed(self, session: SpecSession) -> None:
        if self.sessions.pop(session.channel_id, None) is None:
            return
        self.fire("channel_closed", channel_id=session.channel_id)
        if not self.sessions and self.state.state == "draining":
            self.fire("drained", reason="server shutdown")

    # -- keepalives (ssh.clientAliveInterval) and shutdown

    async def _keepalives(self, interval: float) -> None:
        assert self.conn is not None
        while self.state.state in ("established", "draining"):
            await asyncio.sleep(interval)
            step = self.fire("keepalive_due")
            if step.reply != "send_keepalive":
                return
            result = await internals.send_keepalive(self.conn, timeout=interval)
            if result.answered:
                self.fire("keepalive_answered")

    def shutdown(self) -> None:
        step = self.fire("shutdown", reason="server shutdown")
        if step.target == "draining":
            if not self.sessions:
                self.fire("drained", reason="server shutdown")
            for session in list(self.sessions.values()):
                session.shutdown()

    def abort(self) -> None:
        if self.conn is not None:
            self.conn.abort()


# --- the server -----------------------------------------------------------------------------


class StartError(Exception):
    """The server could not start (SSH_START_FAILED was logged)."""


class Server:
    """The listening service: drives the server machine, owns the connections."""

    def __init__(self, config: Config, handler: Handler | None = None, *,
                 logger: Logger | None = None, reuse_port: bool = False) -> None:
        self.config = config
        self.reuse_port = reuse_port  # --workers: every worker binds the same port
        self.logger = logger or Logger(level=config.log.level, format=config.log.format,
                                       path=config.log.file or None,
                                       flush_interval=config.log.flush_interval)
        self.emitter = Emitter(self.logger)
        self.machines = Machines.from_config(config)
        self.state = self.machines.server.new()
        self.handler = handler if handler is not None else configured_handler(config)
        self.connections: set[SpecConnection] = set()
        self.acceptor: asyncssh.SSHAcceptor | None = None
        self.sock: socket.socket | None = None
        self.address: tuple[str, int] | None = None
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    def fire(self, event: str, **labels: Any) -> Step:
        step = self.machines.server.fire(self.state, event)
        if records := self.emitter.records(step.codes):
            self.logger.add(records, Labels(event=event, **labels))
        return step

    async def start(self) -> None:
        if self.fire("start").kind == "refuse":
            raise RuntimeError("sshspec server is already running (SSH_ALREADY_RUNNING)")
        host, port = self.config.ssh.listen
        try:
            internals.assert_asyncssh_compat()  # a moved asyncssh private fails here, loudly
            keys = load_host_keys(self.config)
            options = server_options(
                self.config.ssh.profile, kex=self.config.ssh.kex or None,
                ciphers=self.config.ssh.ciphers or None, macs=self.config.ssh.macs or None,
                host_key_algs=self.config.ssh.host_key_algorithms or None, host_keys=keys)
            self.sock = self._listen_socket(host, port)
        except (OSError, ValueError, asyncssh.KeyImportError, internals.AsyncsshCompatError) as exc:
            self.fire("bind_failed", reason=f"{host}:{port}: {exc}")
            raise StartError(f"cannot start on {host}:{port}: {exc}") from exc
        version = self.config.ssh.server_version.removeprefix("SSH-2.0-")
        self.acceptor = await asyncssh.create_server(
            lambda: SpecConnection(self), sock=self.sock, server_version=version,
            login_timeout=self.config.limits.login_timeout,
            keepalive_interval=0, allow_scp=False, agent_forwarding=False,
            x11_forwarding=False, gss_host=None, **options)
        if self.state.state != "starting":  # shut down while asyncio set the listener up
            self.acceptor.close()
            await self.acceptor.wait_closed()
            return
        self.address = self.sock.getsockname()[:2]
        self.fire("listening", reason=f"{self.address[0]}:{self.address[1]}")

    def _listen_socket(self, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        # Each option on its own: SO_REUSEADDR failing must not cost SO_REUSEPORT (--workers).
        for option in ("SO_REUSEADDR", "SO_REUSEPORT") if self.reuse_port else ("SO_REUSEADDR",):
            try:
                sock.setsockopt(socket.SOL_SOCKET, getattr(socket, option), 1)
            except OSError as exc:
                self.fire("reuse_failed", reason=f"{option}: {exc}")
        try:
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def connection_closed(self, conn: SpecConnection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._all_closed.set()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, tell every connection to end, wait up to the deadline
        for their output and exit statuses, then close what is left."""
        step = self.fire("shutdown")
        if step.reply != "stop_listening":
            return
        listen_closed = True
        try:
            if self.acceptor is not None:
                self.acceptor.close()  # asyncio's Server.close() closes self.sock
            if self.sock is not None:
                self.sock.close()  # a no-op once asyncio closed it
        except OSError as exc:
            # The descriptor is released all the same (Linux), but asyncio's
            # Server.close() stopped half-way: its wait_closed() could hang.
            listen_closed = False
            self.fire("close_failed", reason=str(exc))
        if self.connections:
            self._all_closed.clear()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self.config.limits.shutdown_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(self._all_closed.wait(), deadline)
        except TimeoutError:
            if self.fire("deadline", reason=f"{len(self.connections)} connections still open").reply \
                    == "close_all":
                for conn in list(self.connections):
                    conn.abort()
            # abort() reports connection_lost on the next loop turns: wait for them.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), 5)
        self.fire("drained")
        if self.acceptor is not None and listen_closed:
            with contextlib.suppress(Exception):
                await self.acceptor.wait_closed()
        self.logger.close()


# --- defaults: host keys and the out-of-the-box login ---------------------------------------


def load_host_keys(config: Config) -> list[asyncssh.SSHKey]:
    """The configured host keys, or the state dir's ed25519 key (made on first run)."""
    if config.ssh.hostkeys:
        return [asyncssh.read_private_key(os.path.expanduser(p)) for p in config.ssh.hostkeys]
    state = resolve_state_dir(config)
    path = state / "ssh_host_ed25519_key"
    if not path.exists():
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = asyncssh.generate_private_key("ssh-ed25519", comment="sshspec host key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
        path.with_suffix(".pub").write_bytes(key.export_public_key())
        _announce(f"sshspec: created host key {path}")
    return [asyncssh.read_private_key(str(path))]


def configured_handler(config: Config, *, announce: Callable[[str], None] | None = None) -> Handler:
    """Users from the config; with none configured, the current user may log in
    with a one-time password (printed) or a key from ~/.ssh/authorized_keys."""
    users: dict[str, UserEntry] = {}
    for user in config.auth.users:
        keys = tuple(asyncssh.import_public_key(line) for line in user.authorized_keys)
        users[user.username] = UserEntry(user.password_hash, keys)
    extra_keys = _read_authorized_keys(config.auth.authorized_keys_file)
    if not users:
        from sshspec.adapters.passwords import hash_password
        name = getpass.getuser()
        password = secrets.token_urlsafe(12)
        default_file = Path.home() / ".ssh" / "authorized_keys"
        keys = extra_keys or _read_authorized_keys(str(default_file) if default_file.exists() else "")
        users[name] = UserEntry(hash_password(password), keys)
        (announce or _announce)(
            f"sshspec: log in as {name!r} with the one-time password {password}"
            + (f" or a key from {config.auth.authorized_keys_file or default_file}" if keys else ""))
    elif extra_keys:
        for name, entry in users.items():
            users[name] = UserEntry(entry.password_hash, entry.authorized_keys + extra_keys)
    return ConfiguredHandler(users, env_deny=config.backend.env_deny, max_env=config.limits.max_env,
                             shell=config.backend.shell or None)


def _read_authorized_keys(path: str) -> tuple[asyncssh.SSHKey, ...]:
    if not path:
        return ()
    keys = []
    for line in Path(os.path.expanduser(path)).read_text().splitlines():
        words = line.split()
        # options come first when present: the key starts at its algorithm name
        start = next((i for i, w in enumerate(words) if w.startswith(_KEY_TYPES)), None)
        if start is None or line.lstrip().startswith("#"):
            continue
        with contextlib.suppress(asyncssh.KeyImportError, ValueError):
            keys.append(asyncssh.import_public_key(" ".join(words[start:start + 2])))
    return tuple(keys)


_KEY_TYPES = ("ssh-", "ecdsa-", "sk-", "rsa-")


def _announce(text: str) -> None:
    # One write(2) per line: with --workers several processes share stderr, and
    # print() may split a line into two writes that interleave.
    os.write(2, (text + "\n").encode())


# --- running it -------------------------------------------------------------------------------


async def serve_async(config: Config, handler: Handler | None = None, *,
                      ready: Callable[[Server], None] | None = None, reuse_port: bool = False) -> int:
    """Run until SIGTERM or SIGINT; then shut down gracefully. Returns the exit status."""
    server = Server(config, handler, reuse_port=reuse_port)
    # Signals first: a SIGTERM that lands while the server starts (a worker that
    # just logged SSH_AVAILABLE) must still mean a graceful stop, not death.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await server.start()
        except StartError as exc:
            _announce(f"sshspec serve: {exc}")
            return 1
        assert server.address is not None
        # Everything allocated so far (modules, specs, options) lives as long as the
        # process: keep it out of the collector's generations (bench/: full
        # collections went from ~30 ms pauses to ~9 ms).
        gc.collect()
        gc.freeze()
        _announce(f"sshspec: listening on {server.address[0]}:{server.address[1]}")
        if ready is not None:
            ready(server)
        await stop.wait()
        await server.shutdown()
        return 0
    finally:
        server.logger.close()  # writes what is still queued, however we leave


def run_workers(config: Config, handler: Handler | None, workers: int) -> int:
    """`--workers N`: N forked processes, each with its own SO_REUSEPORT socket on
    the same port, so the kernel spreads connections over every core. SIGTERM or
    SIGINT to the parent is passed to every worker; each shuts down gracefully."""
    from sshspec.adapters.config import Listen
    handler = handler if handler is not None else configured_handler(config)
    try:
        load_host_keys(config)  # create the key once here, not racing in every worker
    except (OSError, ValueError, asyncssh.KeyImportError) as exc:
        _announce(f"sshspec serve: host key: {exc}")
        return 1
    host, port = config.ssh.listen
    # Reserve the port (port 0 picks one) with a bound, never listening socket
    # in the same SO_REUSEPORT group, so every worker lands on the same port.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reserve = socket.socket(family, socket.SOCK_STREAM)
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reserve.bind((host, port))
    except OSError as exc:
        _announce(f"sshspec serve: cannot start on {host}:{port}: {exc}")
        return 1
    port = reserve.getsockname()[1]
    ssh = msgspec.structs.replace(config.ssh, listen=Listen(host, port))
    config = msgspec.structs.replace(config, ssh=ssh)
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            reserve.close()
            status = 1
            try:
                status = asyncio.run(serve_async(config, handler, reuse_port=True))
            finally:
                os._exit(status)
        children.append(pid)
    reserve.close()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    for child in children:
        _, status = os.waitpid(child, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)
    return worst


def serve(handler: Handler | None = None, config: Config | None = None) -> int:
    """The public entry point: ``sshspec.adapters.serve(MyHandler(), config)``."""
    from sshspec.adapters.config import default_config
    return asyncio.run(serve_async(config or default_config(), handler))
