"""The handler of tests/test_codes_live.py (`sshspec serve --handler codes_apps:App`;
tests/ is on the server's PYTHONPATH).

Its programs run in the server process, so a test never waits for a login
shell (the local backend starts the user's shell, which reads its startup
files):

* `echo WORDS`: writes WORDS and a newline; `cat`: copies its input to its
  output until EOF; anything else: writes "ran COMMAND". Each exits 0.
* SIGTERM (what a shutting-down server sends) is accepted and ignored, as a
  program with `trap '' TERM` would.

It also arms tests/failsys.c's send failure from inside the server, at the
exact moment a test needs the server's next socket send to fail, by creating
the file FAILSYS_SEND_FLAG names (every send on a TCP socket then fails with
EPIPE):

* env FAILSYS_ARM (a request that wants no reply): the next thing the server
  sends, the reply to the client's next request that wants one, fails.
* exec `arm-exit`: the program reads its input to EOF, writes "bye", arms and
  returns 3, so the first send after its exit (its EOF, then its exit status)
  fails.

Users: "demo" with password "demo"; anyone with the key `id_ed25519.pub` in the
server's working directory (conftest.start_server puts the test key there).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncssh

from sshspec.adapters.handlers import AuthVerdict, ConnectionInfo, Handler, SessionHandler, SessionIO


def arm() -> None:
    Path(os.environ["FAILSYS_SEND_FLAG"]).touch()


class Program(SessionHandler):
    def set_env(self, name: str, value: str) -> bool:
        if name == "FAILSYS_ARM":
            arm()
        return super().set_env(name, value)

    def signal(self, name: str) -> bool:
        return name == "TERM"  # accepted, ignored: the program runs on

    async def run(self, io: SessionIO) -> int:
        command = io.command or ""
        if command == "arm-exit":
            await io.stdin.read()  # the client has nothing more to send: no reset at close
            io.write(b"bye\n")
            # One loop turn: the output is held until the end of the turn in which it
            # was written (asyncssh_internals._Turn), so it goes out before the arming.
            await asyncio.sleep(0)
            arm()
            return 3
        if command == "cat":
            while data := await io.stdin.read(4096):
                io.write(data)
        elif command.startswith("echo "):
            io.write(command.removeprefix("echo ").encode() + b"\n")
        else:
            io.write(f"ran {command}\n".encode())
        return 0


class App(Handler):
    def __init__(self) -> None:
        self.key = asyncssh.read_public_key("id_ed25519.pub")

    async def check_password(self, username: str, password: bytes) -> AuthVerdict:
        return "ok" if (username, password) == ("demo", b"demo") else "bad"

    def check_publickey(self, username: str, key: object) -> AuthVerdict:
        return "ok" if getattr(key, "public_data", None) == self.key.public_data else "bad"

    def session(self, conn: ConnectionInfo) -> SessionHandler:
        return Program()
