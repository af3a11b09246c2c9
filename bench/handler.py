"""B: the sshspec handler for `sshspec serve --handler bench.handler:BenchHandler`."""

from __future__ import annotations

from bench.common import OUTPUT, WAIT_COMMAND, check_password
from sshspec.adapters.handlers import AuthVerdict, ConnectionInfo, Handler, SessionHandler, SessionIO


class BenchSession(SessionHandler):
    async def run(self, io: SessionIO) -> int:
        if io.command == WAIT_COMMAND:
            await io.stdin.read()  # idle until the client's EOF
        else:
            io.write(OUTPUT)
        return 0


class BenchHandler(Handler):
    async def check_password(self, username: str, password: bytes) -> AuthVerdict:
        return "ok" if await check_password(username, password) else "bad"

    def session(self, conn: ConnectionInfo) -> SessionHandler:
        return BenchSession()
