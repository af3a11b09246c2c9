"""A finished connection is freed by reference counting, not left to the cyclic collector.

Left to the collector, every connection's objects (asyncssh's connection, its channels,
keys and buffers, our hooks, core and sessions: ~120 of them) were promoted through
its generations while the connection lived and found dead only by a later, full,
collection: the collector's time per connection was twice a bare asyncssh server's
(bench/, issue #11). The server runs in-process here, with real asyncssh clients on
127.0.0.1 in the same event loop and real programs from the local backend, with the
collector off: what is freed is freed by reference counting.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from conftest import PASSWORD, USERNAME, in_process_config, wait_until
from sshspec.adapters.logs import Logger
from sshspec.adapters.server import Server


@pytest.mark.parametrize("ending", ["exec", "client_abort_while_running", "channel_closed_early"])
def test_a_finished_connection_is_freed_without_the_collector(tmp_path: Path, ending: str) -> None:
    config = in_process_config(tmp_path)

    async def main() -> list[str]:
        server = Server(config, logger=Logger(path=str(tmp_path / "log.jsonl")))
        await server.start()
        host, port = server.address  # type: ignore[misc]
        refs: dict[str, weakref.ref[Any]] = {}
        gc.collect()
        gc.disable()
        try:
            conn = await asyncssh.connect(host, port, username=USERNAME, password=PASSWORD,
                                          known_hosts=None, client_keys=None, preferred_auth="password")
            command = "sleep 30" if ending == "client_abort_while_running" else "echo hi"
            chan, _ = await conn.create_session(asyncssh.SSHClientSession, command)
            await wait_until(lambda: any(c.sessions for c in server.connections))
            (spec,) = server.connections
            (session,) = spec.sessions.values()
            refs.update(connection=weakref.ref(spec), asyncssh_connection=weakref.ref(spec.conn),
                        session=weakref.ref(session), channel=weakref.ref(session.chan),
                        core=weakref.ref(spec.core))
            del spec, session
            if ending == "exec":
                await chan.wait_closed()
                assert chan.get_exit_status() == 0
                conn.close()
            elif ending == "channel_closed_early":
                chan.close()
                await chan.wait_closed()
                conn.close()
            else:
                conn.abort()
            await conn.wait_closed()
            del conn, chan
            await wait_until(lambda: not server.connections)
            await wait_until(lambda: all(ref() is None for ref in refs.values()))
        except TimeoutError:
            alive = [name for name, ref in refs.items() if ref() is not None]
            raise AssertionError(f"not freed without the collector: {alive}") from None
        finally:
            gc.enable()
            await server.shutdown()
        return [line.split('"code":"')[1].split('"')[0]
                for line in (tmp_path / "log.jsonl").read_text().splitlines()]

    codes = asyncio.run(main())
    assert codes.count("SSH_CONNECTED") == codes.count("SSH_DISCONNECTED") == 1
