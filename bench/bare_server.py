"""A: a bare asyncssh server with B's algorithms, host key, options and auth check.

    python -m bench.bare_server HOSTKEY [PORT]    (prints `listening on HOST:PORT`)
"""

from __future__ import annotations

import asyncio
import signal
import sys

import asyncssh

from bench.common import OUTPUT, WAIT_COMMAND, check_password
from sshspec.adapters.algorithms import server_options


class BareSession(asyncssh.SSHServerSession[bytes]):
    def __init__(self) -> None:
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.command: str | None = None

    def connection_made(self, chan: asyncssh.SSHChannel[bytes]) -> None:
        self.chan = chan  # type: ignore[assignment]

    def exec_requested(self, command: str) -> bool:
        self.command = command
        return True

    def session_started(self) -> None:
        if self.command != WAIT_COMMAND:
            self._finish(OUTPUT)

    def eof_received(self) -> bool:
        if self.command == WAIT_COMMAND:
            self._finish(b"")
        return True

    def _finish(self, output: bytes) -> None:
        # The same packets as B: output, EOF, exit-status, close.
        assert self.chan is not None
        if output:
            self.chan.write(output)
        self.chan.write_eof()
        self.chan.exit(0)


class BareServer(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        return await check_password(username, password.encode("utf-8", "surrogateescape"))

    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        return BareSession()


async def main(hostkey: str, port: int) -> None:
    key = asyncssh.read_private_key(hostkey)
    # The same create_server arguments as sshspec's Server.start.
    acceptor = await asyncssh.create_server(
        BareServer, "127.0.0.1", port, server_version="sshspec", login_timeout=120.0,
        keepalive_interval=0, allow_scp=False, agent_forwarding=False, x11_forwarding=False,
        gss_host=None, encoding=None, **server_options("default", host_keys=[key]))
    host, bound = acceptor.get_addresses()[0][:2]
    print(f"listening on {host}:{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    acceptor.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
