"""B: the sshspec handler for `sshspec serve --handler bench.handler:BenchHandler`."""

from __future__ import annotations

from bench.common import OUTPUT, WAIT_COMMAND, check_password
from sshspec.adapters.backend_local import LocalBackend
from sshspec.adapters.handlers import (
    AuthVerdict,
    ConnectionInfo,
    Handler,
    LocalSession,
    SessionHandler,
    SessionIO,
)


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


class LocalBenchSession(LocalSession):
    """The same exchange through the local backend: every exec starts a real program
    (`/bin/sh -c 'echo ok'`), so session starts (fork/exec) are what is measured."""

    async def start(self, io: SessionIO) -> None:
        self.process = await self.backend.start(
            command="echo ok" if io.command != WAIT_COMMAND else "cat", env=self.env, pty=None,
            on_stdout=io.write, on_stderr=io.write_stderr, server_env=io.server_env,
            on_stdin_flow=io.pause_input)


class LocalBenchHandler(BenchHandler):
    """`--handler bench.handler:LocalBenchHandler`: BenchHandler's auth, programs from the
    local backend (`make bench`'s launch phase: a normal launch against one under nohup)."""

    def __init__(self) -> None:
        self.backend = LocalBackend(shell="/bin/sh")

    def session(self, conn: ConnectionInfo) -> SessionHandler:
        return LocalBenchSession(self.backend)
