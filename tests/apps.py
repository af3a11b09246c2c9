"""Handlers for the tests' `sshspec serve --handler apps:...` (tests/ is on PYTHONPATH)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from sshspec.adapters.backend_local import LocalBackend
from sshspec.adapters.handlers import (
    AgentTarget,
    AuthVerdict,
    BackendError,
    ConnectionInfo,
    ForwardTarget,
    Handler,
    LocalSession,
    SessionHandler,
    SessionIO,
)


class Hello(SessionHandler):
    async def run(self, io: SessionIO) -> int:
        io.write(f"hello {io.command}\n".encode())
        return 0


class App(Handler):
    """The README's example."""

    async def check_password(self, username: str, password: bytes) -> AuthVerdict:
        return "ok" if (username, password) == ("demo", b"demo") else "bad"

    def session(self, conn: ConnectionInfo) -> SessionHandler:
        return Hello()


class Rejecting(App):
    """Valid credentials, but the backend refuses the user (SSH_BACKEND_REJECTED_HANDSHAKE)."""

    def accept_user(self, username: str) -> bool:
        return False


class Broken(App):
    """A backend that cannot open sessions: the channel open is rejected, the connection lives."""

    def session(self, conn: ConnectionInfo) -> SessionHandler:
        raise RuntimeError("backend is down")


class Holding(App):
    """Credential checks that never finish for user "held" (the connection stays in
    `checking` or `querying` until something else ends it); "unavail" gets
    "unavailable"; any key may sign for "demo"; keyboard-interactive is on. User
    "admit" (any password) is authenticated, and the backend's verdict on it never
    comes (the connection stays in `authenticated`, as while a container starts)."""

    async def check_password(self, username: str, password: bytes) -> AuthVerdict:
        if username == "held":
            await asyncio.get_running_loop().create_future()  # cancelled with the connection
        if username == "unavail":
            return "unavailable"
        if username == "admit":
            return "ok"
        return await super().check_password(username, password)

    def accept_user(self, username: str) -> bool | Awaitable[bool]:
        if username == "admit":
            return asyncio.get_running_loop().create_future()  # never resolved
        return super().accept_user(username)

    def check_publickey(self, username: str, key: object) -> AuthVerdict | Awaitable[AuthVerdict]:
        if username == "held":
            return asyncio.get_running_loop().create_future()  # never resolved
        return {"demo": "ok", "unavail": "unavailable"}.get(username, "bad")  # type: ignore[return-value]

    def kbdint_supported(self, username: str) -> bool:
        return True


class StartsUntilClosed(SessionHandler):
    """A program whose start never finishes: it fails once the channel is closed."""

    def __init__(self) -> None:
        super().__init__()
        self._closed: asyncio.Future[None] | None = None

    async def start(self, io: SessionIO) -> None:
        self._closed = asyncio.get_running_loop().create_future()
        await self._closed
        raise BackendError("the channel closed before the program started")

    def close(self) -> None:
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        super().close()


class SlowStart(App):
    """Sessions whose program is still starting when the client closes the channel."""

    def session(self, conn: ConnectionInfo) -> SessionHandler:
        return StartsUntilClosed()


class PerUserContainers(App):
    """backend.type docker, containers picked per user (the handler API): "ann" and
    "bob" log in with their name as password; each gets WHO in its container's
    environment, bob a memory and a process limit too."""

    async def check_password(self, username: str, password: bytes) -> AuthVerdict:
        return "ok" if username in ("ann", "bob") and password == username.encode() else "bad"

    def container_settings(self, username: str, settings):  # type: ignore[no-untyped-def]
        import dataclasses
        env = {**settings.env, "WHO": username}
        if username == "bob":
            return dataclasses.replace(settings, env=env, memory=64 * 1024 * 1024, pids=64)
        return dataclasses.replace(settings, env=env)


class FailingContainers(App):
    """backend.type docker, a container that cannot be made per user (password: the
    user's name): "ok" gets the config's; "absent" an image that is not there;
    "badnet" a network that does not exist (the create fails); "badcmd" an idle
    command that does not exist (the start fails)."""

    async def check_password(self, username: str, password: bytes) -> AuthVerdict:
        known = ("ok", "absent", "badnet", "badcmd")
        return "ok" if username in known and password == username.encode() else "bad"

    def container_settings(self, username: str, settings):  # type: ignore[no-untyped-def]
        import dataclasses
        changes = {"absent": {"image": "localhost/sshspec-absent:1"},
                   "badnet": {"network": "sshspec-no-such-network"},
                   "badcmd": {"idle_command": ("/nonexistent",)}}.get(username, {})
        return dataclasses.replace(settings, **changes)


class Forwarding(App):
    """Decides where ssh -L goes (the handler API's forward_target): "upper.internal" is
    served in-process (the client's bytes upper-cased back), "backend.internal:PORT"
    goes to 127.0.0.1:PORT, "raise.internal" raises, anything else is refused."""

    def forward_target(self, conn: ConnectionInfo, host: str, port: int) -> ForwardTarget:
        if host == "upper.internal":
            return upper
        if host == "backend.internal":
            return "127.0.0.1", port
        if host == "raise.internal":
            raise BackendError("no route to the internal network")
        return None


async def upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data.upper())
        await writer.drain()
    writer.write(b"BYE\n")


class OwnAgent(App):
    """Serves ssh -A itself (the handler API's agent_target): user "demo"'s programs get
    SSH_AUTH_SOCK, and behind it the application's own agent (one key, `app-agent-key`),
    not the client's; "noagent" is refused agent forwarding. Sessions run local programs."""

    async def check_password(self, username: str, password: bytes) -> AuthVerdict:
        return "ok" if password == username.encode() and username in ("demo", "noagent") else "bad"

    def session(self, conn: ConnectionInfo) -> SessionHandler:
        return LocalSession(LocalBackend(shell="/bin/sh"))

    def agent_target(self, conn: ConnectionInfo) -> AgentTarget:
        if conn.username == "noagent":
            raise BackendError("no agent for this user")
        return serve_agent


APP_KEY = (b"\x00\x00\x00\x0bssh-ed25519" + b"\x00\x00\x00\x20" + bytes(range(32)))


async def serve_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A minimal ssh-agent (draft-miller-ssh-agent): it lists one key and refuses the rest."""
    def string(b: bytes) -> bytes:
        return len(b).to_bytes(4, "big") + b
    while True:
        try:
            length = int.from_bytes(await reader.readexactly(4), "big")
            request = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            return
        if request[:1] == b"\x0b":  # SSH_AGENTC_REQUEST_IDENTITIES
            answer = b"\x0c" + (1).to_bytes(4, "big") + string(APP_KEY) + string(b"app-agent-key")
        else:
            answer = b"\x05"  # SSH_AGENT_FAILURE
        writer.write(string(answer))
        await writer.drain()
