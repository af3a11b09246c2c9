"""Handlers for the tests' `sshspec serve --handler apps:...` (tests/ is on PYTHONPATH)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from sshspec.adapters.handlers import (
    AuthVerdict,
    BackendError,
    ConnectionInfo,
    ForwardTarget,
    Handler,
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
