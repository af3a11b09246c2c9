"""The asyncssh adapter: real SSH events in, spec events through the machines,
spec verdicts out as SSH replies, every emitted code logged.

The adapter holds no protocol rule of its own. For each SSH event it fires
the spec event that names it, then carries out the `reply` of the step the
machine took. Where asyncssh decides something by itself, the reach-ins in
`asyncssh_internals` hand the decision back (see HACKS.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import getpass
import hashlib
import inspect
import itertools
import os
import random
import secrets
import signal
import socket
import struct
import time
import typing
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh
import msgspec

if typing.TYPE_CHECKING:
    from sshspec.adapters.backend_docker import DockerBackend

from sshspec.adapters import asyncssh_internals as internals
from sshspec.adapters.algorithms import server_options
from sshspec.adapters.backend_local import BackendError, PtyRequest, adopt_inherited_signals
from sshspec.adapters.config import (
    Config,
    authority_key,
    ca_file_problem,
    forward_policy_allows,
    read_authorized_keys,
    read_ca_keys,
    resolve_state_dir,
    spec_limits,
)
from sshspec.adapters.forwarding import AgentSocket, Forwarder
from sshspec.adapters.forwarding import Listener as ForwardListener
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
from sshspec.adapters.proxy_protocol import Listener, TrustedNetworks
from sshspec.codes import CATALOG
from sshspec.fsm import core
from sshspec.fsm.certificates import Certificate, CertificatePolicy

if TYPE_CHECKING:
    from sshspec.adapters.metrics import Metrics

# --- logging: one record per emitted code ------------------------------------------------


def _short(explanation: str) -> str:
    return explanation.split(". ")[0].rstrip(".")


# code -> (level, code, message): the part of a record its code fixes.
_KINDS: dict[str, Kind] = {name: kind(code.level, name, _short(code.explanation))
                           for name, code in CATALOG.items()}
# SpecConnection.log builds Labels positionally, in this order: a field moved in
# Labels must fail here, not mislabel every record.
assert Labels.__struct_fields__ == ("connection_id", "remote_addr", "username", "key_fingerprint",
                                    "channel_id", "request_type", "command", "method", "reason", "exit_code",
                                    "signal", "event", "container")


class Emitter:
    """The log records of a step's codes. Records nobody reads are not built.
    With metrics, each step's codes are counted here too (every step with codes
    asks for its records, whatever the log level)."""

    def __init__(self, logger: Logger, metrics: Metrics | None = None) -> None:
        self.logger = logger
        self.enabled = {name: logger.enabled(k.level) for name, k in _KINDS.items()}
        self._records: dict[tuple[str, ...], tuple[Kind, ...]] = {}
        # The logger's own method, not a method calling it: a Python call less per step.
        self.add = logger.add
        if metrics is not None:
            self._counts = metrics.codes
            # An instance attribute over the method: without metrics, not even a test per step.
            self.records = self._records_counted  # type: ignore[method-assign]

    def _records_counted(self, codes: tuple[str, ...]) -> tuple[Kind, ...]:
        counts = self._counts
        for code in codes:
            counts[code] += 1
        records = self._records.get(codes)
        return records if records is not None else Emitter.records(self, codes)

    def records(self, codes: tuple[str, ...]) -> tuple[Kind, ...]:
        """The records of these codes that are logged; with none, the caller skips
        building the labels (a step's codes tuple is shared, so this caches well)."""
        records = self._records.get(codes)
        if records is None:
            records = self._records[codes] = tuple(_KINDS[c] for c in codes if self.enabled[c])
        return records


# --- one session channel ------------------------------------------------------------------

MAX_COMMAND_LABEL = 1024  # characters of an exec command the log labels carry


class SpecSession(asyncssh.SSHServerSession[bytes]):
    """One session channel: asyncssh's callbacks become core events; the core's
    actions for this channel are carried out here."""

    def __init__(self, conn: SpecConnection, channel_id: int, handler: SessionHandler) -> None:
        self.conn = conn
        self.channel_id = channel_id
        self.handler = handler
        self.chan: internals.HookedServerChannel | None = None
        self._paused = False  # asyncssh holds output for the client's window
        self._transport_paused = False  # the socket's buffer is full: the client is not reading
        self._resumed: asyncio.Future[None] | None = None  # made only when someone waits
        self._waiter: asyncio.Task[None] | None = None
        self.agent: AgentSocket | None = None  # ssh -A: this session's SSH_AUTH_SOCK

    # -- asyncssh -> core

    def on_request(self, chan: internals.HookedServerChannel, req: internals.ChannelRequest) -> None:
        name = req.type if req.type is not None else repr(req.raw_type)
        malformed, decoded = req.malformed, None
        if malformed is None:
            try:
                decoded = internals.decode_request(req)
            except internals.RequestDecodeError as exc:
                malformed = exc.reason
        # The command (or subsystem) for the log: read here once, carried by the core.
        command = decoded.command if isinstance(decoded, internals.ExecRequest) else \
            decoded.name if isinstance(decoded, internals.SubsystemRequest) else None
        if command is not None and len(command) > MAX_COMMAND_LABEL:
            # It labels every record of its channel: a 256 KiB command must not be five of them.
            command = f"{command[:MAX_COMMAND_LABEL]}... ({len(command)} characters)"
        self.conn.handle(core.ChannelRequest(self.channel_id, name, req.want_reply, decoded, malformed,
                                             command))

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        # high-water 0: asyncssh tells us the moment anything waits for the
        # client's window, so the program pauses instead of the server buffering.
        chan.set_write_buffer_limits(high=0, low=0)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.handler.stdin_data(data)

    def eof_received(self) -> bool:
        self.conn.handle(core.ClientEof(self.channel_id))
        return True  # half-close: output may still flow

    def data_after_eof(self, chan: internals.HookedServerChannel, size: int) -> None:
        self.conn.handle(core.DataAfterEof(self.channel_id, size))

    def pause_writing(self) -> None:
        if not (self._paused or self._transport_paused):
            self.handler.pause_output()
        self._paused = True

    def resume_writing(self) -> None:
        self._wake()
        if not self._transport_paused:
            self.handler.resume_output()

    def transport_paused(self, paused: bool) -> None:
        # The program's output waits for the client's window (pause_writing) and for
        # the socket (this), whichever is full: neither is buffered without bound.
        if paused and not (self._paused or self._transport_paused):
            self.handler.pause_output()
        elif not paused and self._transport_paused and not self._paused:
            self.handler.resume_output()
        self._transport_paused = paused

    def _wake(self) -> None:
        self._paused = False
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._wake()
        self.close_agent()  # the session ended: its agent socket and directory go
        if self.chan is not None:
            self.chan.release()  # asyncssh called this from the channel's cleanup: it is closed
        if self.chan is not None and internals.connection_gone(self.chan):
            # The whole connection ended (asyncssh closes its channels first): the
            # core's ConnectionLost closes every channel, then ends the connection
            # with its own event (a draining one too, which would otherwise drain).
            return
        self.conn.handle(core.ChannelClosed(self.channel_id, str(exc) if exc else None))

    # -- the core's actions for this channel

    def ask_backend(self, request: core.ChannelRequest) -> core.RequestDone:
        """A setup or running request: the handler answers at once."""
        h, decoded = self.handler, request.payload
        ok: object  # the core checks that it is a bool
        if isinstance(decoded, internals.EnvRequest):
            ok, reason = _ask(h.set_env, decoded.name, decoded.value)
        elif isinstance(decoded, internals.PtyRequest):
            pty = PtyRequest(decoded.term, decoded.cols, decoded.rows, decoded.width_px, decoded.height_px,
                             dict(decoded.modes))
            ok, reason = _ask(h.set_pty, pty)
        elif isinstance(decoded, internals.WindowChange):
            ok, reason = _ask(h.window_change, decoded.cols, decoded.rows, decoded.width_px,
                              decoded.height_px)
        elif isinstance(decoded, internals.SignalRequest):
            ok, reason = _ask(h.signal, decoded.name)
        elif request.name == core.AGENT_REQUEST:
            ok, reason = self.start_agent()
        else:
            ok, reason = False, None
        return core.RequestDone(self.channel_id, ok, reason)

    def start_agent(self) -> tuple[bool, str | None]:
        """ssh -A: the session's agent socket (its programs get SSH_AUTH_SOCK), behind which
        is the client's agent or the one the handler serves (its agent_target)."""
        if self.agent is None:
            backend = self.conn.backend
            assert backend is not None  # (a session exists only once the backend made it)
            target, reason = _ask(backend.agent_target)
            if target is None or target is False:
                return False, f"refused by the handler: {reason}" if reason else "refused by the handler"
            if target is not True and not callable(target):
                return False, f"handler error: agent_target() returned {target!r}"
            try:
                self.agent = AgentSocket(self.conn, self.channel_id, None if target is True else target)
            except OSError as exc:
                return False, f"agent socket: {exc.strerror or exc}"
        return True, None

    def close_agent(self) -> None:
        agent, self.agent = self.agent, None
        if agent is not None:
            agent.close()

    async def start_program(self, request: core.ChannelRequest, forced_command: str | None = None) -> None:
        assert self.chan is not None
        chan, decoded = self.chan, request.payload
        kind, command = request.name, getattr(decoded, "command", None)
        subsystem = getattr(decoded, "name", None) if request.name == "subsystem" else None
        server_env = self._server_env(chan)
        if forced_command is not None:
            # sshd: the forced command runs instead, and what the client asked for (an exec's
            # command; here a subsystem's name, where sshd puts the subsystem's program) is
            # in SSH_ORIGINAL_COMMAND; a shell request leaves it unset.
            original = command if kind == "exec" else subsystem
            if original is not None:
                server_env["SSH_ORIGINAL_COMMAND"] = original
            kind, command, subsystem = "exec", forced_command, None
        # Keystroke cover (an IGNORE before each packet) for a pty only: a program
        # without one is a stream (exec, sftp), where it doubled the packets (HACKS.md row 33).
        chan.set_interactive(self.handler.pty_request is not None)
        io = SessionIO(
            kind=kind,  # type: ignore[arg-type]  # shell | exec | subsystem (core.START_REQUESTS)
            command=command,
            subsystem=subsystem,
            env=self.handler.env, pty=self.handler.pty_request,
            write=chan.write, write_stderr=chan.write_stderr,
            pause_input=lambda paused: chan.pause_reading() if paused else chan.resume_reading(),
            server_env=server_env)
        metrics = self.conn.server.metrics
        started = time.perf_counter() if metrics is not None else 0.0
        _, reason = await _ask_async(self.handler.start, io)
        if metrics is not None and reason is None:
            metrics.observe_session_start(request.name, time.perf_counter() - started)
        self.conn.handle(core.RequestDone(self.channel_id, reason is None, reason))

    def program_started(self) -> None:
        # The client has the SUCCESS reply: only now may the program's output and
        # end (exit status, close) follow, or the reply would come after the close.
        assert self.chan is not None
        self.handler.started()
        self._waiter = asyncio.get_running_loop().create_task(self._wait_for_exit())
        self._waiter.add_done_callback(self.conn._task_done)  # (not one of its _tasks)
        self.chan.start_io()

    def _server_env(self, chan: asyncssh.SSHServerChannel[bytes]) -> dict[str, str]:
        peer = chan.get_extra_info("peername") or ("", 0)
        sock = chan.get_extra_info("sockname") or ("", 0)
        env = {"SSH_CONNECTION": f"{peer[0]} {peer[1]} {sock[0]} {sock[1]}",
               "SSH_CLIENT": f"{peer[0]} {peer[1]} {sock[1]}"}
        if self.agent is not None:
            env["SSH_AUTH_SOCK"] = self.agent.path
        return env

    async def _wait_for_exit(self) -> None:
        try:
            status = await self.handler.wait()
        except asyncio.CancelledError:
            return
        except Exception as exc:  # could not obtain the status: report an abnormal end
            reason = f"handler error: {exc!r}"
            self.conn.handle(core.ProgramEnded(self.channel_id, None, "ABRT", False, reason))
            return
        self.conn.handle(core.ProgramEnded(self.channel_id, status.code, status.signal, status.core_dumped))

    def send_exit(self, action: core.SendExit) -> None:
        # Output first, then EOF, then the status: while asyncssh holds output
        # back for the client's window, wait until its send buffer is empty.
        if self._paused:
            self.conn._task(self._send_exit_drained(action))
        else:
            self._exit(action)

    async def _send_exit_drained(self, action: core.SendExit) -> None:
        self._resumed = asyncio.get_running_loop().create_future()
        await self._resumed
        self._exit(action)

    def _exit(self, action: core.SendExit) -> None:
        chan = self.chan
        assert chan is not None
        try:
            chan.write_eof()
            if action.signal is None:
                chan.exit(action.exit_code if action.exit_code is not None else 255)
            else:
                chan.exit_with_signal(action.signal, action.core_dumped)
        except Exception as exc:  # the client went away under us
            self.conn.handle(core.ExitSendFailed(self.channel_id, str(exc) or type(exc).__name__))
            chan.abort()
            return
        # The status goes out at the end of the turn with the rest (asyncssh_internals._Turn).
        internals.when_send_fails(chan, self._exit_send_failed)

    def _exit_send_failed(self) -> None:
        self.conn.handle(core.ExitSendFailed(self.channel_id, "send failed"))


# --- one connection -----------------------------------------------------------------------

_connection_ids = itertools.count(1)


class ConnectionLog:
    """One connection's log sink (the core's `log`): the records of a step's codes,
    labelled with who the connection is (`identity`, set by SpecConnection)."""

    __slots__ = ("emitter", "identity")

    def __init__(self, emitter: Emitter, identity: Labels) -> None:
        self.emitter = emitter
        self.identity = identity

    def log(self, codes: tuple[str, ...], event: str, *, channel_id: int | None = None,
            request_type: str | None = None, command: str | None = None, method: str | None = None,
            reason: str | None = None, exit_code: int | None = None, signal: str | None = None,
            container: str | None = None) -> None:
        emitter = self.emitter
        if records := emitter.records(codes):
            who = self.identity
            # Positional, in Labels' field order: one C call, no keyword dict (structs.replace
            # with keywords cost ~1k instructions a step more).
            emitter.add(records, Labels(who.connection_id, who.remote_addr, who.username, who.key_fingerprint,
                                        channel_id, request_type, command, method, reason, exit_code, signal,
                                        str(event), container))


def key_fingerprint(blob: bytes) -> str:
    """A public key's fingerprint as OpenSSH prints it (ssh-keygen -l, sshd's "Accepted
    publickey ... SHA256:..."): the SHA-256 of the key blob, base64 without padding."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
# The user-key signature algorithms that mean SHA-1 (auth.allowSha1Rsa accepts them).
SHA1_KEY_ALGORITHMS = frozenset({"ssh-rsa", "ssh-rsa-cert-v01@openssh.com"})


class SpecConnection(asyncssh.SSHServer, internals.ConnectionHooks):
    """One connection: asyncssh's callbacks and hooks become core events, and the
    core's actions are carried out. asyncssh makes one per TCP connection."""

    def __init__(self, server: Server, admission: core.Admission) -> None:
        self.server = server
        self.admission = admission  # the server core admitted it (the gate's `Server.arrival`)
        self.info = ConnectionInfo(f"{os.getpid():x}-{next(_connection_ids):x}", "")
        # The core's log sink is an object of its own, not a method of this one: the
        # core is this connection's, and a bound method would close a reference cycle
        # (see _release).
        self.records = ConnectionLog(server.emitter, Labels(self.info.connection_id))
        self.log = self.records.log
        self.core = core.ConnectionCore(server.machines, server.core, self.log,
                                        keepalive_interval=server.config.ssh.client_alive_interval,
                                        refused_key_algorithms=SHA1_KEY_ALGORITHMS
                                        if not server.config.auth.allow_sha1_rsa else frozenset(),
                                        failure_delay=server.config.auth.failure_delay,
                                        forwarding=server.forward_policy,
                                        certificates=server.certificates)
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer_host: str | None = None  # the client's IP address (a certificate's source-address)
        self.forwards: dict[int, Forwarder] = {}
        self.listeners: dict[tuple[str, int], ForwardListener] = {}  # ssh -R, as the client names them
        # A tcpip-forward's answer, waiting for its bind (a global request is answered in order).
        self._global_answer: asyncio.Future[bool | bytes] | None = None
        self.backend: ConnectionHandler | None = None
        self.sessions: dict[int, SpecSession] = {}
        self.admitted = False
        # Who logged in is settled once the backend is asked about the user: auth requests
        # the client sends after that (RFC 4252 5.1: ignored) rename nobody in the log or
        # in ConnectionInfo.
        self.user_settled = False
        self.transport_paused = False  # the socket's write buffer is past its high-water mark
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # A backend deciding on the authenticated user at its own pace (a config server,
        # the docker backend starting the container): its answer to come, and the auth method.
        self._verdict: tuple[asyncio.Task[tuple[object, str | None]], str] | None = None
        self.sock: Any = None  # with metrics: the socket, whose TCP counters are the bytes in and out
        self._hold_until = 0.0  # a failed attempt's answer time: the next attempt is not checked before
        self.released = False  # asyncssh is done with it and the hooks are off (_release)
        self.ended = False  # the core ended it (ConnectionEnded)

    @property
    def identity(self) -> Labels:
        """Who: every record's first labels."""
        return self.records.identity

    def log_container(self, codes: tuple[str, ...], event: str, reason: str | None, container: str) -> None:
        """A record of one of this connection's containers (the docker backend's)."""
        self.log(codes, event, reason=reason, container=container)

    def end_by_backend(self, reason: str) -> None:
        """The backend lost what the connection runs on (docker: its container died): the
        connection ends, by the server, with the reason (its sessions with it)."""
        if self.conn is not None:
            self.handle(core.ConnectionLost(core.Lost.lost, reason, by_server=True))
            self.conn.abort()

    def _identify(self, *, remote_addr: str | None = None, username: str | None = None,
                  key: bytes | None = None) -> None:
        """Who the connection is, for the handlers (ConnectionInfo) and the log (identity):
        built when that changes, not per record. `key`: the public key blob of a
        publickey request (b"": a request by another method, which forgets it)."""
        if remote_addr is not None:
            self.info.remote_addr = remote_addr
        if username is not None:
            self.info.username = username
        fingerprint = self.identity.key_fingerprint
        if key is not None:
            fingerprint = key_fingerprint(key) if key else None
        info = self.info
        self.records.identity = Labels(info.connection_id, info.remote_addr, info.username, fingerprint)

    # -- events in, actions out

    def handle(self, event: core.Event) -> list[core.Action]:
        """Hand the core an event and carry out its actions, in order. An action
        that asks something (the backend, a handler, how a send went) hands the
        answer back as the next event; every action of that chain is returned.
        (A loop, not recursion: a thousand queued requests are a thousand links.
        The core ends a batch at an action that waits for an answer.)"""
        return self._carry_out(self.core.handle(event))

    def _carry_out(self, actions: list[core.Action]) -> list[core.Action]:
        done = list(actions)
        durable = self.server.durable_log
        while actions:
            follow = None
            for action in actions:
                if durable is not None and type(action) in core.REACHES_CLIENT:
                    if type(action) in WRITTEN_FIRST:
                        durable.write_queued()  # the records first, then what the client sees
                    else:
                        self.server.log_owed = True  # written before the turn's packets go
                answer = _EXECUTORS[type(action)](self, action)
                if answer is not None:
                    assert follow is None, f"{action} answered after another action did"
                    follow = answer
            actions = self.core.handle(follow) if follow is not None else []
            done.extend(actions)
        if self.core.get_timer() != self._timer_at:
            self._arm_timer()
        return done

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at = self.core.get_timer()
        if at is not None:
            self._timer = asyncio.get_running_loop().call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, None
        loop = asyncio.get_running_loop()
        self._carry_out(self.core.handle_timer(loop.time()))

    def _task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self.released:
            self._let_go()

    # -- executors: one per action type (checked complete at import, below)

    def _disconnect(self, action: core.Disconnect) -> None:
        if self.conn is not None:
            self.conn.disconnect(action.code, action.description)

    def _drop(self, action: core.Drop) -> None:
        if self.conn is not None:
            self.conn.abort()  # asyncio drops its write buffer: what the client did not read

    def _answered(self, action: core.Action) -> None:
        """Carried out by the asyncssh callback that is waiting for the core (its return value)."""

    def _admit_user(self, action: core.AdmitUser) -> core.Event | None:
        assert self.backend is not None and self.info.username is not None
        self.user_settled = True
        accepted, reason = _ask(self.backend.accept_user, self.info.username)
        if not inspect.isawaitable(accepted):
            return core.UserVerdict(accepted, action.method, reason)
        # The backend takes its time: the verdict is handed over when it comes, before
        # USERAUTH_SUCCESS may go (on_auth_result); the task is the backend's, not the
        # auth's, so asyncssh cancelling the auth does not cut the backend's work short.
        task = asyncio.get_running_loop().create_task(_ask_async(_awaited, accepted))
        self._verdict = (task, action.method)
        return None

    async def _admitted(self) -> None:
        """USERAUTH_SUCCESS waits here for the backend's verdict on the user."""
        assert self._verdict is not None
        task, method = self._verdict
        try:
            accepted, reason = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                return  # the connection ended meanwhile (_connection_ended): no SUCCESS goes out
            raise
        self._verdict = None
        self.handle(core.UserVerdict(accepted, method, reason))

    def _answer(self, actions: list[core.Action]) -> bool:
        """Whether the auth request the SSH layer is answering gets a positive answer
        (or one held until the backend's verdict: `_admitted`)."""
        return _accepted(actions) or self._verdict is not None

    def _open_session(self, action: core.OpenSession) -> core.Event | None:
        assert self.backend is not None and self.conn is not None
        handler, reason = _ask(self.backend.session)
        if handler is None:
            reason = reason or f"handler error: session() returned {handler!r}"
            return core.SessionOpenFailed(action.channel, reason)
        session = SpecSession(self, action.channel, handler)  # type: ignore[arg-type]  # a SessionHandler by the API
        session._transport_paused = self.transport_paused
        session.chan = internals.HookedServerChannel(self.conn, session.on_request,
                                                     on_data_after_eof=session.data_after_eof)
        self.sessions[action.channel] = session
        return None

    def _open_forward(self, action: core.OpenForward) -> None:
        assert self.backend is not None
        target, reason = _ask(self.backend.forward_target, action.host, action.port)
        forwarder = self.forwards[action.channel] = Forwarder(self, action.channel)
        forwarder.connect(target, action.timeout, reason)  # type: ignore[arg-type]

    def _bind(self, action: core.Bind) -> None:
        self._global_answer = asyncio.get_running_loop().create_future()
        self._task(self._bind_listener(action))

    async def _bind_listener(self, action: core.Bind) -> None:
        listener = ForwardListener(self, action.host)
        try:
            listener.server = await asyncio.get_running_loop().create_server(
                listener.protocol, action.address, action.port)
        except OSError as exc:
            result = core.ListenResult(None, exc.strerror or str(exc))
        else:
            listener.port = listener.server.sockets[0].getsockname()[1]
            self.listeners[action.host, listener.port] = listener
            result = core.ListenResult(listener.port)
        self.handle(result)

    def _unbind(self, action: core.Unbind) -> None:
        listener = self.listeners.pop((action.host, action.port), None)
        if listener is not None:
            listener.close()

    def _global_reply(self, action: core.GlobalReply) -> None:
        """A tcpip-forward's answer, once its bind is done (the others' answers are carried
        out by on_global_request's return value)."""
        answer, self._global_answer = self._global_answer, None
        if answer is not None and not answer.done():
            answer.set_result(_global_answer(action))

    def accepted(self, listener: ForwardListener, transport: asyncio.Transport, protocol: Any) -> None:
        """A listener accepted a connection: a forwarded-tcpip channel, if the core opens one."""
        peer = transport.get_extra_info("peername") or ("", 0)
        self._accepted(core.ForwardedConnection(listener.host, listener.port, str(peer[0]), int(peer[1])),
                       transport, protocol)

    def agent_client(self, agent: AgentSocket, transport: asyncio.Transport, protocol: Any) -> None:
        """A program connected to its session's agent socket: a channel to the client's agent."""
        self._accepted(core.ForwardedConnection("", 0, f"session {agent.channel}", 0, core.AGENT_CHANNEL),
                       transport, protocol)

    def _accepted(self, event: core.ForwardedConnection, transport: asyncio.Transport, protocol: Any) -> None:
        for action in self.handle(event):
            if isinstance(action, core.OpenForwarded) and action.channel in self.forwards:
                self.forwards[action.channel].attach(transport, protocol)
                return
        transport.close()

    def _open_forwarded(self, action: core.OpenForwarded) -> None:
        assert self.conn is not None
        forwarder = self.forwards[action.channel] = Forwarder(self, action.channel)
        if action.kind == core.AGENT_CHANNEL:
            forwarder.open_agent(self.conn, action.timeout)
        else:
            forwarder.open_to_client(self.conn, action.host, action.port, action.origin_host,
                                     action.origin_port, action.timeout)

    def _confirm_forward(self, action: core.ConfirmForward) -> None:
        self.forwards[action.channel].confirm()

    def _reject_forward(self, action: core.RejectForward) -> None:
        self.forwards.pop(action.channel).reject(action.code, action.description)

    def _forward_send_eof(self, action: core.ForwardSendEof) -> None:
        forwarder = self.forwards[action.channel]
        if action.close:
            del self.forwards[action.channel]
        forwarder.send_eof(action.to_client, action.close)

    def _close_forward(self, action: core.CloseForward) -> None:
        forwarder = self.forwards.pop(action.channel, None)
        if forwarder is not None:
            forwarder.close()

    def _send_keepalive(self, action: core.SendKeepalive) -> None:
        self._task(self._keepalive(action.timeout))

    async def _keepalive(self, timeout: float) -> None:
        assert self.conn is not None
        result = await internals.send_keepalive(self.conn, timeout=timeout)
        self.handle(core.KeepaliveResult(result.answered, asyncio.get_running_loop().time()))

    def _ask_backend(self, action: core.AskBackend) -> core.Event:
        return self.sessions[action.channel].ask_backend(action.request)

    def _start_program(self, action: core.StartProgram) -> None:
        self._task(self.sessions[action.channel].start_program(action.request, action.forced_command))

    def _channel_reply(self, action: core.ChannelReply) -> core.Event:
        session = self.sessions.get(action.channel)
        chan = session.chan if session is not None else None
        problem = chan.reply(action.ok) if chan is not None else "channel closed"
        return core.ChannelReplied(action.channel, problem)

    def _program_started(self, action: core.ProgramStarted) -> core.Event:
        self.sessions[action.channel].program_started()
        return core.IoStarted(action.channel)

    def _close_stdin(self, action: core.CloseStdin) -> None:
        self.sessions[action.channel].handler.stdin_eof()

    def _send_exit(self, action: core.SendExit) -> None:
        self.sessions[action.channel].send_exit(action)

    def _end_program(self, action: core.EndProgram) -> None:
        session = self.sessions.get(action.channel)
        if session is not None:
            session.handler.close()

    def _terminate_program(self, action: core.TerminateProgram) -> None:
        handler = self.sessions[action.channel].handler
        if not handler.signal("TERM"):
            handler.close()

    def _close_channel(self, action: core.CloseChannel) -> None:
        chan = self.sessions[action.channel].chan
        if chan is not None:
            chan.close()

    def _connection_ended(self, action: core.ConnectionEnded) -> None:
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()
        for session in self.sessions.values():
            session.close_agent()
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, None
        if self.backend is not None:
            _ask(self.backend.close)  # its container released (docker), whatever the backend holds
        if self._verdict is not None:
            # Nobody waits for that verdict any more: a config server's call ends (a container
            # being made is the docker backend's to release, which close() just asked).
            self._verdict[0].cancel()
            self._verdict = None
        if self.sock is not None and self.server.metrics is not None:
            self.server.metrics.connection_ended(self.sock)
            self.sock = None
        self.server.connection_closed(self)
        self.ended = True
        self._let_go()

    # -- asyncssh's SSHServer callbacks

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.peer_host = peer[0] if peer[0] != "?" else None
        self._identify(remote_addr=f"{peer[0]}:{peer[1]}")
        self.admitted = True
        if self.server.metrics is not None:
            self.sock = conn.get_extra_info("socket")
        self.server.connections.add(self)
        durable = self.server.durable_log
        internals.install_hooks(conn, self, max_pending_global=self.server.config.limits.max_queued_requests,
                                per_user_config=False,  # no config file: nothing to re-evaluate per user
                                before_send=None if durable is None else self.server.write_owed)
        backend, reason = _ask(self.server.handler.connection, self.info)
        if backend is not None and self.server.docker is not None:
            backend = self.server.docker.connection(backend, self.server.handler, self.info,  # type: ignore[arg-type]
                                                    self.log_container, self.end_by_backend)
        self.handle(core.Connected(self.admission.source))
        if backend is None:  # a handler bug ends this connection, logged
            self.handle(core.ConnectionLost(core.Lost.lost, reason or f"handler error: connection() returned "
                                                                      f"{backend!r}", by_server=True))
            conn.abort()
            return
        self.backend = backend  # type: ignore[assignment]  # a ConnectionHandler by the API

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        if internals.is_login_timeout(exc):
            how, reason = core.Lost.login_timeout, "login timeout expired"
        elif isinstance(exc, internals.DecompressionLimitError):
            how, reason = core.Lost.decompression_limit, str(exc)
        elif isinstance(exc, asyncssh.KeyExchangeFailed):
            how, reason = core.Lost.negotiation_failed, str(exc)
        elif isinstance(exc, asyncssh.ProtocolError):
            how, reason = core.Lost.protocol_error, str(exc)
        else:
            how, reason = core.Lost.lost, str(exc) if exc else "closed"
        self.handle(core.ConnectionLost(how, reason, asyncio.get_running_loop().time()))
        asyncio.get_running_loop().call_soon(self._release)

    def _release(self) -> None:
        """After asyncssh's cleanup (which called connection_lost): break the reference
        cycles between the connection and our hooks and sessions, so that reference
        counting frees it all when the last user lets go. Left to the cyclic collector
        (as it all was), a connection's ~120 objects were promoted through its
        generations while the connection lived and found dead only by a full
        collection: twice the collector's time per connection of a bare asyncssh
        server (bench/, ~50 us of ~1.3 ms)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            internals.release_hooks(conn)
        self.released = True
        self._let_go()

    def _let_go(self) -> None:
        """Once the connection is released and ended and nothing of it still runs: its
        sessions go (each refers back to this connection). Anything still running keeps
        them, and the collector frees them later, as before."""
        if not (self.released and self.ended) or self._tasks or not self.sessions:
            return
        if any(s._waiter is not None and not s._waiter.done() for s in self.sessions.values()):
            return
        self.sessions = {}

    def begin_auth(self, username: str) -> bool:
        self._identify(username=username)
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
        self.handle(core.AuthCompleted(asyncio.get_running_loop().time()))

    # -- hooks: every USERAUTH_REQUEST, answer, global request and channel open

    def on_service_request(self, conn: asyncssh.SSHServerConnection, service: str | None) -> bool:
        # paramiko asks for ssh-userauth before every attempt; OpenSSH allows it.
        return service == "ssh-userauth"

    def on_kex_done(self, conn: asyncssh.SSHServerConnection, count: int) -> None:
        if count == 1:
            self.info.client_version = conn.get_extra_info("client_version") or ""
        self.handle(core.KexDone(count))

    def on_auth_request(self, conn: asyncssh.SSHServerConnection, req: internals.AuthRequest) -> None:
        if not self.user_settled:  # the key this request is about, in every record from here on
            self._identify(username=req.username, key=req.publickey.key_blob if req.publickey else b"")
        if req.malformed is not None:
            return  # asyncssh disconnects on it (HACKS.md); connection_lost reports it
        key = req.publickey
        self.handle(core.AuthRequested(req.method or repr(req.raw_method), key.signed if key else None,
                                       key.algorithm if key else None, asyncio.get_running_loop().time()))

    def on_auth_result(self, conn: asyncssh.SSHServerConnection,
                       res: internals.AuthResult) -> Awaitable[None] | None:
        if res.kind in ("success", "failure", "superseded"):
            self.handle(core.AuthAnswered(res.kind, res.request.method if res.request else None,
                                          asyncio.get_running_loop().time()))
        if res.kind == "success" and self._verdict is not None:
            return self._admitted()  # USERAUTH_SUCCESS waits for the backend's verdict
        return None

    async def _check(self, method: str, call: Callable[..., object],
                     *args: object) -> tuple[object, str | None]:
        """Ask a handler about credentials (timed, with metrics)."""
        metrics = self.server.metrics
        if metrics is None:
            return await _ask_async(call, *args)
        started = time.perf_counter()
        verdict, reason = await _ask_async(call, *args)
        metrics.observe_auth(method, verdict, time.perf_counter() - started)
        return verdict, reason

    async def _held(self) -> float:
        """Wait out a failed attempt's delay before checking the next (pipelined
        attempts do not skip it); the time this attempt's check begins."""
        loop = asyncio.get_running_loop()
        if (wait := self._hold_until - loop.time()) > 0:
            await asyncio.sleep(wait)
        return loop.time()

    async def _delayed(self, actions: list[core.Action], start: float) -> list[core.Action]:
        """Carry out a failure's delay (`AuthAnswer.delay`, `KeyAcceptable.delay`): the
        answer goes out no sooner than that long after the check began, without
        holding the event loop."""
        delay = max((a.delay for a in actions if isinstance(a, core.AuthAnswer | core.KeyAcceptable)),
                    default=0.0)
        if delay > 0:
            self._hold_until = start + delay
            loop = asyncio.get_running_loop()
            if (wait := self._hold_until - loop.time()) > 0:
                await asyncio.sleep(wait)
        return actions

    async def validate_password(self, username: str, password: str) -> bool:
        assert self.backend is not None
        start = await self._held()
        verdict, reason = await self._check("password", self.backend.check_password, username,
                                            password.encode("utf-8", "surrogateescape"))
        now = asyncio.get_running_loop().time()
        actions = self.handle(core.Credentials(verdict, "password", reason, now))
        return self._answer(await self._delayed(actions, start))

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        assert self.backend is not None
        start = await self._held()
        actions = self.handle(core.KeyChecked(*await self._check("publickey", self.backend.check_publickey,
                                                                 username, key)))
        actions = await self._delayed(actions, start)
        return any(isinstance(a, core.KeyAcceptable) and a.ok for a in actions) or self._answer(actions)

    def on_certificate(self, conn: asyncssh.SSHServerConnection, username: str,
                       cert: internals.UserCertificate) -> Awaitable[bool]:
        return self._certificate(username, cert)

    async def _certificate(self, username: str, cert: internals.UserCertificate) -> bool:
        """A user certificate (query or signed): the core decides from the config's trust."""
        start = await self._held()
        facts = Certificate(cert.ca, cert.signature_algorithm, cert.key_id, cert.serial, cert.principals,
                            cert.valid_after, cert.valid_before, cert.source_addresses, cert.force_command,
                            cert.permit_pty, cert.permit_port_forwarding, cert.permit_agent_forwarding)
        actions = self.handle(core.CertificateChecked(facts, username, self.peer_host, time.time()))
        actions = await self._delayed(actions, start)
        return any(isinstance(a, core.KeyAcceptable) and a.ok for a in actions) or self._answer(actions)

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> Any:
        assert self.backend is not None
        if _accepted(self.handle(core.KbdintChallenge(*_ask(self.backend.kbdint_supported, username)))):
            return ("", "", "", [("Password: ", False)])
        return False

    async def validate_kbdint_response(self, username: str, responses: Any) -> Any:
        assert self.backend is not None
        loop = asyncio.get_running_loop()
        actions = self.handle(core.KbdintResponse(loop.time()))
        if not any(isinstance(a, core.CheckCredentials) for a in actions):
            return False
        start = await self._held()
        password = (responses[0] if responses else "").encode("utf-8", "surrogateescape")
        verdict, reason = await self._check("keyboard-interactive", self.backend.check_kbdint, username,
                                            password)
        actions = self.handle(core.Credentials(verdict, "keyboard-interactive", reason, loop.time()))
        return self._answer(await self._delayed(actions, start))

    def on_global_request(self, conn: asyncssh.SSHServerConnection, req: internals.GlobalRequest) -> Any:
        name = req.name if req.malformed is None and req.name is not None else repr(req.raw_name)
        event: core.Event = core.GlobalRequest(name, req.malformed)
        if req.malformed is None and name in ("tcpip-forward", "cancel-tcpip-forward"):
            try:
                host, port = internals.decode_tcpip_forward(req)
            except internals.RequestDecodeError as exc:
                event = core.GlobalRequest(name, exc.reason)
            else:
                event = core.ListenRequest(host, port, cancel=name == "cancel-tcpip-forward")
        actions = self.handle(event)
        if self._global_answer is not None:
            return self._global_answer  # a bind goes on: answered when it is done
        for action in actions:
            if isinstance(action, core.GlobalReply):
                return _global_answer(action)
        return False

    def on_transport_paused(self, conn: asyncssh.SSHServerConnection, paused: bool) -> None:
        self.transport_paused = paused
        if paused:
            self.server.backlogged.add(self)
        else:
            self.server.backlogged.discard(self)
        for session in self.sessions.values():
            session.transport_paused(paused)
        for forwarder in self.forwards.values():
            forwarder.transport_paused(paused)

    def on_backlog(self, conn: asyncssh.SSHServerConnection, buffered: int) -> None:
        # Only connections past the high-water mark (this one among them) are counted:
        # the rest hold less than 64 KiB each.
        total = sum(c.buffered() for c in self.server.backlogged)
        self.handle(core.Backlog(buffered, total))

    def buffered(self) -> int:
        return internals.buffered_bytes(self.conn) if self.conn is not None else 0

    def on_global_overflow(self, conn: asyncssh.SSHServerConnection, req: internals.GlobalRequest) -> None:
        self.handle(core.GlobalRequest(req.name or repr(req.raw_name), overflow=True))

    def on_reply_failed(self, conn: asyncssh.SSHServerConnection, failure: internals.ReplyFailure) -> None:
        self.handle(core.GlobalReplyFailed(failure.reason))

    def on_channel_open(self, conn: asyncssh.SSHServerConnection,
                        req: internals.ChannelOpenRequest) -> Any:
        if req.type == "direct-tcpip" and req.malformed is None:
            return self._direct_tcpip(conn, req)
        for action in self.handle(core.ChannelOpen(req.type or repr(req.raw_type), req.malformed)):
            if isinstance(action, core.RejectOpen):
                return asyncssh.ChannelOpenError(action.code, action.description)
            if isinstance(action, core.OpenSession) and action.channel in self.sessions:
                session = self.sessions[action.channel]
                return session.chan, session
        return asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Channel refused")

    def _direct_tcpip(self, conn: asyncssh.SSHServerConnection, req: internals.ChannelOpenRequest) -> Any:
        try:
            target = internals.decode_direct_tcpip(req)
        except internals.RequestDecodeError as exc:
            event = core.ChannelOpen("direct-tcpip", exc.reason)
        else:
            event = core.ChannelOpen("direct-tcpip", None, target.host, target.port,
                                     core.hostport(target.origin_host, target.origin_port))
        for action in self.handle(event):
            if isinstance(action, core.RejectOpen):
                return asyncssh.ChannelOpenError(action.code, action.description)
            if isinstance(action, core.OpenForward) and action.channel in self.forwards:
                forwarder = self.forwards[action.channel]
                # The confirmation waits for the core's verdict on the connection attempt.
                return conn.create_tcp_channel(), forwarder.opened()
        return asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Channel refused")

    # -- the server's shutdown

    def shutdown(self) -> None:
        self.handle(core.Shutdown())

    def abort(self) -> None:
        if self.conn is not None:
            self.conn.abort()


def _global_answer(action: core.GlobalReply) -> bool | bytes:
    """REQUEST_SUCCESS (with the bound port, RFC 4254 7.1) or REQUEST_FAILURE."""
    if action.ok and action.port:
        return struct.pack(">I", action.port)
    return action.ok


def _why(exc: Exception) -> str:
    """A handler's failure as a log reason: a BackendError says what failed; anything else is a bug."""
    return str(exc) if isinstance(exc, BackendError) else f"handler error: {exc!r}"


def _ask(call: Callable[..., object], *args: object) -> tuple[object, str | None]:
    """Ask a handler once: its answer, or None and why it raised. The one place a
    handler's exception is caught: the core turns a missing or wrong answer into the
    refusal its spec names (logged with a code); the connection goes on."""
    try:
        return call(*args), None
    except Exception as exc:
        return None, _why(exc)


async def _awaited(answer: Awaitable[object]) -> object:
    return await answer


async def _ask_async(call: Callable[..., object], *args: object) -> tuple[object, str | None]:
    """`_ask` for a handler that may answer with an awaitable (CancelledError passes)."""
    try:
        answer = call(*args)
        if inspect.isawaitable(answer):
            answer = await answer
        return answer, None
    except Exception as exc:
        return None, _why(exc)


def _accepted(actions: list[core.Action]) -> bool:
    """Whether the auth request the SSH layer is answering gets a positive answer."""
    return any(isinstance(a, core.AuthAnswer) and a.ok for a in actions)


# A durable log writes the records queued before an action in core.REACHES_CLIENT
# goes out. Every one of them but a drop reaches the client as packets, which the
# send path holds until the end of the loop turn and writes after the log
# (install_hooks' before_send; asyncssh_internals._Turn): one log write a turn for
# every connection. A drop closes the socket with nothing held to wait for: its
# records are written first, here.
WRITTEN_FIRST: frozenset[type[core.Action]] = frozenset({core.Drop})
assert WRITTEN_FIRST <= core.REACHES_CLIENT

_EXECUTORS: dict[type, Callable[[SpecConnection, Any], core.Event | None]] = {
    core.Disconnect: SpecConnection._disconnect,
    core.AuthAnswer: SpecConnection._answered,
    core.KeyAcceptable: SpecConnection._answered,
    core.CheckCredentials: SpecConnection._answered,
    core.GlobalReply: SpecConnection._global_reply,
    core.Bind: SpecConnection._bind,
    core.Unbind: SpecConnection._unbind,
    core.OpenForwarded: SpecConnection._open_forwarded,
    core.RejectOpen: SpecConnection._answered,
    core.AdmitUser: SpecConnection._admit_user,
    core.OpenSession: SpecConnection._open_session,
    core.SendKeepalive: SpecConnection._send_keepalive,
    core.AskBackend: SpecConnection._ask_backend,
    core.StartProgram: SpecConnection._start_program,
    core.ChannelReply: SpecConnection._channel_reply,
    core.ProgramStarted: SpecConnection._program_started,
    core.CloseStdin: SpecConnection._close_stdin,
    core.SendExit: SpecConnection._send_exit,
    core.EndProgram: SpecConnection._end_program,
    core.TerminateProgram: SpecConnection._terminate_program,
    core.CloseChannel: SpecConnection._close_channel,
    core.Drop: SpecConnection._drop,
    core.OpenForward: SpecConnection._open_forward,
    core.ConfirmForward: SpecConnection._confirm_forward,
    core.RejectForward: SpecConnection._reject_forward,
    core.ForwardSendEof: SpecConnection._forward_send_eof,
    core.CloseForward: SpecConnection._close_forward,
    core.ConnectionEnded: SpecConnection._connection_ended,
}
# Every action the core can ask for has exactly one executor here.
_MISSING = set(typing.get_args(core.Action)) ^ set(_EXECUTORS)
assert not _MISSING, f"actions without exactly one executor: {_MISSING}"


def machines(config: Config) -> core.Machines:
    """The specs compiled with the configured limits (checked against the core)."""
    return core.Machines.load(spec_limits(config), max_queued_requests=config.limits.max_queued_requests,
                              max_buffered_per_connection=config.limits.max_buffered_per_connection,
                              max_buffered_total=config.limits.max_buffered_total)


def admission_policy(config: Config) -> core.AdmissionPolicy:
    """limits.maxStartups' random early drop, limits.perSource* as the core's admission policy."""
    limits = config.limits
    startups, penalties = limits.max_startups, limits.per_source_penalties
    return core.AdmissionPolicy(
        early_drop_start=startups.start if startups.early_drop else None,
        early_drop_rate=startups.rate,
        per_source=limits.per_source_max_startups,
        ipv4_bits=limits.per_source_net_block_size.ipv4,
        ipv6_bits=limits.per_source_net_block_size.ipv6,
        penalties={core.Penalty.authfail: penalties.authfail, core.Penalty.noauth: penalties.noauth,
                   core.Penalty.grace_exceeded: penalties.grace_exceeded,
                   core.Penalty.protocol_error: penalties.protocol_error} if penalties.enabled else {},
        penalty_min=penalties.min,
        penalty_max=penalties.max,
        max_sources=penalties.max_sources,
        deny_all_on_overflow=penalties.overflow == "deny-all",
        exempt=tuple(penalties.exempt))


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
        # log.durable: the logger to write out before an action that reaches a client,
        # and whether one was carried out since it was last written (write_owed).
        self.durable_log = self.logger if config.log.durable else None
        self.log_owed = False
        self.machines = machines(config)
        forwarding = config.forwarding
        app = None if handler is None else (type(handler).forward_target is not Handler.forward_target,
                                            type(handler).agent_target is not Handler.agent_target)
        local, remote, agent = forward_policy_allows(config, app=app)
        self.forward_policy = core.ForwardPolicy(local, forwarding.permit_open, remote,
                                                 forwarding.permit_listen, forwarding.gateway_ports, agent,
                                                 connect_timeout=forwarding.connect_timeout)
        self.metrics: Metrics | None = None
        if config.metrics.listen is not None:
            from sshspec.adapters.metrics import Metrics
            self.metrics = Metrics(self.machines)
        self.emitter = Emitter(self.logger, self.metrics)
        self.core = core.ServerCore(self.machines, self.log, admission_policy(config))
        # User certificates trusted (auth.trustedUserCAKeys, cert-authority lines): read in start().
        self.certificates = CertificatePolicy()
        # The configured users are loaded in start(): an authorized_keys file that cannot be
        # read is a failed start (SSH_START_FAILED, exit 1), as a host key is.
        self._configure = handler is None
        self.handler = handler if handler is not None else Handler()
        if self.metrics is not None:
            self.metrics.watch(self)
            self._watch_webhooks()
        self.endpoints: list[Any] = []  # the metrics and health HTTP servers (aiohttp runners)
        self.endpoint_addresses: list[tuple[str, int]] = []
        self.docker: DockerBackend | None = None
        if config.backend.type == "docker":
            from sshspec.adapters.backend_docker import DockerBackend
            self.docker = DockerBackend(config.docker, log=self.log_container,
                                        env_deny=config.backend.env_deny, max_env=config.limits.max_env)
        self.connections: set[SpecConnection] = set()
        self.backlogged: set[SpecConnection] = set()  # their socket buffer is past its high-water mark
        self.acceptor: Listener | None = None
        self._arrived: core.Admission | None = None  # the admission the next SpecConnection takes
        self.sock: socket.socket | None = None
        self.address: tuple[str, int] | None = None
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    def _watch_webhooks(self) -> None:
        if self.metrics is not None:
            for client in getattr(self.handler, "clients", list)():
                client.observe = self.metrics.observe_webhook

    def log(self, codes: tuple[str, ...], event: str, reason: str | None, remote_addr: str | None) -> None:
        if records := self.emitter.records(codes):
            self.emitter.add(records, Labels(remote_addr=remote_addr, reason=reason, event=str(event)))

    def log_container(self, codes: tuple[str, ...], event: str, reason: str | None, container: str) -> None:
        """A record of a container no connection owns (found left behind at start-up)."""
        if records := self.emitter.records(codes):
            self.emitter.add(records, Labels(reason=reason, event=str(event), container=container))

    async def start(self) -> None:
        self.core.handle(core.ServerEvent.start)
        if self.core.state != "starting":  # refused: it runs (SSH_ALREADY_RUNNING) or it stopped
            raise RuntimeError(f"sshspec server cannot start: already running or stopped ({self.core.state})")
        host, port = self.config.ssh.listen
        if self.config.metrics.listen is not None or self.config.health.listen is not None:
            # Before the SSH socket: a health check sees `starting` (503) until it listens.
            from sshspec.adapters.metrics import bound_addresses, start_endpoints
            try:
                self.endpoints = await start_endpoints(self)
            except OSError as exc:
                where = (f"metrics.listen {self.config.metrics.listen}, "
                         f"health.listen {self.config.health.listen}")
                self.core.handle(core.ServerEvent.bind_failed, reason=f"{where}: {exc}")
                raise StartError(f"cannot start the metrics/health endpoints: {exc}") from exc
            self.endpoint_addresses = bound_addresses(self.endpoints)
        try:
            internals.assert_asyncssh_compat()  # a moved asyncssh private fails here, loudly
            internals.log_lazily()
            keys = load_host_keys(self.config)
            if self._configure:
                self.handler = configured_handler(self.config)
                self._watch_webhooks()
            # Certificates log in the handler's listed users only (sshd: an account), unless
            # a webhook or an application's own handler knows users nobody listed. (Also
            # with --workers, whose handler is made before the Server.)
            known = None
            if isinstance(self.handler, ConfiguredHandler) and not self.config.auth.webhook.url:
                known = frozenset(self.handler.users)
            self.certificates = certificate_policy(self.config, users=known)
            options = server_options(
                self.config.ssh.profile, kex=self.config.ssh.kex or None,
                ciphers=self.config.ssh.ciphers or None, macs=self.config.ssh.macs or None,
                host_key_algs=self.config.ssh.host_key_algorithms or None, host_keys=keys,
                compression=self.config.ssh.compression)
            self.sock = self._listen_socket(host, port)
        except (OSError, ValueError, asyncssh.KeyImportError, internals.AsyncsshCompatError) as exc:
            self.core.handle(core.ServerEvent.bind_failed, reason=f"{host}:{port}: {exc}")
            await self.close_endpoints()
            raise StartError(f"cannot start on {host}:{port}: {exc}") from exc
        version = self.config.ssh.server_version.removeprefix("SSH-2.0-")
        if self.docker is not None:
            await self.docker.start()  # removes what dead predecessors left, in the background
        ssh_options = dict(server_version=version, login_timeout=self.config.limits.login_timeout,
                           keepalive_interval=0, allow_scp=False, agent_forwarding=False,
                           x11_forwarding=False, gss_host=None, **options)
        # One accept path: every accepted socket meets the listener's gate, which reads a
        # trusted balancer's PROXY header first (ssh.proxyProtocol), then asks the server
        # core to admit the source (`arrival`) before asyncssh builds anything: a refused
        # connection costs a socket, not an SSH connection.
        proxy = self.config.ssh.proxy_protocol
        trusted = TrustedNetworks(proxy.trusted_networks) if proxy.enabled else None
        self.acceptor = Listener(self.core, trusted,
                                 min(proxy.header_timeout, self.config.limits.login_timeout),
                                 internals.connection_factory(server_factory=self._spec_connection,
                                                              **ssh_options),
                                 self.arrival)
        await self.acceptor.start(self.sock)
        if self.core.state != "starting":  # shut down while asyncio set the listener up
            self.acceptor.close()
            await self.acceptor.wait_closed()
            return
        self.address = self.sock.getsockname()[:2]
        self.core.handle(core.ServerEvent.listening, reason=f"{self.address[0]}:{self.address[1]}")

    def write_owed(self) -> None:
        """Before a turn's packets go out (install_hooks' before_send): the durable log
        writes what it queued if an action reaching a client was carried out since it
        last did. Records no client has seen the effect of yet (a connection's first
        ones before its key exchange, say) wait for the batch."""
        if self.log_owed:
            self.log_owed = False
            assert self.durable_log is not None
            self.durable_log.write_queued()

    def arrival(self, peer: Any) -> bool:
        """A TCP connection arrived from ``peer`` (its address, or the client a trusted
        PROXY header named): the server core decides, from the address, the time and
        a draw for the random early drop (not a secret: it only spreads refusals).
        The admitted one's SpecConnection is made next, synchronously (the gate hands
        the socket to asyncssh, which calls `_spec_connection`)."""
        host, remote_addr = (peer[0], f"{peer[0]}:{peer[1]}") if isinstance(peer, tuple) else (None, "?:0")
        admission = self.core.admit(core.Arrival(host, asyncio.get_running_loop().time(), random.random(),
                                                 remote_addr))
        if admission.reply is not core.ServerReply.admit:
            if self.durable_log is not None:
                self.durable_log.write_queued()  # the refusal's record before the close
            return False
        self._arrived = admission
        return True

    def _spec_connection(self) -> SpecConnection:
        admission, self._arrived = self._arrived, None
        assert admission is not None, "asyncssh made a connection the gate did not admit"
        return SpecConnection(self, admission)

    def _listen_socket(self, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        # Each option on its own: SO_REUSEADDR failing must not cost SO_REUSEPORT (--workers).
        for option in ("SO_REUSEADDR", "SO_REUSEPORT") if self.reuse_port else ("SO_REUSEADDR",):
            try:
                sock.setsockopt(socket.SOL_SOCKET, getattr(socket, option), 1)
            except OSError as exc:
                self.core.handle(core.ServerEvent.reuse_failed, reason=f"{option}: {exc}")
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
        self.backlogged.discard(conn)
        if not self.connections:
            self._all_closed.set()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, tell every connection to end, wait up to the deadline
        for their output and exit statuses, then close what is left."""
        if self.core.handle(core.ServerEvent.shutdown) is not core.ServerReply.stop_listening:
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
            self.core.handle(core.ServerEvent.close_failed, reason=str(exc))
        if self.connections:
            self._all_closed.clear()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self.config.limits.shutdown_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(self._all_closed.wait(), deadline)
        except TimeoutError:
            still_open = f"{len(self.connections)} connections still open"
            if self.core.handle(core.ServerEvent.deadline, reason=still_open) is core.ServerReply.close_all:
                for conn in list(self.connections):
                    conn.abort()
            # abort() reports connection_lost on the next loop turns: wait for them.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), 5)
        if self.docker is not None:
            await self.docker.close()  # every connection's container removed before SSH_STOPPED
        self.core.handle(core.ServerEvent.drained)
        if self.acceptor is not None and listen_closed:
            with contextlib.suppress(Exception):
                await self.acceptor.wait_closed()
        await self.close_endpoints()
        self.logger.close()

    async def close_endpoints(self) -> None:
        """The metrics and health servers go last: a probe sees 503 through the drain."""
        endpoints, self.endpoints = self.endpoints, []
        for runner in endpoints:
            with contextlib.suppress(Exception):
                await runner.cleanup()


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
    for user in config.auth.users:  # keys and CAs: config.authorized_key_problem refused the rest
        keys = tuple(asyncssh.import_public_key(line.strip()) for line in user.authorized_keys
                     if authority_key(line) is None)
        users[user.username] = UserEntry(user.password_hash, keys)
    extra_keys = _read_authorized_keys(config.auth.authorized_keys_file)
    if not users and not config.auth.webhook.url:  # (with a webhook, its users are the users)
        from sshspec.adapters.passwords import hash_password
        name = getpass.getuser()
        password = secrets.token_urlsafe(12)
        default_file = Path.home() / ".ssh" / "authorized_keys"
        keys = extra_keys or _read_authorized_keys(str(default_file) if default_file.exists() else "",
                                                   skipped=announce or _announce)
        users[name] = UserEntry(hash_password(password), keys)
        (announce or _announce)(
            f"sshspec: log in as {name!r} with the one-time password {password}"
            + (f" or a key from {config.auth.authorized_keys_file or default_file}" if keys else ""))
    elif extra_keys:
        for name, entry in users.items():
            users[name] = UserEntry(entry.password_hash, entry.authorized_keys + extra_keys)
    webhook, configserver = config.auth.webhook, config.configserver
    if webhook.url or configserver.url:
        from sshspec.adapters.webhooks import WebhookClient, WebhookHandler
        return WebhookHandler(
            users, auth=WebhookClient(webhook, webhook.auth_timeout, "auth webhook") if webhook.url else None,
            password=webhook.password, public_key=webhook.public_key,
            keyboard_interactive=webhook.keyboard_interactive,
            config_server=WebhookClient(configserver, configserver.config_timeout, "config server")
            if configserver.url else None,
            backend_type=config.backend.type, env_deny=config.backend.env_deny,
            max_env=config.limits.max_env, shell=config.backend.shell or None)
    return ConfiguredHandler(users, env_deny=config.backend.env_deny, max_env=config.limits.max_env,
                             shell=config.backend.shell or None)


def _read_authorized_keys(path: str, *, skipped: Callable[[str], None] | None = None,
                          ) -> tuple[asyncssh.SSHKey, ...]:
    """The keys of an authorized_keys file. A line that is not a plain key (options,
    cert-authority) is a ValueError naming the file and the line (`auth.authorizedKeysFile`;
    the config check refused it already, unless the file changed since), or, with
    `skipped` (the implicit ~/.ssh/authorized_keys), left out and said."""
    if not path:
        return ()
    try:
        lines, problems = read_authorized_keys(path)
    except OSError as exc:
        raise ValueError(f"auth.authorizedKeysFile: cannot read `{path}`: {exc.strerror}") from None
    for number, problem in problems:
        if skipped is None:
            raise ValueError(f"auth.authorizedKeysFile: `{path}` line {number}: {problem}")
        skipped(f"sshspec: {path} line {number} skipped: {problem}")
    return tuple(asyncssh.import_public_key(line) for line in lines if authority_key(line) is None)


def _default_keys_file(config: Config) -> str:
    """The authorized_keys file whose lines are every user's: authorizedKeysFile, or
    ~/.ssh/authorized_keys for the out-of-the-box user (no users, no webhook)."""
    if config.auth.authorized_keys_file or config.auth.users or config.auth.webhook.url:
        return config.auth.authorized_keys_file
    default_file = Path.home() / ".ssh" / "authorized_keys"
    return str(default_file) if default_file.exists() else ""


def certificate_policy(config: Config, *, users: frozenset[str] | None = None) -> CertificatePolicy:
    """The user certificates the config trusts: auth.trustedUserCAKeys for every user
    (with their authorizedPrincipals), `cert-authority` lines for their user (in
    authorizedKeysFile: every user). ValueError naming the file if one cannot be read
    or used (the config check refused bad lines already, unless a file changed since)."""
    trusted: set[bytes] = set()
    for i, path in enumerate(config.auth.trusted_user_ca_keys):
        key = f"auth.trustedUserCAKeys[{i}]"
        try:
            lines, problems = read_ca_keys(path)
        except OSError as exc:
            raise ValueError(f"{key}: cannot read `{path}`: {exc.strerror}") from None
        if problems:
            number, problem = problems[0]
            raise ValueError(f"{key}: {ca_file_problem(path, number, problem)}")
        trusted.update(asyncssh.import_public_key(line).public_data for line in lines)
    authorities: dict[str | None, frozenset[bytes]] = {}
    for user in config.auth.users:
        cas = [authority_key(line) for line in user.authorized_keys]
        if blobs := frozenset(asyncssh.import_public_key(ca).public_data for ca in cas if ca):
            authorities[user.username] = blobs
    if path := _default_keys_file(config):
        try:
            lines, _ = read_authorized_keys(path)  # (its problems: _read_authorized_keys says them)
        except OSError:
            lines = []  # _read_authorized_keys says it
        cas = [authority_key(line) for line in lines]
        if blobs := frozenset(asyncssh.import_public_key(ca).public_data for ca in cas if ca):
            authorities[None] = blobs
    return CertificatePolicy(
        trusted=frozenset(trusted),
        authorized_principals={u.username: u.authorized_principals for u in config.auth.users
                               if u.authorized_principals},
        authorities=authorities,
        users=users)


def _announce(text: str) -> None:
    # One write(2) per line: with --workers several processes share stderr, and
    # print() may split a line into two writes that interleave.
    os.write(2, (text + "\n").encode())


# --- running it -------------------------------------------------------------------------------


async def serve_async(config: Config, handler: Handler | None = None, *,
                      ready: Callable[[Server], None] | None = None, reuse_port: bool = False) -> int:
    """Run until SIGTERM or SIGINT; then shut down gracefully. Returns the exit status."""
    # Inherited ignored signals (nohup, `cmd &` from a script) become caught-and-
    # ignored: same for the server, defaults again for its programs after exec.
    adopt_inherited_signals()
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
            await server.close_endpoints()
            return 1
        assert server.address is not None
        # Everything allocated so far (modules, specs, options) lives as long as the
        # process: keep it out of the collector's generations (bench/: full
        # collections went from ~30 ms pauses to ~9 ms).
        gc.collect()
        gc.freeze()
        for host, port in server.endpoint_addresses:
            _announce(f"sshspec: metrics and health endpoints on http://{host}:{port}")
        _announce(f"sshspec: listening on {server.address[0]}:{server.address[1]}")
        if ready is not None:
            ready(server)
        await stop.wait()
        await server.shutdown()
        return 0
    finally:
        if server.docker is not None:
            await server.docker.close()  # a start that failed: nothing to wait for but the client
        server.logger.close()  # writes what is still queued, however we leave
        await server.close_endpoints()
        with contextlib.suppress(Exception):
            await server.handler.aclose()


def run_workers(config: Config, handler: Handler | None, workers: int) -> int:
    """`--workers N`: N forked processes, each with its own SO_REUSEPORT socket on
    the same port, so the kernel spreads connections over every core. SIGTERM or
    SIGINT to the parent is passed to every worker; each shuts down gracefully."""
    from sshspec.adapters.config import Listen
    if config.metrics.listen is not None or config.health.listen is not None:
        # Each worker would need a port of its own, and a scrape would see one worker.
        _announce("sshspec serve: metrics.listen and health.listen serve one process: "
                  "use them without --workers")
        return 2
    try:
        handler = handler if handler is not None else configured_handler(config)
    except ValueError as exc:  # an authorized_keys file that cannot be read or used
        _announce(f"sshspec serve: {exc}")
        return 1
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
