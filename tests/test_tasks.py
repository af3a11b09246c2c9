"""asyncio tasks return to their baseline after clients vanish at every phase.

The subprocess tests (test_faults.py) measure fds and child processes from
outside; tasks are only visible inside the server's process, so this test runs
the server in-process through the public API, with real asyncssh clients on
127.0.0.1 in the same event loop.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import asyncssh
import pytest

from conftest import PASSWORD, USERNAME, in_process_config, wait_until
from sshspec.adapters.logs import Logger
from sshspec.adapters.server import Server


@pytest.mark.parametrize("phase", ["tcp", "kex", "auth", "channel", "exec", "streaming"])
def test_tasks_return_to_baseline(tmp_path: Path, phase: str) -> None:
    config = in_process_config(tmp_path)

    async def main() -> tuple[int, int, list[str]]:
        server = Server(config, logger=Logger(path=str(tmp_path / "log.jsonl")))
        await server.start()
        host, port = server.address  # type: ignore[misc]
        baseline = len(asyncio.all_tasks())
        if phase == "tcp":
            sock = socket.create_connection((host, port))
            await wait_until(lambda: server.connections)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()
        elif phase == "kex":
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"SSH-2.0-vanishing\r\n")
            await reader.readline()
            writer.transport.abort()
        else:
            conn = await asyncssh.connect(host, port, username=USERNAME, password=PASSWORD,
                                          known_hosts=None, client_keys=None, preferred_auth="password")
            if phase in ("channel", "exec", "streaming"):
                command = {"channel": None, "exec": "sleep 30", "streaming": "yes"}[phase]
                chan, session = await conn.create_session(asyncssh.SSHClientSession, command)
                if phase == "streaming":
                    chan.pause_reading()
                await wait_until(lambda: any(c.sessions for c in server.connections))
            conn.abort()
        await wait_until(lambda: not server.connections)
        await asyncio.sleep(0)  # let finished tasks leave the set
        await wait_until(lambda: len(asyncio.all_tasks()) <= baseline, timeout=5)
        after = len(asyncio.all_tasks())
        await server.shutdown()
        codes = [line.split('"code":"')[1].split('"')[0]
                 for line in (tmp_path / "log.jsonl").read_text().splitlines()]
        return baseline, after, codes

    baseline, after, codes = asyncio.run(main())
    assert after <= baseline
    assert codes.count("SSH_CONNECTED") == codes.count("SSH_DISCONNECTED") == 1
