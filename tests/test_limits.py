"""Limits, each enforced by a live `sshspec serve`, logged with its code, and
tested with real sockets on 127.0.0.1: loginTimeout, maxAuthTries, maxStartups,
maxSessions, maxQueuedRequests, maxEnv, output back-pressure and
clientAliveInterval / clientAliveCountMax."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from typing import Any

import asyncssh
import paramiko
import pytest

from conftest import PASSWORD, USERNAME, LiveServer
from sshspec.adapters.handlers import ConnectionInfo, SessionHandler, SessionIO
from test_faults import (
    HOST,
    LogTail,
    RawClient,
    _Password,
    alive,
    asyncssh_options,
    check_log,
    codes_of,
    comm,
    connection_of,
    cpu_ns,
    descendants,
    limited,
    paramiko_transport,
    relay,
    rss_kib,
    wait_until,
    written,
)


def local_addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def recv_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """Read until the server closes; returns what came and how it ended."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, "eof"
            data += chunk
    except ConnectionResetError:
        return data, "reset"
    except TimeoutError:
        return data, "open"


# --------------------------------------------------------------------------- loginTimeout


def test_login_timeout_drops_every_kind_of_stall(server_factory) -> None:  # type: ignore[no-untyped-def]
    live: LiveServer = server_factory({"limits": {"loginTimeout": "1s"}})
    started = time.monotonic()
    silent = socket.create_connection((HOST, live.port))
    half = socket.create_connection((HOST, live.port))
    half.sendall(b"SSH-2.0-Half")  # no end of line
    kex = socket.create_connection((HOST, live.port))
    kex.sendall(b"SSH-2.0-Stall\r\n")  # version, then nothing: the server waits for our KEXINIT
    auth = paramiko_transport(live.port)  # key exchange done, no authentication
    stalls = {"silent": silent, "half version": half, "key exchange": kex, "auth": auth.sock}
    addrs = {name: local_addr(s) for name, s in stalls.items()}  # type: ignore[arg-type]

    for name in ("silent", "half version", "key exchange"):
        data, how = recv_until_closed(stalls[name], timeout=10)  # type: ignore[arg-type]
        assert how in ("eof", "reset"), f"{name}: still open"
        assert data.startswith(b"SSH-2.0-sshspec"), name
    wait_until(lambda: not auth.is_active(), 10, "paramiko's transport to end")
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 8, elapsed

    records = live.wait_for_code("SSH_DISCONNECTED", 4)
    for name, addr in addrs.items():
        cid = connection_of(records, addr)
        assert cid is not None, name
        kex_done = ["SSH_KEX_DONE"] if name == "auth" else []  # only paramiko finished the key exchange
        assert codes_of(records, cid) == ["SSH_CONNECTED", *kex_done, "SSH_LOGIN_TIMEOUT",
                                          "SSH_HANDSHAKE_FAILED", "SSH_DISCONNECTED"], name
        last = [r for r in records if r["labels"].get("connectionId") == cid][-1]
        assert "login timeout" in last["labels"]["reason"], (name, last)
    for s in (silent, half, kex):
        s.close()
    auth.close()
    check_log(live)


# --------------------------------------------------------------------------- maxAuthTries

AUTH_LIMITS = {"limits": {"maxAuthTries": 3}}


def test_max_auth_tries_paramiko_failed_passwords_then_disconnect(server_factory) -> None:  # type: ignore[no-untyped-def]
    live = limited(server_factory, AUTH_LIMITS, {"maxAuthTries": 3})
    transport = paramiko_transport(live.port)
    addr = local_addr(transport.sock)  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_password(USERNAME, "wrong")
        assert transport.is_active()
    # The attempt after the third failure ends the connection before its password is read.
    with pytest.raises(paramiko.SSHException):
        transport.auth_password(USERNAME, PASSWORD)
    wait_until(lambda: not transport.is_active(), 5, "the disconnect")
    transport.close()
    records = live.wait_for_code("SSH_DISCONNECTED")
    cid = connection_of(records, addr)
    assert cid is not None
    assert codes_of(records, cid) == ["SSH_CONNECTED", "SSH_KEX_DONE",
                                      *["SSH_AUTH_ATTEMPT", "SSH_AUTH_FAILED"] * 3,
                                      "SSH_AUTH_TOO_MANY_TRIES",
                                      "SSH_HANDSHAKE_FAILED", "SSH_DISCONNECTED"]
    check_log(live)


class _WrongEverything(asyncssh.SSHClient):
    """Two wrong passwords, then wrong keyboard-interactive answers for ever."""

    def __init__(self) -> None:
        self.passwords = 0
        self.rounds = 0

    def password_auth_requested(self) -> str | None:
        if self.passwords == 2:
            return None
        self.passwords += 1
        return "wrong"

    def kbdint_auth_requested(self) -> str | None:
        return ""

    def kbdint_challenge_received(self, name: str, instructions: str, lang: str,
                                  prompts: Any) -> list[str]:
        self.rounds += 1
        return ["wrong"] * len(prompts)


def test_max_auth_tries_counts_passwords_and_kbdint_rounds(server_factory) -> None:  # type: ignore[no-untyped-def]
    live = limited(server_factory, AUTH_LIMITS, {"maxAuthTries": 3})
    client = _WrongEverything()

    async def main() -> None:
        async with asyncssh.connect(HOST, live.port, **asyncssh_options(
                password=None, preferred_auth="password,keyboard-interactive",
                client_factory=lambda: client)):
            pass
    with pytest.raises(asyncssh.PermissionDenied) as info:
        asyncio.run(main())
    assert info.value.code == asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE == 14
    assert "too many authentication failures" in info.value.reason.lower()
    assert (client.passwords, client.rounds) == (2, 1)
    records = live.wait_for_code("SSH_DISCONNECTED")
    failed = [r["labels"]["method"] for r in records if r["code"] == "SSH_AUTH_FAILED"]
    assert failed == ["password", "password", "keyboard-interactive"]
    assert [r["code"] for r in records][-3:] == ["SSH_AUTH_TOO_MANY_TRIES", "SSH_HANDSHAKE_FAILED",
                                                 "SSH_DISCONNECTED"]
    check_log(live)


def _bad_keys(n: int) -> list[asyncssh.SSHKey]:
    return [asyncssh.generate_private_key("ssh-ed25519") for _ in range(n)]


def test_publickey_queries_do_not_count_asyncssh(server_factory) -> None:  # type: ignore[no-untyped-def]
    """OpenSSH's "too many authentication failures" trap: ten unauthorized keys
    offered (query step only), then the right password, with maxAuthTries 3."""
    live = limited(server_factory, AUTH_LIMITS, {"maxAuthTries": 3})

    async def main() -> str:
        async with asyncssh.connect(HOST, live.port, **asyncssh_options(
                client_keys=_bad_keys(10), preferred_auth="publickey,password")) as conn:
            return str((await conn.run("echo in", check=True)).stdout)
    assert asyncio.run(main()) == "in\n"
    records = live.wait_for_code("SSH_DISCONNECTED")
    failed = [r["labels"]["method"] for r in records if r["code"] == "SSH_AUTH_FAILED"]
    assert failed == ["publickey"] * 10
    ok = [r["labels"]["method"] for r in records if r["code"] == "SSH_AUTH_SUCCESSFUL"]
    assert ok == ["password"] and "SSH_AUTH_TOO_MANY_TRIES" not in [r["code"] for r in records]
    check_log(live)


def test_publickey_queries_do_not_count_openssh(server_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The same trap with OpenSSH: ten -i keys nobody authorized, then the right one."""
    import subprocess
    live = limited(server_factory, AUTH_LIMITS, {"maxAuthTries": 3})
    args = live.ssh_args()
    identities: list[str] = []
    for i, key in enumerate(_bad_keys(10)):
        path = tmp_path / f"bad{i}"
        key.write_private_key(path)
        path.chmod(0o600)
        identities += ["-i", str(path)]
    identities += ["-i", str(live.key)]
    i = args.index("-i")
    args[i:i + 2] = identities
    done = subprocess.run([*args, "echo in"], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"in\n"
    records = live.wait_for_code("SSH_DISCONNECTED")
    codes = [r["code"] for r in records]
    assert codes.count("SSH_AUTH_FAILED") == 10 and "SSH_AUTH_TOO_MANY_TRIES" not in codes
    check_log(live)


# --------------------------------------------------------------------------- maxStartups


def _first_bytes(sock: socket.socket, timeout: float = 10.0) -> bytes | None:
    """The server's first bytes (its version line) or None if it closed at once."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(256)
    except ConnectionResetError:
        return None
    return data or None


def test_max_startups_refuses_the_flood_but_not_authenticated_users(server_factory) -> None:  # type: ignore[no-untyped-def]
    live = limited(server_factory, {"limits": {"maxStartups": 5, "loginTimeout": "30s"}}, {"maxStartups": 5})
    flood_size = 40

    async def main() -> None:
        async with asyncssh.connect(HOST, live.port, **asyncssh_options()) as resident:
            cat = await resident.create_process("cat")
            # The flood: unauthenticated connections that never say anything.
            flood = [socket.create_connection((HOST, live.port)) for _ in range(flood_size)]
            first = [_first_bytes(s) for s in flood]
            admitted = [s for s, data in zip(flood, first, strict=True) if data is not None]
            refused = [s for s, data in zip(flood, first, strict=True) if data is None]
            assert all(data.startswith(b"SSH-2.0-sshspec") for data in first if data is not None)
            assert len(admitted) == 5 and len(refused) == flood_size - 5
            live.wait_for_code("SSH_STARTUPS_EXCEEDED", flood_size - 5)

            # The authenticated session is not starved ...
            cat.stdin.write("still here\n")
            assert await asyncio.wait_for(cat.stdout.readline(), 10) == "still here\n"
            # ... but a new login cannot get in while the flood holds every slot.
            with pytest.raises((asyncssh.Error, OSError)):
                async with asyncssh.connect(HOST, live.port, **asyncssh_options(login_timeout=10)):
                    pass

            for s in flood:
                s.close()
            live.wait_for_code("SSH_DISCONNECTED", 5)  # the five admitted ones
            async with asyncssh.connect(HOST, live.port, **asyncssh_options()) as late:
                assert (await late.run("echo late", check=True)).stdout == "late\n"

            # Connections that authenticate free their slot: five logged-in users
            # leave all five slots to newcomers.
            users = [await asyncssh.connect(HOST, live.port, **asyncssh_options()) for _ in range(5)]
            newcomers = [socket.create_connection((HOST, live.port)) for _ in range(6)]
            first = [_first_bytes(s) for s in newcomers]
            assert [d is not None for d in first] == [True] * 5 + [False]
            for s in newcomers:
                s.close()
            for conn in users:
                conn.close()
                await conn.wait_closed()
            cat.stdin.write_eof()
            await cat.wait_closed()
    asyncio.run(main())
    codes = live.codes()
    assert codes.count("SSH_STARTUPS_EXCEEDED") == flood_size - 5 + 1 + 1  # flood, the login, the 6th
    check_log(live)


# --------------------------------------------------------------------------- maxSessions, maxEnv


def test_max_sessions_per_connection(server_factory) -> None:  # type: ignore[no-untyped-def]
    live = limited(server_factory, {"limits": {"maxSessions": 3}}, {"maxSessions": 3})

    async def main() -> None:
        async with asyncssh.connect(HOST, live.port, **asyncssh_options()) as conn:
            procs = [await conn.create_process("cat") for _ in range(3)]
            with pytest.raises(asyncssh.ChannelOpenError) as info:
                await conn.create_process("cat")
            assert info.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            # A closed session frees its place.
            procs[0].stdin.write_eof()
            await procs[0].wait_closed()
            live.wait_for_code("SSH_CHANNEL_CLOSED")
            procs[0] = await conn.create_process("cat")
            for proc in procs:
                proc.stdin.write("x\n")
                assert await proc.stdout.readline() == "x\n"
                proc.stdin.write_eof()
                await proc.wait_closed()
    asyncio.run(main())
    records = live.wait_for_code("SSH_DISCONNECTED")
    codes = [r["code"] for r in records]
    assert codes.count("SSH_NEW_CHANNEL") == 4 and codes.count("SSH_NEW_CHANNEL_REJECTED") == 1
    check_log(live)


def test_max_env_entries_per_channel(server_factory) -> None:  # type: ignore[no-untyped-def]
    live = limited(server_factory, {"limits": {"maxEnv": 3}}, {"maxEnv": 3})
    env = {f"SSHSPEC_E{i}": str(i) for i in range(6)}

    async def main() -> str:
        async with asyncssh.connect(HOST, live.port, **asyncssh_options()) as conn:
            result = await conn.run("env | grep ^SSHSPEC_E | sort", env=env)
            return str(result.stdout)
    assert asyncio.run(main()) == "SSHSPEC_E0=0\nSSHSPEC_E1=1\nSSHSPEC_E2=2\n"
    records = live.wait_for_code("SSH_DISCONNECTED")
    outcomes = [r["code"] for r in records if r["labels"].get("requestType") == "env"
                and r["code"] != "SSH_CHANNEL_REQUEST"]
    assert outcomes == ["SSH_CHANNEL_REQUEST_SUCCESSFUL"] * 3 + ["SSH_CHANNEL_REQUEST_FAILED"] * 3
    check_log(live)


# --------------------------------------------------------------------------- maxQueuedRequests


class GatedSession(SessionHandler):
    """A program whose start completes only once the file named by its command
    exists (the test creates it), so requests pile up behind the start."""

    async def start(self, io: SessionIO) -> None:
        gate = io.command or ""
        for _ in range(3000):
            if os.path.exists(gate):
                break
            await asyncio.sleep(0.01)
        await super().start(io)

    async def run(self, io: SessionIO) -> int:
        while await io.stdin.read(65536):
            pass
        return 0


class GatedApp(_Password):
    def session(self, conn: ConnectionInfo) -> SessionHandler:
        return GatedSession()


def _pty_req() -> bytes:
    return (struct.pack(">I", 5) + b"xterm" + struct.pack(">IIII", 80, 24, 0, 0)
            + struct.pack(">I", 1) + b"\x00")


def test_queued_requests_flood_is_answered_in_order_with_bounded_memory(server_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    live: LiveServer = server_factory({"limits": {"maxQueuedRequests": 16}},
                                      handler="test_limits:GatedApp")
    flood = 1000
    gate = tmp_path / "gate"
    client = RawClient.login(live.port)
    chan = client.open_session()
    client.channel_request(chan, "pty-req", _pty_req())
    client.wait_replies(channel=1)
    pid = live.process.pid
    rss_before = rss_kib(pid)
    # exec stays pending until the gate opens; everything after it queues or overflows.
    client.channel_request(chan, "exec", struct.pack(">I", len(str(gate))) + str(gate).encode())
    change = struct.pack(">IIII", 100, 30, 0, 0)
    for _ in range(flood - 2):
        client.channel_request(chan, "window-change", change)
    tail = LogTail(live)
    overflowed = flood - 2 - 15  # 16 held: the exec and 15 window-changes
    tail.wait(lambda rs: sum(r["code"] == "SSH_CHANNEL_REQUEST_FAILED" for r in rs) >= overflowed, 30,
              "the overflowed requests to be refused")
    assert client.channel_replies == [(chan.get_id(), True)]  # nothing answered out of turn
    gate.touch()
    client.wait_replies(channel=flood, timeout=30)
    replies = [ok for _, ok in client.channel_replies]
    assert replies == [True] * (2 + 15) + [False] * overflowed
    rss_after = rss_kib(pid)
    assert rss_after - rss_before < 16 * 1024, (rss_before, rss_after)
    # The channel and the connection still work.
    client.channel_request(chan, "window-change", change)
    client.wait_replies(channel=flood + 1)
    assert client.channel_replies[-1][1] is True
    print(f"queued-request flood: {flood} requests, {overflowed} overflowed, "
          f"RSS {rss_before} -> {rss_after} KiB")
    chan.shutdown_write()
    client.close()
    live.wait_for_code("SSH_DISCONNECTED")
    check_log(live)


def test_global_request_flood_is_answered_in_order(server_factory) -> None:  # type: ignore[no-untyped-def]
    # (remote forwarding off: every tcpip-forward is refused at once, as an unsupported request is)
    live: LiveServer = server_factory({"limits": {"maxQueuedRequests": 4}, "forwarding": {"tcp": "local"}})
    flood = 1000
    client = RawClient.login(live.port)
    pid = live.process.pid
    rss_before = rss_kib(pid)
    for i in range(flood):
        client.global_request("keepalive@openssh.com" if i % 2 else "tcpip-forward",
                              b"" if i % 2 else ssh_string_port())
    client.wait_replies(glob=flood, timeout=30)
    assert client.global_replies == [False] * flood
    assert rss_kib(pid) - rss_before < 16 * 1024
    chan = client.transport.open_session(timeout=10)  # the connection still works
    chan.exec_command("echo ok")
    assert chan.makefile().read() == b"ok\n"
    client.close()
    records = live.wait_for_code("SSH_DISCONNECTED")
    assert sum(r["code"] in ("SSH_UNSUPPORTED_GLOBAL_REQUEST", "SSH_REMOTE_FORWARD_DENIED")
               for r in records) == flood
    check_log(live)


def ssh_string_port() -> bytes:
    return struct.pack(">I", 7) + b"0.0.0.0" + struct.pack(">I", 0)


# --------------------------------------------------------------------------- output back-pressure


def _program(live: LiveServer, name: str) -> int:
    def find() -> int | None:
        return next((p for p in descendants(live.process.pid) if comm(p) == name), None)
    return int(wait_until(find, 10, f"the server's child {name!r}"))


def _settled(pid: int, timeout: float = 15.0) -> tuple[int, int]:
    """Wait until the program stops writing (two equal readings 0.3 s apart)."""
    last = written(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = written(pid)
        if now == last:
            return now, cpu_ns(pid)
        last = now
    raise AssertionError(f"process {pid} kept writing: {last} bytes")


def _paused_for_a_while(live: LiveServer, pid: int, seconds: float = 2.0) -> tuple[int, int]:
    """The program stays paused (no writes, no CPU) and the server's memory flat
    over `seconds` of wall time."""
    wrote, cpu = _settled(pid)
    rss_before = rss_kib(live.process.pid)
    time.sleep(seconds)  # a measurement window, not a synchronisation
    assert written(pid) == wrote, "the program kept producing while the client did not read"
    assert cpu_ns(pid) - cpu < 20_000_000, "the paused program kept using CPU"
    rss_after = rss_kib(live.process.pid)
    assert rss_after - rss_before < 4 * 1024, (rss_before, rss_after)
    return rss_before, rss_after


class _Counter(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.received = 0
        self.more = asyncio.Event()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.received += len(data)
        self.more.set()


def test_output_back_pressure_pauses_the_program_asyncssh(server) -> None:  # type: ignore[no-untyped-def]
    live: LiveServer = server
    window = 64 * 1024

    async def main() -> None:
        async with asyncssh.connect(HOST, live.port, **asyncssh_options()) as conn:
            chan, session = await conn.create_session(_Counter, "yes", encoding=None, window=window,
                                                      max_pktsize=16 * 1024)
            chan.pause_reading()  # the client stops reading: no window adjust goes out
            pid = await asyncio.to_thread(_program, live, "yes")
            rss = await asyncio.to_thread(_paused_for_a_while, live, pid)
            wrote, cpu = written(pid), cpu_ns(pid)
            assert session.received <= window
            chan.resume_reading()
            while session.received < 20 * 1024 * 1024:  # the program resumes
                session.more.clear()
                await asyncio.wait_for(session.more.wait(), 10)
            assert written(pid) - wrote > 10 * 1024 * 1024 and cpu_ns(pid) > cpu
            print(f"back-pressure (asyncssh, pipes): server RSS {rss[0]} -> {rss[1]} KiB while paused; "
                  f"{session.received} bytes after resuming")
            chan.close()
            await chan.wait_closed()
            await asyncio.to_thread(wait_until, lambda: not alive(pid), 10, "yes to be killed")
    asyncio.run(main())
    live.wait_for_code("SSH_DISCONNECTED")
    check_log(live)


def test_output_back_pressure_pauses_the_program_paramiko_pty(server) -> None:  # type: ignore[no-untyped-def]
    live: LiveServer = server
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(HOST, live.port, USERNAME, PASSWORD, look_for_keys=False, allow_agent=False)
    chan = client.get_transport().open_session(window_size=256 * 1024)  # type: ignore[union-attr]
    chan.get_pty()
    chan.exec_command("yes")
    pid = _program(live, "yes")
    rss = _paused_for_a_while(live, pid)  # the channel is not read
    wrote, cpu = written(pid), cpu_ns(pid)
    received = 0
    while received < 4 * 1024 * 1024:  # paramiko reads slowly: 4 MiB is enough to tell
        data = chan.recv(1 << 20)
        assert data
        received += len(data)
    assert written(pid) - wrote > 2 * 1024 * 1024 and cpu_ns(pid) > cpu
    print(f"back-pressure (paramiko, pty): server RSS {rss[0]} -> {rss[1]} KiB while paused")
    chan.close()
    wait_until(lambda: not alive(pid), 10, "yes to be killed")
    client.close()
    live.wait_for_code("SSH_DISCONNECTED")
    check_log(live)


# --------------------------------------------------------------------------- clientAlive


def test_keepalives_detect_a_dead_peer_and_clean_up(server_factory) -> None:  # type: ignore[no-untyped-def]
    live = limited(server_factory, {"ssh": {"clientAliveInterval": "300ms", "clientAliveCountMax": 2}},
                   {"clientAliveCountMax": 2})
    with relay(live) as proxy:
        async def main() -> None:
            conn = await asyncssh.connect(HOST, proxy.port, **asyncssh_options())
            try:
                await conn.create_process("sleep 1000")
                link = proxy.link_for(conn.get_extra_info("sockname")[1])
                pid = await asyncio.to_thread(_program, live, "sleep")
                tail = LogTail(live)
                # A live client answers: keepalives go out, the connection stays.
                await asyncio.to_thread(tail.wait, lambda rs: sum(
                    r["code"] == "SSH_KEEPALIVE_SEND" for r in rs) >= 4, 10, "keepalives")
                assert "SSH_KEEPALIVE_NORESP" not in [r["code"] for r in tail.records]
                proxy.fault(link, "vanish")  # the peer stops answering (and reading)
                frozen_at = time.monotonic()
                before = len(tail.records)
                await asyncio.to_thread(tail.wait, lambda rs: "SSH_DISCONNECTED" in
                                        [r["code"] for r in rs], 10, "the dead peer's disconnect")
                detected = time.monotonic() - frozen_at
                codes = [r["code"] for r in tail.records]
                after = codes[before:]
                assert codes[-3:] == ["SSH_CHANNEL_CLOSED", "SSH_KEEPALIVE_NORESP", "SSH_DISCONNECTED"], codes
                # clientAliveCountMax unanswered keepalives, the first of them possibly
                # sent just before the peer vanished
                assert after.count("SSH_KEEPALIVE_SEND") >= 1
                assert 0.3 < detected < 5, detected
                await asyncio.to_thread(wait_until, lambda: not alive(pid), 10, "the program to end")
                print(f"keepalive: dead peer detected {detected:.2f}s after it vanished")
            finally:
                conn.abort()
        asyncio.run(main())
    check_log(live)
