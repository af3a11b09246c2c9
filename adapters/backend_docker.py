"""The ``docker`` backend: a container per connection (or per session), through the Docker Engine API.

ContainerSSH's model: the authenticated user is dropped into a fresh container
and the container is removed when the connection ends; no system users. It
speaks the Docker Engine API with `aiodocker`, so Docker Engine, Podman's
compatible service and a remote engine (tcp:// with TLS client certificates)
all serve.

Lifecycle
    Each container is a machine of `specs/container.yaml`, run by
    `fsm.container.ContainerCore` (sans-I/O); this module carries out the
    engine operations its actions ask for, each in a task of the backend's own
    (a connection that ends does not cancel an operation half-way: the engine
    would be left with a container nobody knows), and turns the engine's answer
    (or a timeout, `docker.timeouts`) into the next event.

Modes
    ``connection`` (the default): the container is made while the user is being
    admitted (`accept_user` answers once it runs, so USERAUTH_SUCCESS means the
    container is there; a failure is SSH_BACKEND_REJECTED_HANDSHAKE with the
    engine's reason), every session is an exec in it, and it is released when the
    connection ends. ``session``: each session's program request makes its own
    container (a failure fails that request), released when the channel closes.
    In both modes a program is an exec in a container running ``idleCommand``.

Programs
    shell: ``shellCommand``; exec: ``shellCommand -c COMMAND``; a subsystem: its
    ``subsystems`` entry. Each runs through ``/bin/sh -c 'echo "$$"; exec "$@"'``,
    which prints its own pid (in the container's pid namespace) as the first line
    of its output, stripped here, then becomes the program: the engine has no way
    to signal an exec, so a client's signal is an exec of ``kill`` for that pid's
    process group (the exec leads its own session, as runc makes it). The image
    needs /bin/sh for that. Input is held until the pid line arrived, so a pty's
    echo of early input cannot come before it. With ``docker.agent``, sshspec-agent
    (below) runs the program instead, and its child prints the pid line.

Exit statuses
    The engine's exec API has an exit code only: a program killed by signal N reads
    128+N there (as with ``docker exec``), as does one that ran ``exit 128+N``. Only
    the program's parent sees its wait status, and that is the engine's (conmon,
    containerd's shim), which folds it. So without ``docker.agent`` (the default) a
    killed program's status goes out as exit-status 128+N, never as exit-signal,
    as ContainerSSH's without its agent.

    With ``docker.agent`` (ContainerSSH's guest-agent model: a static helper in the
    container, at ``docker.agent.path``, from the image or bind-mounted read-only
    from ``docker.agent.source``), the exec's process is ``sshspec-agent run STATUS
    -- PROGRAM``: it forks the program, which leads a process group of its own (on
    a pty the foreground one: Ctrl-C and SIGWINCH reach it, not the agent) and prints
    its pid line; signals sent to the agent are forwarded to it. When the program
    ends above 128 the agent writes what it saw ("signal TERM 0" or "exit 143") to
    STATUS, a fresh name in ``docker.agent.statusDir``, before it exits with the same
    code. Only when the engine says more than 128 does the backend read it: one exec
    of ``sshspec-agent status STATUS`` (which removes the file). A status it cannot
    read is DOCKER_AGENT_READ_FAILED and the engine's code goes out. The status
    never travels in the program's output. Signals from the client are an exec of
    ``sshspec-agent signal`` (no /bin/sh needed).

The container dying
    While it runs, the engine's wait on it is held: when it returns and the container
    was not being stopped, it died under its owner (``died``): it is removed and its
    owner ended (`Lost`; in connection mode the connection is closed with the reason).

Pty
    The exec gets a tty, ``TERM`` and the window size (set right after the start,
    and on every window-change). The engine API cannot set terminal modes: the
    client's are ignored. The client's EOF is the tty's EOF character (^D, twice
    after a partial line), as the local backend sends VEOF.

Streams and back-pressure
    Output is read from the hijacked exec connection only while the client takes
    it (`pause_output`): aiodocker's queue then fills (64 KiB), the socket stops
    being read, the engine stops reading the program, the program blocks. Input
    is written as the socket drains; past 64 KiB waiting, the channel stops being
    read until it drains below 16 KiB. The client's EOF half-closes the exec
    connection (its stdin ends, its output still flows): aiodocker has no call
    for that, `_half_close` reaches into its stream (see HACKS.md).

Nothing leaks
    Every container carries ``io.sshspec.host`` (this host's name) and
    ``io.sshspec.instance`` (``PID-STARTTIME`` of the server process that made it).
    At start-up the backend lists this host's sshspec containers and removes those
    whose process is gone (`orphan`): a server killed with SIGKILL, or one whose
    engine failed to remove a container, leaves nothing behind past the next start.
    Live processes (other ``--workers``, other servers) keep theirs. On SIGTERM the
    server waits for every container to be removed before it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import inspect
import logging
import os
import secrets
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from sshspec.adapters.backend_local import (
    DEFAULT_ENV_DENY,
    SSH_SIGNALS,
    BackendError,
    ExitStatus,
    LocalBackend,
    PtyRequest,
)
from sshspec.adapters.config import DockerConfig, memory_bytes
from sshspec.adapters.handlers import ConnectionHandler, ConnectionInfo, Handler, SessionHandler, SessionIO
from sshspec.fsm.container import (
    ContainerCore,
    ContainerEvent,
    ContainerMachine,
    ContainerPool,
    ContainerReply,
    Engine,
    Finished,
    Lost,
    Ready,
    Refused,
)

if TYPE_CHECKING:
    import aiodocker
    from aiodocker.execs import Exec
    from aiodocker.stream import Stream

__all__ = ["Agent", "ContainerSettings", "DockerBackend", "DockerConnection", "DockerSession", "Mount"]

log = logging.getLogger(__name__)

HOST_LABEL = "io.sshspec.host"
INSTANCE_LABEL = "io.sshspec.instance"
CONNECTION_LABEL = "io.sshspec.connection"
USER_LABEL = "io.sshspec.user"
# The program's wrapper: its pid first (for signals), then the program in its place.
PID_WRAPPER = ("/bin/sh", "-c", 'echo "$$"; exec "$@"', "sshspec")
# A signal for the exec's process group (it leads its session), or the pid alone.
KILL_SCRIPT = 'kill -s "$0" -- "-$1" 2>/dev/null || kill -s "$0" "$1"'
_STDIN_HIGH_WATER = 64 * 1024
_STDIN_LOW_WATER = 16 * 1024
_MAX_PID_LINE = 32  # more than this before a newline: not our pid line
_HUP_GRACE = 0.3  # a closed channel's program: SIGHUP, then SIGKILL this much later
_EXIT_POLLS = 100  # the engine may report an exec's end a moment after its stream ended
_EXIT_POLL_INTERVAL = 0.02


@dataclass(frozen=True, slots=True)
class Mount:
    target: str
    source: str = ""
    type: str = "bind"  # bind | volume | tmpfs
    read_only: bool = True


@dataclass(frozen=True, slots=True)
class Agent:
    """sshspec-agent in the container (docker.agent): where it is, where it comes from
    (a host file bind-mounted read-only at ``path``; empty: the image has it), where it
    leaves a killed program's status."""

    path: str
    source: str = ""
    status_dir: str = "/dev/shm"


@dataclass(frozen=True, slots=True)
class ContainerSettings:
    """What a user's container is made of: the config's ``docker:``, or what the
    handler's `container_settings` made of it for this user."""

    image: str
    user: str = ""
    workdir: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    network: str = "none"
    memory: int = 0  # bytes; 0: no limit
    cpus: float = 0.0  # 0: no limit
    pids: int = 1024  # 0: no limit
    read_only_rootfs: bool = False
    mounts: tuple[Mount, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    idle_command: tuple[str, ...] = ("/bin/sh", "-c", "sleep infinity")
    shell_command: tuple[str, ...] = ("/bin/sh",)
    subsystems: Mapping[str, str] = field(default_factory=dict)
    agent: Agent | None = None

    @classmethod
    def from_config(cls, config: DockerConfig) -> ContainerSettings:
        return cls(
            image=config.image, user=config.user, workdir=config.workdir, env=dict(config.env),
            network=config.network, memory=memory_bytes(config.memory), cpus=config.cpus,
            pids=config.pids, read_only_rootfs=config.read_only_rootfs,
            mounts=tuple(Mount(m.target, m.source, m.type, m.read_only) for m in config.mounts),
            labels=dict(config.labels), idle_command=tuple(config.idle_command),
            shell_command=tuple(config.shell_command), subsystems=dict(config.subsystems),
            agent=None if config.agent is None else Agent(config.agent.path, config.agent.source,
                                                          config.agent.status_dir))

    def create_config(self, labels: Mapping[str, str]) -> dict[str, Any]:
        """The body of POST /containers/create."""
        host: dict[str, Any] = {
            "NetworkMode": self.network,
            "ReadonlyRootfs": self.read_only_rootfs,
            # setuid programs in the image do not raise a session's privileges.
            "SecurityOpt": ["no-new-privileges"],
            "RestartPolicy": {"Name": "no"},
            "Mounts": [_mount(m) for m in self.mounts],
        }
        if self.agent is not None and self.agent.source:
            host["Mounts"].append(_mount(Mount(self.agent.path, self.agent.source)))
        if self.memory:
            host["Memory"] = self.memory
        if self.cpus:
            host["NanoCpus"] = int(self.cpus * 1e9)
        if self.pids:
            host["PidsLimit"] = self.pids
        return {
            "Image": self.image,
            "Entrypoint": list(self.idle_command[:1]),
            "Cmd": list(self.idle_command[1:]),
            "User": self.user,
            "WorkingDir": self.workdir,
            "Env": [f"{k}={v}" for k, v in self.env.items()],
            "Labels": {**self.labels, **labels},
            "Tty": False,
            "OpenStdin": False,
            "HostConfig": host,
        }


def _mount(m: Mount) -> dict[str, Any]:
    spec: dict[str, Any] = {"Type": m.type, "Target": m.target, "ReadOnly": m.read_only}
    if m.source:
        spec["Source"] = m.source
    return spec


class ContainerLog(Protocol):
    """Where a container's records go: the codes, the event, the reason, its name."""

    def __call__(self, codes: tuple[str, ...], event: str, reason: str | None, container: str) -> None: ...


# --- the engine's answers as text -----------------------------------------------------------------


def _tls_why(exc: BaseException) -> str | None:
    """A TLS failure with a tcp:// engine (docker.tls), said as which side refused whom; aiodocker
    wraps aiohttp's error (its context) in a DockerError 900."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):  # aiohttp's subclass has no verify_message
            verify = getattr(getattr(seen, "certificate_error", seen), "verify_message", None) or seen
            return (f"engine TLS: the engine's certificate is not trusted (docker.tls.ca): "
                    f"certificate verify failed, {verify}")
        if isinstance(seen, ssl.SSLError):
            reason = seen.reason or str(seen)
            if "ALERT" in reason:  # the engine's end sent an alert: it refused our certificate
                return (f"engine TLS: the engine refused the handshake ({reason}): it does not accept "
                        f"the client certificate docker.tls.cert")
            return f"engine TLS: {reason}"
        seen = seen.__cause__ or seen.__context__
    return None


def _why(exc: BaseException) -> str:
    """An engine failure as a log reason (the engine's own message when it gave one)."""
    if (tls := _tls_why(exc)) is not None:
        return tls
    status = getattr(exc, "status", None)
    message = getattr(exc, "message", None)
    if status is not None and message is not None:
        if isinstance(message, dict):
            message = message.get("message", message)
        return f"engine: {message} ({status})"
    if isinstance(exc, TimeoutError):
        return "engine: no answer in time"
    return f"engine unreachable: {exc or type(exc).__name__}"


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status", None)


def _engine_errors() -> tuple[type[BaseException], ...]:
    import aiodocker
    import aiohttp
    return (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError, ValueError)


# --- which server process made a container -----------------------------------------------------


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot): with its pid it names one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields[19].decode() if len(fields) > 19 else None


def instance_label(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{_start_time(pid) or '0'}"


def instance_alive(label: str) -> bool:
    """Whether the server process a container's instance label names still runs (on this host)."""
    pid, _, start = label.partition("-")
    return pid.isdigit() and _start_time(int(pid)) == start


# --- the backend ------------------------------------------------------------------------------------


class DockerBackend:
    """One per server process: the engine client, this process's containers, the sweep."""

    def __init__(self, config: DockerConfig, *, log: ContainerLog, env_deny: tuple[str, ...] = (),
                 max_env: int = 64) -> None:
        self.config = config
        self.defaults = ContainerSettings.from_config(config)
        self.pool = ContainerPool(ContainerMachine.load(), config.max_containers)
        self.log = log  # for containers nobody owns (the sweep's)
        self.env_deny = env_deny
        self.env_policy = LocalBackend(env_deny=DEFAULT_ENV_DENY, max_env=max_env)  # its env_allowed
        self.host = socket.gethostname()
        self.instance = instance_label()
        self.token = secrets.token_hex(3)  # in container names: a restart never meets its old names
        self.containers: set[Container] = set()
        self._client: aiodocker.Docker | None = None
        self._connector: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: asyncio.Event | None = None
        self._closed = False

    # -- the engine client (made in the event loop, at first use)

    def client(self) -> aiodocker.Docker:
        if self._client is None:
            import aiodocker
            import aiohttp
            host = self.config.host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
            # No connection limit: every exec stream holds one for as long as its program runs
            # (aiohttp's default of 100 would stall the 101st session's requests).
            if host.startswith("unix://"):
                self._connector = aiohttp.UnixConnector(host.removeprefix("unix://"), limit=0)
                url = "unix://localhost"
            else:
                tls = self.config.tls
                context: ssl.SSLContext | None = None
                if tls is not None:
                    context = ssl.create_default_context(cafile=tls.ca)
                    context.load_cert_chain(tls.cert, tls.key)
                self._connector = aiohttp.TCPConnector(ssl=context if context else False, limit=0)
                scheme = "https://" if context else "http://"
                url = scheme + host.split("://", 1)[1]
            self._client = aiodocker.Docker(url=url, connector=self._connector)
        return self._client

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the server's start and stop

    async def start(self) -> None:
        """At start-up: remove what dead sshspec processes of this host left (in the background)."""
        self._idle = asyncio.Event()
        self._idle.set()
        self.spawn(self._sweep())

    async def _sweep(self) -> None:
        try:
            listed = await asyncio.wait_for(self.client().containers.list(
                all=True, filters=f'{{"label": ["{HOST_LABEL}={self.host}"]}}'), self.config.timeouts.start)
        except _engine_errors() as exc:
            name = self.container_name("sweep")
            core = self.pool.new(lambda codes, event, reason: self.log(codes, event, reason, name))
            core.sweep_failed(f"cannot list this host's containers to remove what dead servers left: "
                              f"{_why(exc)}")  # DOCKER_SWEEP_FAILED
            return
        for found in listed:
            labels = found["Labels"] or {}
            owner = labels.get(INSTANCE_LABEL, "")
            if owner == self.instance or instance_alive(owner):
                continue
            names = found["Names"] or [found.id]
            name = str(names[0]).lstrip("/")
            container = Container(self, name, self.defaults, self.log)
            container.orphan(found.id, f"left by sshspec process {owner or '?'} on {self.host}, "
                                       "which is gone")

    async def close(self, timeout: float | None = None) -> None:
        """The server stops (its connections are closed, so their containers released):
        wait until every container is removed (or failed), then close the client."""
        if self._closed:
            return
        self._closed = True
        if timeout is None:
            timeouts = self.config.timeouts
            timeout = max(timeouts.start, timeouts.pull) + 2 * timeouts.stop + 5
        if self._idle is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            if self._connector is not None:
                with contextlib.suppress(Exception):
                    await self._connector.close()

    # -- containers

    def added(self, container: Container) -> None:
        self.containers.add(container)
        if self._idle is not None:
            self._idle.clear()

    def finished(self, container: Container) -> None:
        self.containers.discard(container)
        if not self.containers and self._idle is not None:
            self._idle.set()

    def container_name(self, owner: str) -> str:
        return f"sshspec-{self.token}-{owner}"

    def labels(self, info: ConnectionInfo) -> dict[str, str]:
        return {HOST_LABEL: self.host, INSTANCE_LABEL: self.instance, CONNECTION_LABEL: info.connection_id,
                USER_LABEL: info.username or ""}

    def connection(self, inner: ConnectionHandler, handler: Handler, info: ConnectionInfo,
                   log: ContainerLog, end: Callable[[str], None] | None = None) -> DockerConnection:
        return DockerConnection(self, inner, handler, info, log, end)


class Container:
    """One container: its machine, and the engine operations its actions ask for."""

    def __init__(self, backend: DockerBackend, name: str, settings: ContainerSettings, log: ContainerLog,
                 labels: Mapping[str, str] | None = None) -> None:
        self.backend = backend
        self.name = name
        self.settings = settings
        self.labels = dict(labels or {})
        self._log = log
        self.core: ContainerCore = backend.pool.new(self._record)
        self.id: str | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Called with the reason when it dies under its owner (connection mode: ends the connection).
        self.on_lost: Callable[[str], None] | None = None
        backend.added(self)

    def _record(self, codes: tuple[str, ...], event: str, reason: str | None) -> None:
        self._log(codes, event, reason, self.name)

    # -- the owner's side

    def provide(self) -> None:
        self._carry_out(self.core.provide())

    def orphan(self, container_id: str, reason: str) -> None:
        self.id = container_id
        self._carry_out(self.core.orphan(reason))

    def release(self) -> None:
        self._carry_out(self.core.handle(ContainerEvent.release))

    def exec_failed(self, reason: str) -> None:
        self._fire(ContainerEvent.exec_failed, reason)

    def signal_failed(self, reason: str) -> None:
        self._fire(ContainerEvent.signal_failed, reason)

    def resize_failed(self, reason: str) -> None:
        self._fire(ContainerEvent.resize_failed, reason)

    def exit_code_failed(self, reason: str) -> None:
        self._fire(ContainerEvent.exit_code_failed, reason)

    def agent_read_failed(self, reason: str) -> None:
        self._fire(ContainerEvent.agent_read_failed, reason)

    async def ready(self) -> None:
        """Once it runs; BackendError (the reason) if it will not."""
        await asyncio.shield(self._ready)

    # -- the core's actions

    def _carry_out(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Engine):
                self.backend.spawn(self._operate(action.op))
            elif isinstance(action, Ready):
                self.backend.spawn(self._watch())
                if not self._ready.done():
                    self._ready.set_result(None)
            elif isinstance(action, Refused):
                if not self._ready.done():
                    self._ready.set_exception(BackendError(action.reason))
                    self._ready.exception()  # retrieved: nobody may be waiting any more
            elif isinstance(action, Lost):
                if self.on_lost is not None:
                    self.on_lost(action.reason)
            elif isinstance(action, Finished):
                self.backend.finished(self)

    async def _watch(self) -> None:
        """While it runs: the engine's wait on it returns when it ends, whoever ended it (its
        owner's stop is `died` in stopping, which the spec ignores)."""
        engine = self._engine_container()
        try:
            result = await engine.wait(timeout=None)
        except _engine_errors() as exc:  # the engine went away: nothing is known of the container
            log.debug("watch on %s ended: %s", self.name, _why(exc))
            return
        how = f"exit code {result.get('StatusCode')}"
        with contextlib.suppress(*_engine_errors()):
            state = (await asyncio.wait_for(engine.show(), self.backend.config.timeouts.start))["State"]
            if state.get("OOMKilled"):
                how += ", killed for lack of memory (OOMKilled)"
        self._fire(ContainerEvent.died, f"container {self.name} ended under its owner: {how}")

    async def _operate(self, op: ContainerReply) -> None:
        try:
            event, reason = await _OPERATIONS[op](self)
        except Exception as exc:  # a bug here must not leave the owner waiting for ever
            log.exception("docker backend: %s of %s", op, self.name)
            event, reason = _FAILURES[op], f"sshspec: {op} of {self.name} raised {exc!r}"
        self._carry_out(self.core.handle(event, reason))

    def _fire(self, event: ContainerEvent, reason: str | None = None) -> None:
        self._carry_out(self.core.handle(event, reason))

    # -- the engine operations: each answers with the event its reply names

    async def _pull(self) -> tuple[ContainerEvent, str | None]:
        docker, image, policy = self.backend.client(), self.settings.image, self.backend.config.pull
        timeout = self.backend.config.timeouts.pull
        try:
            if policy != "always":
                try:
                    await asyncio.wait_for(docker.images.inspect(image), timeout)
                    return ContainerEvent.pulled, None
                except _engine_errors() as exc:
                    if _status(exc) != 404:
                        return ContainerEvent.pull_failed, _why(exc)
                if policy == "never":
                    return ContainerEvent.pull_failed, f"image {image} is not present (docker.pull: never)"
            self._fire(ContainerEvent.pull_started)
            await asyncio.wait_for(docker.images.pull(image), timeout)
        except _engine_errors() as exc:
            return ContainerEvent.pull_failed, _why(exc)
        return ContainerEvent.pulled, None

    async def _create(self) -> tuple[ContainerEvent, str | None]:
        config = self.settings.create_config(self.labels)
        try:
            made = await asyncio.wait_for(
                self.backend.client().containers.create(config, name=self.name),
                self.backend.config.timeouts.start)
        except _engine_errors() as exc:
            return ContainerEvent.create_failed, _why(exc)
        self.id = made.id
        return ContainerEvent.created, None

    async def _start(self) -> tuple[ContainerEvent, str | None]:
        try:
            await asyncio.wait_for(self._engine_container().start(), self.backend.config.timeouts.start)
        except _engine_errors() as exc:
            return ContainerEvent.start_failed, _why(exc)
        return ContainerEvent.started, None

    async def _stop(self) -> tuple[ContainerEvent, str | None]:
        grace = self.backend.config.timeouts.stop
        try:
            await asyncio.wait_for(self._engine_container().stop(t=int(grace)), grace + 30)
        except _engine_errors() as exc:
            if _status(exc) not in (304, 404):  # already stopped, or gone
                return ContainerEvent.stop_failed, _why(exc)
        return ContainerEvent.stopped, None

    async def _remove(self) -> tuple[ContainerEvent, str | None]:
        try:
            await asyncio.wait_for(self._engine_container().delete(force=True, v=True),
                                   self.backend.config.timeouts.stop + 30)
        except _engine_errors() as exc:
            if _status(exc) != 404:  # gone already is gone
                return ContainerEvent.remove_failed, _why(exc)
        return ContainerEvent.gone, None

    def _engine_container(self) -> aiodocker.containers.DockerContainer:
        return self.backend.client().containers.container(self.id or self.name)


_OPERATIONS: dict[ContainerReply, Callable[[Container], Awaitable[tuple[ContainerEvent, str | None]]]] = {
    ContainerReply.pull: Container._pull,
    ContainerReply.create: Container._create,
    ContainerReply.start: Container._start,
    ContainerReply.stop: Container._stop,
    ContainerReply.remove: Container._remove,
}
# What an operation that raised (a bug, not the engine's answer) is: its failure.
_FAILURES: dict[ContainerReply, ContainerEvent] = {
    ContainerReply.pull: ContainerEvent.pull_failed,
    ContainerReply.create: ContainerEvent.create_failed,
    ContainerReply.start: ContainerEvent.start_failed,
    ContainerReply.stop: ContainerEvent.stop_failed,
    ContainerReply.remove: ContainerEvent.remove_failed,
}
assert set(_OPERATIONS) == set(_FAILURES) == set(ContainerReply), \
    "every engine operation the spec names has one here, and its failure"


# --- a connection -----------------------------------------------------------------------------------


async def _settle(answer: object) -> object:
    return await answer if inspect.isawaitable(answer) else answer


class DockerConnection(ConnectionHandler):
    """A connection of a docker backend: credentials are the handler's; admission
    makes the container (connection mode); sessions are execs."""

    def __init__(self, backend: DockerBackend, inner: ConnectionHandler, handler: Handler,
                 info: ConnectionInfo, log: ContainerLog, end: Callable[[str], None] | None = None) -> None:
        super().__init__(handler, info)
        self.backend = backend
        self.inner = inner
        self.log = log
        self.end = end  # ends the connection (the server's), with the reason
        self.settings: ContainerSettings | None = None
        self.container: Container | None = None  # connection mode
        self.session_containers = 0
        self.closed = False

    async def check_password(self, username: str, password: bytes) -> Any:
        return await self.inner.check_password(username, password)

    def check_publickey(self, username: str, key: object) -> Any:
        return self.inner.check_publickey(username, key)

    async def check_kbdint(self, username: str, password: bytes) -> Any:
        return await self.inner.check_kbdint(username, password)

    def kbdint_supported(self, username: str) -> bool:
        return self.inner.kbdint_supported(username)

    async def accept_user(self, username: str) -> bool:
        verdict = await _settle(self.inner.accept_user(username))
        if verdict is not True:
            if verdict is False:
                return False
            raise BackendError(f"handler error: accept_user returned {verdict!r}, not a bool")
        settings = await _settle(self.inner.container_settings(username, self.backend.defaults))
        if not isinstance(settings, ContainerSettings):
            raise BackendError(f"handler error: container_settings returned {settings!r}")
        self.settings = settings
        if self.closed:
            raise BackendError("the connection ended")
        if self.backend.config.mode == "connection":
            self.container = self.new_container(self.info.connection_id)
            self.container.on_lost = self.end
            await self.container.ready()
        return True

    def new_container(self, owner: str) -> Container:
        assert self.settings is not None
        container = Container(self.backend, self.backend.container_name(owner), self.settings, self.log,
                              self.backend.labels(self.info))
        container.provide()
        return container

    def session(self) -> SessionHandler:
        return DockerSession(self)

    def close(self) -> None:
        self.closed = True
        if self.container is not None:
            self.container.release()


# --- a session ----------------------------------------------------------------------------------------


class DockerSession(SessionHandler):
    """One session channel: its program is an exec in the connection's container
    (or, in session mode, in a container of its own)."""

    def __init__(self, conn: DockerConnection) -> None:
        super().__init__()
        self.conn = conn
        self.container: Container | None = None
        self.owns_container = False
        self.exec: _Exec | None = None

    def set_env(self, name: str, value: str) -> bool:
        if any(fnmatch.fnmatchcase(name, p) for p in self.conn.backend.env_deny):
            return False
        if not self.conn.backend.env_policy.env_allowed(name, value):
            return False
        self.env[name] = value
        return True

    def window_change(self, cols: int, rows: int, width_px: int, height_px: int) -> bool:
        ok = super().window_change(cols, rows, width_px, height_px)
        if ok and self.exec is not None:
            self.exec.resize(cols, rows)
        return ok

    def signal(self, name: str) -> bool:
        if self.exec is None or name not in SSH_SIGNALS:
            return False
        self.exec.signal(name)
        return True

    async def start(self, io: SessionIO) -> None:
        conn = self.conn
        settings = conn.settings
        assert settings is not None  # admitted
        if io.kind == "subsystem":
            path = settings.subsystems.get(io.subsystem or "")
            if path is None:
                raise BackendError(f"subsystem {io.subsystem!r} is not configured (docker.subsystems)")
            argv = [path]
        elif io.kind == "exec":
            argv = [*settings.shell_command, "-c", io.command or ""]
        else:
            argv = list(settings.shell_command)
        if conn.container is not None:
            self.container = conn.container
        else:  # session mode: a container of its own
            conn.session_containers += 1
            self.container = conn.new_container(f"{conn.info.connection_id}-s{conn.session_containers}")
            self.owns_container = True
            await self.container.ready()
        pty = self.pty_request if io.kind != "subsystem" else None
        env = dict(self.env)
        if pty is not None and self.conn.backend.env_policy.env_allowed("TERM", pty.term):
            env["TERM"] = pty.term
        env.update(io.server_env)
        self.exec = _Exec(conn.backend, self.container, io, pty)
        await self.exec.start(argv, env)

    def started(self) -> None:
        if self.exec is not None:
            self.exec.begin()

    async def wait(self) -> ExitStatus:
        assert self.exec is not None
        return await self.exec.wait()

    def stdin_data(self, data: bytes) -> None:
        if self.exec is not None:
            self.exec.write(data)

    def stdin_eof(self) -> None:
        if self.exec is not None:
            self.exec.write_eof()

    def pause_output(self) -> None:
        if self.exec is not None:
            self.exec.pause()

    def resume_output(self) -> None:
        if self.exec is not None:
            self.exec.resume()

    def close(self) -> None:
        if self.exec is not None:
            # Its own container goes as a whole; in the connection's, the program is ended.
            self.exec.kill(signal_group=not self.owns_container)
        if self.owns_container and self.container is not None:
            self.container.release()


def _half_close(stream: Stream) -> None:
    """EOF to the exec's stdin while its output still flows. REACH-IN (aiodocker): its
    Stream has write_in and close (which ends both directions); the hijacked
    connection's transport is `_resp.connection.transport` (HACKS.md, aiodocker).

    Over TLS (a tcp:// engine with docker.tls) asyncio's SSL transport cannot half-close:
    the TCP connection under it is shut for writing instead, as Docker's own client does
    (its tlsClientCon.CloseWrite): the engine's TLS end reads that as the end of stdin and
    goes on sending the program's output."""
    resp = getattr(stream, "_resp", None)
    connection = getattr(resp, "connection", None)
    transport = getattr(connection, "transport", None)
    if transport is None:
        return
    if transport.can_write_eof():
        transport.write_eof()
    elif transport.get_extra_info("sslcontext") is not None:
        raw = transport.get_extra_info("socket")
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_WR)


_AGENT_OUTPUT = 4096  # an agent's status is a line; more is not one


async def _output(reader: Exec) -> tuple[bytes, bytes]:
    """An exec's stdout and stderr (the first few KiB of each), once it ended."""
    out, err = b"", b""
    async with reader.start(detach=False) as stream:
        while (message := await stream.read_out()) is not None:
            if message.stream == 1:
                out += message.data
            else:
                err += message.data
            if len(out) > _AGENT_OUTPUT or len(err) > _AGENT_OUTPUT:
                break
    return out[:_AGENT_OUTPUT], err[:_AGENT_OUTPUT]


def agent_status(said: str, code: int) -> ExitStatus | None:
    """sshspec-agent's status line ("signal NAME CORE" or "exit CODE") as the program's end,
    or None if it is not one, or not one the engine's exit code agrees with."""
    match said.split():
        case ["signal", name, "0" | "1" as core] if name.isalnum() and name.isupper() or name.isdigit():
            return ExitStatus(code=None, signal=name, core_dumped=core == "1")
        case ["exit", number] if number == str(code):
            return ExitStatus(code=code, signal=None)
    return None


class _Resize(NamedTuple):
    """A window change in an exec's input queue. The engine's resize is an API call of
    its own, and input goes down the attach stream: queued with the input, a resize
    is applied before the input the client sent after it (as sshd's TIOCSWINSZ is),
    so `stty size` right after a window change sees the new size."""

    cols: int
    rows: int


class _Exec:
    """A program running as an exec: its stream, pid, input, output and end."""

    def __init__(self, backend: DockerBackend, container: Container, io: SessionIO,
                 pty: PtyRequest | None) -> None:
        self.backend = backend
        self.container = container
        self.io = io
        self.pty = pty
        self.exec: Exec | None = None
        self.stream: Stream | None = None
        self.pid: int | None = None
        self._head = b""  # output before the pid line
        self._head_done = False
        self._pending_signals: list[str] = []
        self._inbuf: deque[bytes | _Resize] = deque()  # in the client's order; sent by _write
        self._writing = True  # until _write ends: then a resize goes to the engine at once
        self._buffered = 0
        self._input_paused = False
        self._eof = False
        self._last_input = b"\n"
        self._wake = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._finished: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[None]] = []
        self._killed = False
        self.agent = container.settings.agent
        # Where the agent leaves what it saw when the exit code is above 128 (docker.agent).
        self.status_path = "" if self.agent is None else (
            f"{self.agent.status_dir.rstrip('/')}/sshspec-{secrets.token_hex(8)}")

    def _engine(self) -> aiodocker.containers.DockerContainer:
        return self.backend.client().containers.container(self.container.id or self.container.name)

    def _wrapped(self, argv: list[str]) -> list[str]:
        """The program under the agent (its child, which prints its pid first), or under
        the shell wrapper (which prints its pid, then becomes the program)."""
        if self.agent is None:
            return [*PID_WRAPPER, *argv]
        return [self.agent.path, "run", self.status_path, "--", *argv]

    async def start(self, argv: list[str], env: dict[str, str]) -> None:
        container = self.container
        where = f"exec in container {container.name}"
        try:
            self.exec = await asyncio.wait_for(
                self._engine().exec(self._wrapped(argv), stdin=True, tty=self.pty is not None,
                                    environment=env),
                self.backend.config.timeouts.start)
            self.stream = self.exec.start()
            await asyncio.wait_for(self.stream.__aenter__(), self.backend.config.timeouts.start)
            if self._killed:  # the channel closed while the program was starting
                self.backend.spawn(self._end_unannounced())
                return
            if self.pty is not None:
                await self.exec.resize(h=self.pty.rows, w=self.pty.cols)
        except _engine_errors() as exc:
            if self.stream is not None:
                with contextlib.suppress(Exception):
                    await self.stream.close()
            container.exec_failed(f"{where}: {_why(exc)}")  # DOCKER_EXEC_CREATE_FAILED
            raise BackendError(f"{where}: {_why(exc)}") from exc

    def begin(self) -> None:
        """The client has the start's SUCCESS: output and input flow."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._write())]

    # -- output

    async def _read(self) -> None:
        assert self.stream is not None
        try:
            while True:
                await self._resumed.wait()
                message = await self.stream.read_out()
                if message is None:
                    break
                self._deliver(message.stream, message.data)
        except _engine_errors() as exc:
            log.debug("exec output of %s ended: %s", self.container.name, _why(exc))
        if not self._head_done:
            self._end_head(None)
        status = await self._exit_status()
        with contextlib.suppress(Exception):
            await self.stream.close()
        if not self._finished.done():
            self._finished.set_result(status)

    def _deliver(self, stream: int, data: bytes) -> None:
        if stream == 2:
            self.io.write_stderr(data)
            return
        if not self._head_done:
            self._head += data
            line, newline, rest = self._head.partition(b"\n")
            if newline:
                self._end_head(line.rstrip(b"\r"), rest)
            elif len(self._head) > _MAX_PID_LINE:
                self._end_head(None)
            return
        self.io.write(data)

    def _end_head(self, line: bytes | None, rest: bytes = b"") -> None:
        """The pid line arrived (or did not come: the head is output)."""
        self._head_done = True
        if line is not None and line.isdigit():
            self.pid = int(line)
            data = rest
        else:
            data = self._head
        self._head = b""
        if data:
            self.io.write(data)
        for name in self._pending_signals:
            self.signal(name)
        self._pending_signals.clear()
        self._wake.set()  # input may flow now

    async def _exit_status(self) -> ExitStatus:
        if self.exec is None or self._killed:
            return ExitStatus(code=None, signal="KILL" if self._killed else None)
        why = f"the engine still said running {_EXIT_POLLS * _EXIT_POLL_INTERVAL:g} s after its output ended"
        for _ in range(_EXIT_POLLS):
            try:
                info = await asyncio.wait_for(self.exec.inspect(), self.backend.config.timeouts.start)
            except _engine_errors() as exc:
                why = _why(exc)
                break
            if not info.get("Running"):
                code = info.get("ExitCode")
                if isinstance(code, int) and code > 128 and self.agent is not None:
                    return await self._agent_status(code)
                if isinstance(code, int) and code >= 0:
                    return ExitStatus(code=code, signal=None)
                why = f"the engine gave exit code {code!r}"
                break
            await asyncio.sleep(_EXIT_POLL_INTERVAL)  # the engine has not caught up with the stream's end
        self.container.exit_code_failed(f"exit code of exec {self.exec.id}: {why}")  # DOCKER_EXIT_CODE_FAILED
        return ExitStatus(code=None, signal=None)

    async def _agent_status(self, code: int) -> ExitStatus:
        """The engine said 128+N: ask the agent whether its program was killed by a signal
        (one more exec, only then), or exited so. If it cannot tell, the engine's code."""
        assert self.agent is not None and self.exec is not None
        timeout = self.backend.config.timeouts.start
        try:
            reader = await asyncio.wait_for(
                self._engine().exec([self.agent.path, "status", self.status_path], stdout=True, stderr=True),
                timeout)
            out, err = await asyncio.wait_for(_output(reader), timeout)
        except _engine_errors() as exc:
            why = _why(exc)
        else:
            status = agent_status(out.decode(errors="replace"), code)
            if status is not None:
                return status
            said = (out + err).decode(errors="replace").strip()
            why = (f"the agent said {said!r}" if said else
                   f"it left no status (is it in the image? is {self.agent.status_dir} writable?)")
        self.container.agent_read_failed(  # DOCKER_AGENT_READ_FAILED
            f"exec {self.exec.id} ended {code}; sshspec-agent ({self.agent.path}) status "
            f"{self.status_path}: {why}")
        return ExitStatus(code=code, signal=None)

    def pause(self) -> None:
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    async def wait(self) -> ExitStatus:
        return await asyncio.shield(self._finished)

    # -- input

    def write(self, data: bytes) -> None:
        if self._eof or self._killed or not data:
            return
        if self.pty is not None:
            self._last_input = data[-1:]
        self._inbuf.append(data)
        self._buffered += len(data)
        if not self._input_paused and self._buffered > _STDIN_HIGH_WATER:
            self._input_paused = True
            self.io.pause_input(True)
        self._wake.set()

    def write_eof(self) -> None:
        if self._eof or self._killed:
            return
        if self.pty is not None:
            # The tty's EOF character ends a read only at the start of a line.
            self.write(b"\x04" if self._last_input in (b"\n", b"\r", b"\x04") else b"\x04\x04")
        self._eof = True
        self._wake.set()

    async def _write(self) -> None:
        assert self.stream is not None
        stream = self.stream
        # write_in after the stream closed raises RuntimeError
        input_errors: tuple[type[BaseException], ...] = (*_engine_errors(), RuntimeError)
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not self._head_done:
                    continue  # input waits for the pid line (see the module docstring)
                while self._inbuf:
                    chunk = self._inbuf.popleft()
                    if isinstance(chunk, _Resize):
                        await self._resize(chunk.cols, chunk.rows)
                        continue
                    await stream.write_in(chunk)
                    self._buffered -= len(chunk)
                    if self._input_paused and self._buffered <= _STDIN_LOW_WATER:
                        self._input_paused = False
                        self.io.pause_input(False)
                if self._eof:
                    if self.pty is None:
                        _half_close(stream)
                    return
        except input_errors as exc:  # the program is gone: its input with it
            log.debug("exec input of %s ended: %s", self.container.name, exc)
        finally:
            self._writing = False
            self._inbuf.clear()
            if self._input_paused:
                self._input_paused = False
                self.io.pause_input(False)

    # -- signals and the end

    def resize(self, cols: int, rows: int) -> None:
        if self._finished.done() or self._killed:
            return
        if self._writing:  # in order with the input (_Resize)
            if self._inbuf and isinstance(self._inbuf[-1], _Resize):
                # Back to back, only the last size can be seen: a flood of window changes
                # while the input waits (a program not reading it) stays one entry.
                self._inbuf[-1] = _Resize(cols, rows)
            else:
                self._inbuf.append(_Resize(cols, rows))
            self._wake.set()
        elif self.exec is not None:  # the input ended (EOF): nothing to keep in order with
            self.backend.spawn(self._resize(cols, rows))

    async def _resize(self, cols: int, rows: int) -> None:
        assert self.exec is not None
        try:
            await self.exec.resize(h=rows, w=cols)
        except _engine_errors() as exc:  # DOCKER_EXEC_RESIZE_FAILED
            self.container.resize_failed(f"resize of exec {self.exec.id} to {cols}x{rows}: {_why(exc)}")

    def signal(self, name: str) -> None:
        if self._finished.done():
            return
        if self.pid is None:
            if not self._head_done:
                self._pending_signals.append(name)  # delivered once the pid is known
            return
        self.backend.spawn(self._kill(name, self.pid))

    async def _kill(self, name: str, pid: int) -> None:
        if self.agent is None:
            argv = ["/bin/sh", "-c", KILL_SCRIPT, name, str(pid)]
        else:  # the same, without a shell in the image
            argv = [self.agent.path, "signal", name, str(pid)]
        try:
            killer = await self._engine().exec(argv, stdout=False, stderr=False)
            await killer.start(detach=True)
        except _engine_errors() as exc:
            # DOCKER_EXEC_SIGNAL_FAILED
            self.container.signal_failed(f"signal {name} to pid {pid}: {_why(exc)}")

    def kill(self, *, signal_group: bool) -> None:
        """The channel is gone: discard the program's output, end it (SIGHUP, then SIGKILL)."""
        if self._killed or self._finished.done():
            return
        self._killed = True
        for task in self._tasks:
            task.cancel()
        if not signal_group:
            if self.stream is not None:
                self.backend.spawn(self.stream.close())
        elif self.pid is not None:
            self.backend.spawn(self._end(self.pid))
        elif self.stream is not None:  # its pid line has not been read yet
            self.backend.spawn(self._end_unannounced())
        # (no stream yet: start() sees _killed once it has one)
        self._finished.set_result(ExitStatus(code=None, signal="KILL"))

    async def _end(self, pid: int) -> None:
        """SIGHUP to the program's group; SIGKILL for whoever is left a moment later."""
        await self._kill("HUP", pid)
        if self.stream is not None:
            with contextlib.suppress(Exception):
                await self.stream.close()
        await asyncio.sleep(_HUP_GRACE)
        await self._kill("KILL", pid)

    async def _end_unannounced(self) -> None:
        """Ended before its pid line was read: read it (it comes first), then end it."""
        assert self.stream is not None
        head = self._head
        try:
            while b"\n" not in head and len(head) <= _MAX_PID_LINE:
                message = await asyncio.wait_for(self.stream.read_out(), self.backend.config.timeouts.start)
                if message is None:
                    break
                if message.stream == 1:
                    head += message.data
        except _engine_errors() as exc:
            log.debug("exec of %s ended before its pid was known: %s", self.container.name, _why(exc))
        line = head.partition(b"\n")[0].rstrip(b"\r")
        if line.isdigit():
            await self._end(int(line))
        else:
            with contextlib.suppress(Exception):
                await self.stream.close()
