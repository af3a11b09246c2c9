"""Handlers for the tests' `sshspec serve --handler apps:...` (tests/ is on PYTHONPATH)."""

from __future__ import annotations

from sshspec.adapters.handlers import AuthVerdict, ConnectionInfo, Handler, SessionHandler, SessionIO


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
