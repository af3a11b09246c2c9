"""The public handler API: serve your own application behind the specs.

Handlers come in the layers of the ContainerSSH SSH server:

* `Handler` (server): one per server; makes a `ConnectionHandler` per connection.
* `ConnectionHandler` (network connection, then authenticated connection):
  checks credentials, gives the backend's verdict on an authenticated user,
  and makes a `SessionHandler` per session channel.
* `SessionHandler` (session channel): env, pty, window-change, signal, the
  program (shell, exec or subsystem), its input and output, its exit.

Handlers never decide protocol order: the specs do. A handler is asked only
what the spec leaves to the backend ("may this env be set?", "start this
program"), and whatever it answers or raises becomes the spec event that says
so (``request_ok``/``request_failed``, ``auth_ok``/``auth_bad``...).

The smallest useful app is a `SessionHandler` with a `run` coroutine::

    class Hello(SessionHandler):
        async def run(self, io: SessionIO) -> int:
            io.write(b"hello " + (io.command or "").encode() + b"\\n")
            return 0

    class App(Handler):
        def session(self, conn: ConnectionInfo) -> SessionHandler:
            return Hello()

    sshspec.adapters.serve(App(), config)   # or: sshspec serve --handler mymod:App
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from sshspec.adapters.backend_local import BackendError, ExitStatus, LocalBackend, LocalProcess, PtyRequest
from sshspec.adapters.passwords import DUMMY_HASH, verify_password

if TYPE_CHECKING:  # the docker backend imports its engine client only when it is used
    from sshspec.adapters.backend_docker import ContainerSettings

__all__ = [
    "AgentTarget", "AuthVerdict", "BackendError", "ConnectionInfo", "ExitStatus", "ForwardServer",
    "ForwardTarget",
    "Handler", "LocalSession",
    "PtyRequest", "SessionHandler", "SessionIO", "ConfiguredHandler",
]

AuthVerdict = Literal["ok", "bad", "unavailable"]
# A forward's serving coroutine: the client's bytes come from the reader, the writer goes to
# the client (closing it ends the server's direction).
ForwardServer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
# Where a direct-tcpip goes: (host, port) to connect to, a `ForwardServer` that serves
# it in-process, or None to refuse it.
ForwardTarget = tuple[str, int] | ForwardServer | None
# Who answers a session's agent clients (ssh -A): True, the client's agent (each agent client an
# auth-agent@openssh.com channel); a `ForwardServer` that serves each in-process (the
# application's own agent); None or False to refuse the agent-forwarding request.
AgentTarget = bool | ForwardServer | None
ProgramKind = Literal["shell", "exec", "subsystem"]


@dataclass(slots=True)
class ConnectionInfo:
    connection_id: str
    remote_addr: str
    username: str | None = None
    client_version: str = ""  # the client's SSH version string, once the version exchange is done


@dataclass(slots=True)
class SessionIO:
    """What a program sees of its channel. Writes go out through the channel
    (asyncssh applies the client's window); `wait_writable` is back-pressure."""

    kind: ProgramKind
    command: str | None
    subsystem: str | None
    env: dict[str, str]
    pty: PtyRequest | None
    write: Callable[[bytes], None]
    write_stderr: Callable[[bytes], None]
    pause_input: Callable[[bool], None] = lambda paused: None  # True: stop reading the client
    server_env: dict[str, str] = field(default_factory=dict)  # SSH_CONNECTION, SSH_TTY...: not the client's
    stdin: asyncio.StreamReader = field(default_factory=asyncio.StreamReader)


class SessionHandler:
    """One session channel's backend. The defaults accept env and pty and
    refuse signals; override `run` (an in-process program) or `start`/`wait`
    (an external one, as `LocalSession` does)."""

    def __init__(self) -> None:
        self.env: dict[str, str] = {}
        self.pty_request: PtyRequest | None = None
        self._task: asyncio.Task[int | ExitStatus] | None = None
        self._io: SessionIO | None = None

    def set_env(self, name: str, value: str) -> bool:
        self.env[name] = value
        return True

    def set_pty(self, pty: PtyRequest) -> bool:
        self.pty_request = pty
        return True

    def window_change(self, cols: int, rows: int, width_px: int, height_px: int) -> bool:
        if self.pty_request is None:
            return False
        self.pty_request = PtyRequest(self.pty_request.term, cols, rows, width_px, height_px,
                                      self.pty_request.modes)
        return True

    def signal(self, name: str) -> bool:
        return False

    async def start(self, io: SessionIO) -> None:
        """Start the program; raise `BackendError` if it cannot start. The
        in-process `run` begins in `started`, once the client has its reply."""
        self._io = io

    def started(self) -> None:
        """The client was told the program started (the SUCCESS reply went out)."""
        if self._io is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(self._io))

    async def run(self, io: SessionIO) -> int | ExitStatus:
        raise BackendError(f"this server runs no {io.kind}")

    async def wait(self) -> ExitStatus:
        """The program's end, after all its output was written."""
        assert self._task is not None
        result = await self._task
        return result if isinstance(result, ExitStatus) else ExitStatus(int(result), None)

    def stdin_data(self, data: bytes) -> None:
        if self._io is not None:
            self._io.stdin.feed_data(data)

    def stdin_eof(self) -> None:
        if self._io is not None:
            self._io.stdin.feed_eof()

    def pause_output(self) -> None:
        """The client stopped reading: stop producing (in-process programs should
        honour this through their own flow control)."""

    def resume_output(self) -> None:
        pass

    def close(self) -> None:
        """The channel is gone: end the program if it still runs."""
        if self._task is not None and not self._task.done():
            self._task.cancel()


class LocalSession(SessionHandler):
    """The default backend: shell and exec as subprocesses of the server's user,
    sftp through OpenSSH's sftp-server, with a PTY when requested."""

    SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                    "/usr/lib/ssh/sftp-server", "/usr/libexec/sftp-server")

    def __init__(self, backend: LocalBackend, env_deny: tuple[str, ...] = (), *,
                 shell: str | None = None, preset_env: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.backend = backend
        self.env_deny = env_deny  # backend.envDeny patterns, on top of the backend's own list
        self.shell = shell  # this connection's shell (a config server's), over the backend's
        # Set by the operator's side (a webhook's `environment`), over what the client sets.
        self.preset_env = dict(preset_env or {})
        self.process: LocalProcess | None = None

    def set_env(self, name: str, value: str) -> bool:
        if any(fnmatch.fnmatchcase(name, p) for p in self.env_deny):
            return False
        if not self.backend.env_allowed(name, value):
            return False
        self.env[name] = value
        return True

    def window_change(self, cols: int, rows: int, width_px: int, height_px: int) -> bool:
        ok = super().window_change(cols, rows, width_px, height_px)
        if ok and self.process is not None:
            self.process.resize(cols, rows, width_px, height_px)
        return ok

    def signal(self, name: str) -> bool:
        if self.process is None:
            return False
        try:
            self.process.send_signal(name)
        except (ValueError, ProcessLookupError):
            return False
        return True

    async def start(self, io: SessionIO) -> None:
        command = io.command
        if io.kind == "subsystem":
            if io.subsystem != "sftp":
                raise BackendError(f"unknown subsystem {io.subsystem!r}")
            import os
            server = next((p for p in self.SFTP_SERVERS if os.access(p, os.X_OK)), None)
            if server is None:
                raise BackendError("sftp-server is not installed (Debian: openssh-sftp-server)")
            command = server
        # The operator's variables first and over the client's (max_env counts them all).
        env = dict(self.preset_env)
        env.update((name, value) for name, value in self.env.items() if name not in env)
        self.process = await self.backend.start(
            command=command, env=env, shell=self.shell,
            pty=self.pty_request if io.kind != "subsystem" else None,
            on_stdout=io.write, on_stderr=io.write_stderr, server_env=io.server_env,
            on_stdin_flow=io.pause_input)

    async def wait(self) -> ExitStatus:
        assert self.process is not None
        return await self.process.wait()

    def stdin_data(self, data: bytes) -> None:
        if self.process is not None:
            self.process.write_stdin(data)

    def stdin_eof(self) -> None:
        # Only while the program runs: asyncssh holds an earlier EOF until it started.
        if self.process is not None:
            self.process.close_stdin()

    def pause_output(self) -> None:
        if self.process is not None:
            self.process.pause_output()

    def resume_output(self) -> None:
        if self.process is not None:
            self.process.resume_output()

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()


class ConnectionHandler:
    """One connection's backend: credentials, the backend verdict, sessions."""

    def __init__(self, handler: Handler, info: ConnectionInfo) -> None:
        self.handler = handler
        self.info = info

    async def check_password(self, username: str, password: bytes) -> AuthVerdict:
        return await self.handler.check_password(username, password)

    def check_publickey(self, username: str, key: object) -> AuthVerdict | Awaitable[AuthVerdict]:
        return self.handler.check_publickey(username, key)

    async def check_kbdint(self, username: str, password: bytes) -> AuthVerdict:
        """The answer to the keyboard-interactive "Password:" prompt (check_password by default)."""
        return await self.check_password(username, password)

    def kbdint_supported(self, username: str) -> bool:
        return self.handler.kbdint_supported(username)

    def accept_user(self, username: str) -> bool | Awaitable[bool]:
        """May the authenticated user in? An awaitable answer holds USERAUTH_SUCCESS
        until it is known (a config server is asked; the docker backend starts the
        user's container)."""
        return self.handler.accept_user(username)

    def container_settings(self, username: str, settings: ContainerSettings
                           ) -> ContainerSettings | Awaitable[ContainerSettings]:
        """This connection's container (docker backend), after `accept_user`: the
        handler's by default (a config server's answer may change it)."""
        return self.handler.container_settings(username, settings)

    def session(self) -> SessionHandler:
        return self.handler.session(self.info)

    def forward_target(self, host: str, port: int) -> ForwardTarget:
        """Where a direct-tcpip (ssh -L, -D, -J) to ``host``:``port`` goes, once the
        policy (forwarding.tcp, permitOpen, limits) let it through: the handler's."""
        return self.handler.forward_target(self.info, host, port)

    def agent_target(self) -> AgentTarget:
        """Who answers this connection's agent clients, once the policy (forwarding.agent, a
        certificate's permit-agent-forwarding) let an auth-agent-req through: the handler's."""
        return self.handler.agent_target(self.info)

    def close(self) -> None:
        """The connection ended (its sessions closed first): release what it holds."""


class Handler:
    """The server-level handler. The default refuses every credential: subclass
    it, or use `ConfiguredHandler` (what `sshspec serve` runs)."""

    def connection(self, info: ConnectionInfo) -> ConnectionHandler:
        return ConnectionHandler(self, info)

    async def check_password(self, username: str, password: bytes) -> AuthVerdict:
        return "unavailable"

    def check_publickey(self, username: str, key: object) -> AuthVerdict | Awaitable[AuthVerdict]:
        """The verdict on ``key`` (an asyncssh ``SSHKey``), or an awaitable of it. OpenSSH
        user certificates never come here: the config's CAs decide them
        (auth.trustedUserCAKeys, `cert-authority` lines; fsm/certificates.py)."""
        return "unavailable"

    def kbdint_supported(self, username: str) -> bool:
        """Keyboard-interactive asks one "Password:" prompt checked by check_password."""
        return False

    def accept_user(self, username: str) -> bool | Awaitable[bool]:
        """The backend's verdict on a user whose credentials were valid, or an awaitable
        of it (USERAUTH_SUCCESS waits for it; a `BackendError` says why not)."""
        return True

    def session(self, conn: ConnectionInfo) -> SessionHandler:
        return SessionHandler()

    def forward_target(self, conn: ConnectionInfo, host: str, port: int) -> ForwardTarget:
        """Where a direct-tcpip to ``host``:``port`` goes: by default there, connected
        from the server as its own user. Return another ``(host, port)`` (a container,
        another machine), a `ForwardServer` coroutine that serves the connection itself,
        or None (or raise `BackendError`) to refuse it: the channel is refused "connect
        failed" (SSH_FORWARD_CONNECT_FAILED, the reason says the handler refused)."""
        return host, port

    def agent_target(self, conn: ConnectionInfo) -> AgentTarget:
        """Asked when a session asks for agent forwarding (ssh -A: auth-agent-req@openssh.com)
        and the policy allows it: who answers its programs' agent clients (the session gets
        SSH_AUTH_SOCK either way). True (the default): the client's own agent, each agent
        client an auth-agent@openssh.com channel to it. A `ForwardServer` coroutine: the
        application serves each agent client itself (its own agent: keys the client never
        had), no channel to the client. None or False (or raise `BackendError`): the request
        fails (SSH_CHANNEL_REQUEST_FAILED, the reason says the handler refused)."""
        return True

    async def aclose(self) -> None:
        """The server stopped: release what the handler holds (HTTP sessions...)."""

    def container_settings(self, username: str, settings: ContainerSettings
                           ) -> ContainerSettings | Awaitable[ContainerSettings]:
        """With backend.type docker: the container the authenticated ``username`` gets.
        ``settings`` is the config's ``docker:``; return it, or a copy with another
        image, env, limits or mounts (``dataclasses.replace(settings, image=...)``).
        Asked once per connection, after `accept_user` (in docker.mode session too)."""
        return settings


@dataclass(frozen=True, slots=True)
class UserEntry:
    password_hash: str | None
    authorized_keys: tuple[object, ...]  # asyncssh SSHKey objects, loaded once at start


class ConfiguredHandler(Handler):
    """Users, passwords and keys from the config; sessions from the local backend.

    Unknown and known users take the same path: a password for an unknown user
    is checked against a dummy hash, so timing does not tell them apart.
    """

    def __init__(self, users: Mapping[str, UserEntry], *, env_deny: tuple[str, ...] = (),
                 max_env: int = 64, shell: str | None = None) -> None:
        self.users = dict(users)
        self.backend = LocalBackend(max_env=max_env, shell=shell)
        self.env_deny = env_deny

    async def check_password(self, username: str, password: bytes) -> AuthVerdict:
        user = self.users.get(username)
        encoded = user.password_hash if user is not None and user.password_hash else DUMMY_HASH
        # scrypt takes tens of milliseconds: keep it off the event loop.
        ok = await asyncio.get_running_loop().run_in_executor(None, verify_password, password, encoded)
        if user is None or not user.password_hash:
            return "bad" if user is not None or self._any_password_users() else "unavailable"
        return "ok" if ok else "bad"

    def kbdint_supported(self, username: str) -> bool:
        return self._any_password_users()

    def _any_password_users(self) -> bool:
        return any(u.password_hash for u in self.users.values())

    def check_publickey(self, username: str, key: object) -> AuthVerdict:
        user = self.users.get(username)
        if user is None:
            return "bad"
        public = getattr(key, "public_data", None)
        return "ok" if any(getattr(k, "public_data", None) == public for k in user.authorized_keys) \
            else "bad"

    def session(self, conn: ConnectionInfo) -> SessionHandler:
        return LocalSession(self.backend, self.env_deny)
