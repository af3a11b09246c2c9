"""Compression against a live `sshspec serve`: off by default, zlib@openssh.com with
`ssh.compression: true`, and every decompressed packet bounded (a zlib bomb ends its
connection with SSH_DECOMPRESSION_LIMIT, the server's memory stays put).

The bomb is what #12 measured on main: after login, an asyncssh client that
negotiated zlib@openssh.com sends SSH_MSG_IGNORE messages of 200 MiB of zeros,
~0.2 MB each on the wire (asyncssh inflated each in one piece: RSS 97 -> 479 MB).
`bench/hostile_zlib.py` measures the same with RSS sampled throughout.
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import asyncssh
import pytest
from asyncssh.packet import String
from test_hostile import good_login_works

from conftest import LiveServer
from sshspec.adapters.asyncssh_internals import MAX_DECOMPRESSED
from test_faults import HOST, asyncssh_options, check_log, codes_of, connection_of, rss_kib, stderr_problems

MSG_IGNORE = 2
ZLIB = "zlib@openssh.com"
ON = {"ssh": {"compression": True}}


def hwm_kib(pid: int) -> int:
    from pathlib import Path
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


class Watch(asyncssh.SSHClient):
    """Keeps what ended the connection (the server's DISCONNECT arrives as an exception)."""

    def __init__(self) -> None:
        self.lost: Exception | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc


async def zlib_client(port: int) -> tuple[asyncssh.SSHClientConnection, Watch, str]:
    """A logged-in asyncssh client that compresses, its watcher, and its address."""
    conn, client = await asyncssh.create_connection(Watch, HOST, port,
                                                    **asyncssh_options(compression_algs=[ZLIB]))
    assert conn.get_extra_info("send_compression") == ZLIB
    host, port = conn.get_extra_info("sockname")[:2]
    return conn, client, f"{host}:{port}"


def send_ignore(conn: asyncssh.SSHClientConnection, size: int) -> None:
    # SSHConnection.send_packet (undocumented, client side): compressed like any
    # packet once authenticated. size bytes of zeros deflate ~1000:1.
    conn.send_packet(MSG_IGNORE, String(bytes(size)))


def ending(live: LiveServer, client_addr: str) -> list[dict[str, Any]]:
    records = live.wait_for_code("SSH_DISCONNECTED")
    cid = connection_of(records, client_addr)
    assert cid is not None
    return [r for r in live.wait_for(lambda rs: codes_of(rs, cid)[-1:] == ["SSH_DISCONNECTED"])
            if r["labels"].get("connectionId") == cid]


# --------------------------------------------------------------------------- off by default


@pytest.mark.parametrize("algs", [[ZLIB], ["zlib"]], ids=["zlib@openssh.com", "zlib"])
def test_off_by_default_a_zlib_only_client_fails_key_exchange(server: LiveServer, algs: list[str]) -> None:
    """The default offers no compression: a client that will only compress fails the
    key exchange (DISCONNECT 3), and the log says why; clients that may compress
    (OpenSSH's -C offers none as well) get none."""
    async def main() -> tuple[type[BaseException], str]:
        try:
            async with asyncssh.connect(HOST, server.port, **asyncssh_options(compression_algs=algs)):
                pass
        except asyncssh.DisconnectError as exc:
            return type(exc), str(exc)
        raise AssertionError("a zlib-only client connected")
    kind, text = asyncio.run(main())
    # DISCONNECT 3 goes out first, but the server closes with the client's key exchange
    # packets unread: a reset may overtake it (the log below is what counts).
    refused = kind is asyncssh.KeyExchangeFailed and "compression" in text
    assert refused or kind is asyncssh.ConnectionLost, (kind, text)
    records = server.wait_for_code("SSH_DISCONNECTED")
    failed = [r for r in records if r["code"] == "SSH_HANDSHAKE_FAILED"]
    assert len(failed) == 1
    reason = failed[0]["labels"]["reason"]
    assert reason.startswith("No matching compression algorithm found") and algs[0] in reason, reason
    assert "sent none and" in reason, reason  # what the server offered: none only

    done = subprocess.run([*server.ssh_args("-C"), "echo plain"], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, "plain\n"), done.stderr
    check_log(server)


# --------------------------------------------------------------------------- on: it works


def test_compressed_sessions_work_when_enabled(server_factory) -> None:  # type: ignore[no-untyped-def]
    """With ssh.compression: true, OpenSSH's `ssh -C` and asyncssh negotiate
    zlib@openssh.com (after authentication), and a megabyte each way, and a
    packet that inflates to near the bound, go through intact."""
    live: LiveServer = server_factory(ON)
    args = [a if a != "LogLevel=ERROR" else "LogLevel=DEBUG1" for a in live.ssh_args("-C")]
    done = subprocess.run([*args, "head -c 1000000 /dev/zero | tr '\\0' a; wc -c"],
                          input=b"z" * 1_000_000, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == b"a" * 1_000_000 + b"1000000\n"
    assert f"compression: {ZLIB}".encode() in done.stderr, done.stderr[-3000:]

    async def main() -> None:
        conn, _, _ = await zlib_client(live.port)
        async with conn:
            assert conn.get_extra_info("recv_compression") == ZLIB
            send_ignore(conn, MAX_DECOMPRESSED - 64)  # just under the bound: nothing happens
            result = await conn.run("cat | wc -c", input="x" * 300_000, check=True)
            assert result.stdout == "300000\n"
    asyncio.run(main())
    codes = live.codes()
    assert "SSH_DECOMPRESSION_LIMIT" not in codes and codes.count("SSH_EXIT") == 2, codes
    assert not stderr_problems(live), live.stderr_lines
    check_log(live)


# --------------------------------------------------------------------------- on: the bomb


def test_a_zlib_bomb_ends_the_connection_with_a_code(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Three IGNORE messages of 200 MiB of zeros: the first one ends the connection
    (DISCONNECT 2, SSH_DECOMPRESSION_LIMIT), the server inflates at most the bound
    (its RSS grows < 16 MiB, from the attacker's login on: a login's scrypt check
    alone takes 16 MiB), and goes on serving others."""
    live: LiveServer = server_factory(ON)

    async def main() -> tuple[str, Exception | None, int, int]:
        conn, client, client_addr = await zlib_client(live.port)
        rss, hwm = rss_kib(live.process.pid), hwm_kib(live.process.pid)
        for _ in range(3):
            if conn.is_closed():
                break
            send_ignore(conn, 200 << 20)
            await asyncio.sleep(0)
        await asyncio.wait_for(conn.wait_closed(), 30)
        return client_addr, client.lost, rss, hwm

    client_addr, lost, rss, hwm = asyncio.run(main())
    assert isinstance(lost, asyncssh.ProtocolError), lost
    assert f"exceeds {MAX_DECOMPRESSED} bytes" in str(lost)
    grown = max(rss_kib(live.process.pid), hwm_kib(live.process.pid)) - max(rss, hwm)
    assert grown < 16 * 1024, f"server memory grew {grown} KiB"
    mine = ending(live, client_addr)
    assert [r["code"] for r in mine[-2:]] == ["SSH_DECOMPRESSION_LIMIT", "SSH_DISCONNECTED"]
    assert mine[-2]["level"] == "warning" and mine[-2]["labels"]["event"] == "decompression_limit"
    assert "compression bomb" in mine[-2]["labels"]["reason"]
    good_login_works(live)
    assert not stderr_problems(live), live.stderr_lines
    check_log(live)


def test_a_zlib_bomb_while_draining(server_factory) -> None:  # type: ignore[no-untyped-def]
    """During a graceful shutdown (the connection drains: its program ignores SIGTERM)
    a bomb still ends the connection with the code; the program is ended with its
    channel, and the server stops at once instead of at the shutdown deadline."""
    live: LiveServer = server_factory({**ON, "limits": {"shutdownTimeout": "60s"}})

    async def main() -> tuple[str, Exception | None]:
        conn, client, client_addr = await zlib_client(live.port)
        proc = await conn.create_process("trap '' TERM; echo started; sleep 50")
        assert await proc.stdout.readline() == "started\n"
        live.process.terminate()  # SIGTERM: stop accepting, drain
        await asyncio.to_thread(live.wait_for_code, "SSH_SHUTTING_DOWN")
        # Refused while draining; its record also shows `sshspec check` the connection is
        # draining (the move there logs nothing), so coverage credits the bomb there.
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process("true")
        send_ignore(conn, 8 << 20)
        await asyncio.wait_for(conn.wait_closed(), 30)
        return client_addr, client.lost

    client_addr, lost = asyncio.run(main())
    assert isinstance(lost, asyncssh.ProtocolError), lost
    mine = ending(live, client_addr)
    assert [r["code"] for r in mine[-4:]] == ["SSH_NEW_CHANNEL_REJECTED", "SSH_CHANNEL_CLOSED",
                                              "SSH_DECOMPRESSION_LIMIT", "SSH_DISCONNECTED"]
    assert live.process.wait(20) == 0
    assert live.codes()[-1] == "SSH_STOPPED"
    check_log(live)
