"""TCP forwarding (direct-tcpip: ssh -L, -D, -J) against a live server: the real
OpenSSH client and curl through it to real TCP servers on loopback, the policy's
denials and limits, and every state of the forward spec driven with asyncssh's
client (which can end one direction at a time and leave at any moment)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import http.server
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from conftest import LiveServer, start_server
from test_faults import limited

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is in .ci/system-packages")


# --- real targets on loopback ---------------------------------------------------------------


@pytest.fixture
def http_target(tmp_path: Path) -> Iterator[int]:
    """An HTTP server (the stdlib's, threaded) serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello through the tunnel\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


class Target:
    """A TCP server on 127.0.0.1 for one connection at a time, in a thread:
    ``echo`` sends back what it reads and closes after the client's EOF;
    ``greet`` sends a line and ends its direction at once, then reads to EOF;
    ``hold`` reads to EOF and keeps the connection until the test ends;
    ``flood`` sends for ever; ``stall`` never reads."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.done = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        data = b""
        if self.mode == "flood":  # sends for ever, reads nothing
            with contextlib.suppress(OSError):
                while True:
                    conn.sendall(b"y" * 65536)
            conn.close()
            return
        if self.mode == "stall":  # reads nothing, keeps the connection
            self.held.append(conn)
            self.done.set()
            return
        if self.mode == "greet":
            conn.sendall(b"hello from the target\n")
            conn.shutdown(socket.SHUT_WR)
        while chunk := conn.recv(65536):
            data += chunk
            if self.mode == "echo":
                conn.sendall(chunk)
        self.received.append(data)
        if self.mode == "hold":
            self.held.append(conn)
        else:
            conn.close()
        self.done.set()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def targets() -> Iterator[Any]:
    made: list[Target] = []

    def make(mode: str) -> Target:
        made.append(Target(mode))
        return made[-1]

    yield make
    for t in made:
        t.close()


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose SYNs are never answered: a listener with a full accept queue
    (listen(0), filled, never accepted): a connect to it waits until it times out."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    port = sock.getsockname()[1]
    fill = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fill.append(c)
    yield port
    for c in fill:
        c.close()
    sock.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once it is closed


def free_port() -> int:
    return closed_port()


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Until ssh's local listener accepts (ssh -L/-D binds it after authentication)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError as exc:
            if proc.poll() is not None:
                stderr = proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"ssh exited with {proc.returncode}: {stderr!r}") from exc
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def one(server: LiveServer, code: str) -> list[dict[str, Any]]:
    """Once it is logged: the records with ``code`` (the caller unpacks the one it expects)."""
    server.wait_for_code(code)
    return records_with(server, code)


def records_with(server: LiveServer, code: str) -> list[dict[str, Any]]:
    return [r for r in server.records() if r["code"] == code]


def connect(server: LiveServer, **kwargs: Any) -> Any:
    options = {"username": server.username, "password": server.password, "known_hosts": None,
               "client_keys": None, **kwargs}
    return asyncssh.connect(server.host, server.port, **options)


# --- the real OpenSSH client and curl --------------------------------------------------------


def tunnel(server: LiveServer, *forward: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*server.ssh_args("-N", "-o", "ExitOnForwardFailure=yes", *forward)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_tunnel(server: LiveServer, proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:  # (how fast ssh leaves is not what these tests test)
        proc.kill()
        proc.wait()
    server.wait_for_code("SSH_DISCONNECTED")


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True, timeout=30)


def test_ssh_L_carries_curl_to_a_local_http_server(server: LiveServer, http_target: int) -> None:
    port = free_port()
    proc = tunnel(server, "-L", f"127.0.0.1:{port}:127.0.0.1:{http_target}")
    try:
        wait_listening(port, proc)
        done = curl(f"http://127.0.0.1:{port}/hello.txt")
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"hello through the tunnel\n"
        server.wait_for(lambda rs: sum(r["code"] == "SSH_FORWARD_CLOSED" for r in rs) >= 2)
    finally:
        stop_tunnel(server, proc)
    requested = records_with(server, "SSH_FORWARD_REQUESTED")
    assert requested[0]["labels"]["requestType"] == "direct-tcpip"
    assert f"127.0.0.1:{http_target}" in requested[0]["labels"]["reason"]
    assert len(records_with(server, "SSH_FORWARD_OPEN")) == len(requested)


def test_ssh_D_with_curl_socks5_hostname(server: LiveServer, http_target: int) -> None:
    port = free_port()
    proc = tunnel(server, "-D", f"127.0.0.1:{port}")
    try:
        wait_listening(port, proc)
        # The name is resolved by the server (socks5-hostname): it is the target the log names.
        done = curl("--socks5-hostname", f"127.0.0.1:{port}", f"http://localhost:{http_target}/hello.txt")
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"hello through the tunnel\n"
    finally:
        stop_tunnel(server, proc)
    reasons = [r["labels"]["reason"] for r in records_with(server, "SSH_FORWARD_REQUESTED")]
    assert any(f"localhost:{http_target}" in reason for reason in reasons), reasons


def test_ssh_J_through_sshspec_to_a_second_sshspec(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """ProxyJump: the first server is the bastion, its direct-tcpip reaches the second."""
    first, second = tmp_path / "jump", tmp_path / "inner"
    first.mkdir()
    second.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(first / "id_ed25519")],
                   check=True)
    for name in ("id_ed25519", "id_ed25519.pub"):
        shutil.copy(first / name, second / name)
    jump = start_server(first, f"{request.node.name}-jump")
    inner = start_server(second, f"{request.node.name}-inner")
    try:
        # ProxyJump starts its own ssh for the bastion with the same config file: the
        # options live there (-i on the command line would not reach it).
        config = tmp_path / "ssh_config"
        common = (f"  User {jump.username}\n  IdentityFile {first / 'id_ed25519'}\n  IdentitiesOnly yes\n"
                  "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n"
                  "  LogLevel ERROR\n")
        config.write_text(f"Host jump\n  HostName 127.0.0.1\n  Port {jump.port}\n{common}"
                          f"Host inner\n  HostName 127.0.0.1\n  Port {inner.port}\n{common}")
        done = subprocess.run(["ssh", "-F", str(config), "-J", "jump", "inner", "echo through the bastion"],
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"through the bastion\n"
        jump.wait_for_code("SSH_DISCONNECTED")
        inner.wait_for_code("SSH_DISCONNECTED")
    finally:
        jump.stop()
        inner.stop()
    (requested,) = records_with(jump, "SSH_FORWARD_REQUESTED")
    assert f"127.0.0.1:{inner.port}" in requested["labels"]["reason"]
    assert records_with(jump, "SSH_FORWARD_OPEN")
    assert records_with(inner, "SSH_EXIT")


def test_ssh_J_through_sshspec_to_openssh_sshd(server: LiveServer, tmp_path: Path) -> None:
    """ProxyJump through sshspec to OpenSSH's sshd (started here on loopback with a
    config of its own, as the bench starts it; the same key logs in to both)."""
    from bench.forwarding import start_sshd
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    sshd = start_sshd(tmp_path, Path(f"{server.key}.pub").read_text())
    try:
        config = tmp_path / "ssh_config"
        common = (f"  IdentityFile {server.key}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
                  "  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n")
        config.write_text(f"Host jump\n  HostName 127.0.0.1\n  Port {server.port}\n  User {server.username}\n"
                          f"{common}Host inner\n  HostName 127.0.0.1\n  Port {sshd.port}\n"
                          f"  User {getpass.getuser()}\n{common}")
        done = subprocess.run(["ssh", "-F", str(config), "-J", "jump", "inner", "echo through to sshd"],
                              capture_output=True, timeout=60)
        assert (done.returncode, done.stdout) == (0, b"through to sshd\n"), done.stderr
    finally:
        sshd.proc.terminate()
        sshd.proc.wait(10)
    server.wait_for_code("SSH_FORWARD_CLOSED")
    (requested,) = records_with(server, "SSH_FORWARD_REQUESTED")
    assert f"127.0.0.1:{sshd.port}" in requested["labels"]["reason"]


def test_ssh_J_through_sshspec_to_itself(server: LiveServer, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(f"Host self\n  HostName 127.0.0.1\n  Port {server.port}\n  User {server.username}\n"
                      f"  IdentityFile {server.key}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
                      "  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n")
    done = subprocess.run(["ssh", "-F", str(config), "-J", "self", "self", "echo twice"],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"twice\n"
    server.wait_for_code("SSH_DISCONNECTED", 2)


# --- policy and limits ------------------------------------------------------------------------


def test_permit_open_denies_other_targets_with_the_target_in_the_log(
        server_factory: Any, http_target: int) -> None:
    allowed = closed_port()
    live = server_factory({"forwarding": {"permitOpen": [f"127.0.0.1:{allowed}"]}})
    port = free_port()
    proc = tunnel(live, "-L", f"127.0.0.1:{port}:127.0.0.1:{http_target}")
    try:
        wait_listening(port, proc)
        done = curl(f"http://127.0.0.1:{port}/hello.txt")
        assert done.returncode != 0
        denied = one(live, "SSH_FORWARD_DENIED")[-1]
    finally:
        stop_tunnel(live, proc)
    assert denied["level"] == "info"
    assert f"direct-tcpip to 127.0.0.1:{http_target}" in denied["labels"]["reason"]
    assert "permitOpen" in denied["labels"]["reason"]
    assert not records_with(live, "SSH_FORWARD_REQUESTED")


def refused_open(live: LiveServer, port: int) -> int:
    """The open-failure code a direct-tcpip to 127.0.0.1:`port` gets (it must be refused)."""
    async def main() -> int:
        async with connect(live) as conn:
            with pytest.raises(asyncssh.ChannelOpenError) as info:
                await conn.open_connection("127.0.0.1", port)
            return info.value.code
    return asyncio.run(main())


def test_tcp_none_denies_local_forwarding(server_factory: Any, http_target: int) -> None:
    live = server_factory({"forwarding": {"tcp": "none"}})
    assert refused_open(live, http_target) == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
    (denied,) = one(live, "SSH_FORWARD_DENIED")
    assert "forwarding.tcp" in denied["labels"]["reason"]


def test_max_forwards_per_connection_bites_with_a_code(server_factory: Any, targets: Any) -> None:
    # Its log replays with the same limit (limited: .test-logs/limits/).
    live = limited(server_factory, {"forwarding": {"maxForwardsPerConnection": 1}},
                   {"maxForwardsPerConnection": 1})
    target = targets("hold")

    async def main() -> None:
        async with connect(live) as conn:
            _, first = await conn.open_connection("127.0.0.1", target.port)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", target.port)
            first.close()
            await first.wait_closed()
            live.wait_for_code("SSH_FORWARD_CLOSED")
            # The slot is free again.
            _, again = await conn.open_connection("127.0.0.1", target.port)
            again.close()

    asyncio.run(main())
    (limit,) = one(live, "SSH_FORWARD_LIMIT")
    assert "maxForwardsPerConnection" in limit["labels"]["reason"]


def test_a_refused_target_refuses_the_channel(server: LiveServer) -> None:
    port = closed_port()
    assert refused_open(server, port) == asyncssh.OPEN_CONNECT_FAILED
    (failed,) = one(server, "SSH_FORWARD_CONNECT_FAILED")
    assert f"127.0.0.1:{port}" in failed["labels"]["reason"]


def test_a_silent_target_times_out(server_factory: Any, blackhole: int) -> None:
    live = server_factory({"forwarding": {"connectTimeout": "1s"}})
    assert refused_open(live, blackhole) == asyncssh.OPEN_CONNECT_FAILED
    (timeout,) = one(live, "SSH_FORWARD_CONNECT_TIMEOUT")
    assert "forwarding.connectTimeout" in timeout["labels"]["reason"]


def test_a_client_that_leaves_while_the_server_connects(server: LiveServer, blackhole: int) -> None:
    async def main() -> None:
        conn = await connect(server)
        opening = asyncio.ensure_future(conn.open_connection("127.0.0.1", blackhole))
        await asyncio.to_thread(server.wait_for_code, "SSH_FORWARD_REQUESTED")
        conn.abort()
        with pytest.raises((asyncssh.ChannelOpenError, asyncssh.DisconnectError, ConnectionError, OSError)):
            await opening

    asyncio.run(main())
    server.wait_for_code("SSH_DISCONNECTED")
    codes = [r["code"] for r in server.records()]
    assert codes[codes.index("SSH_FORWARD_REQUESTED"):][:2] == ["SSH_FORWARD_REQUESTED", "SSH_FORWARD_CLOSED"]


# --- half-close, each way, and every way a forward ends ----------------------------------------


def forward_codes(server: LiveServer) -> list[str]:
    return [r["code"] for r in server.records() if r["code"].startswith("SSH_FORWARD_")]


def test_client_eof_first_keeps_the_targets_direction_open(server: LiveServer, targets: Any) -> None:
    target = targets("echo")

    async def main() -> bytes:
        async with connect(server) as conn:
            reader, writer = await conn.open_connection("127.0.0.1", target.port)
            writer.write(b"ping " * 1000)
            writer.write_eof()
            return await reader.read()  # the echo still comes back after our EOF

    assert asyncio.run(main()) == b"ping " * 1000
    server.wait_for_code("SSH_DISCONNECTED")
    assert forward_codes(server) == ["SSH_FORWARD_REQUESTED", "SSH_FORWARD_OPEN", "SSH_FORWARD_CLIENT_EOF",
                                     "SSH_FORWARD_TARGET_EOF", "SSH_FORWARD_CLOSED"]


def test_target_eof_first_keeps_the_clients_direction_open(server: LiveServer, targets: Any) -> None:
    target = targets("greet")

    async def main() -> bytes:
        async with connect(server) as conn:
            reader, writer = await conn.open_connection("127.0.0.1", target.port)
            greeting = await reader.read()  # to the target's EOF
            writer.write(b"still heard")
            writer.write_eof()
            await writer.channel.wait_closed()
            return greeting

    assert asyncio.run(main()) == b"hello from the target\n"
    assert target.done.wait(10)
    assert target.received == [b"still heard"]
    server.wait_for_code("SSH_DISCONNECTED")
    assert forward_codes(server) == ["SSH_FORWARD_REQUESTED", "SSH_FORWARD_OPEN", "SSH_FORWARD_TARGET_EOF",
                                     "SSH_FORWARD_CLIENT_EOF", "SSH_FORWARD_CLOSED"]


@pytest.mark.parametrize("half", ["none", "client", "target"])
def test_the_connection_ends_with_a_forward_open(server: LiveServer, targets: Any, half: str) -> None:
    """open, client_done and target_done each end with the connection."""
    target = targets("greet" if half == "target" else "hold")

    async def main() -> None:
        conn = await connect(server)
        reader, writer = await conn.open_connection("127.0.0.1", target.port)
        writer.write(b"x")
        if half == "client":
            writer.write_eof()
            await asyncio.to_thread(server.wait_for_code, "SSH_FORWARD_CLIENT_EOF")
        elif half == "target":
            await reader.read()
        else:
            await asyncio.to_thread(target.done.wait, 0)  # nothing to wait for: the forward is open
        conn.close()
        await conn.wait_closed()

    asyncio.run(main())
    server.wait_for_code("SSH_DISCONNECTED")
    expected = {"none": [], "client": ["SSH_FORWARD_CLIENT_EOF"], "target": ["SSH_FORWARD_TARGET_EOF"]}[half]
    assert forward_codes(server) == ["SSH_FORWARD_REQUESTED", "SSH_FORWARD_OPEN", *expected,
                                     "SSH_FORWARD_CLOSED"]


def test_shutdown_closes_forwards_and_drains(server_factory: Any, targets: Any) -> None:
    live = server_factory()
    target = targets("hold")

    async def main() -> None:
        async with connect(live) as conn:
            reader, _ = await conn.open_connection("127.0.0.1", target.port)
            live.process.send_signal(signal.SIGTERM)
            assert await reader.read() == b""  # closed by the server
            await conn.wait_closed()

    asyncio.run(main())
    assert live.process.wait(20) == 0
    codes = [r["code"] for r in live.records()]
    assert codes.index("SSH_FORWARD_CLOSED") < codes.index("SSH_DISCONNECTED")


# --- back-pressure: a side that stops reading never makes the server buffer ------------------

NON_READING_CLIENT = """
import os, signal, sys
import paramiko
t = paramiko.Transport(("127.0.0.1", int(sys.argv[1])))
t.connect(username=sys.argv[2], password=sys.argv[3])
chan = t.open_channel("direct-tcpip", dest_addr=("127.0.0.1", int(sys.argv[4])), src_addr=("127.0.0.1", 1),
                      window_size=2**31, max_packet_size=32768)  # a window it will never honour
chan.recv(1)  # the target's flood flows
print("reading stops", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)  # nothing reads the socket from now on
"""


def test_a_client_that_stops_reading_a_flooding_target_cannot_grow_the_server(
        server: LiveServer, targets: Any, tmp_path: Path) -> None:
    """target -> client: the client grants a 2 GiB window and stops reading its socket
    while the target sends without end: the server stops reading the target."""
    import sys

    from test_faults import rss_kib, wait_until
    target = targets("flood")
    script = tmp_path / "client.py"
    script.write_text(NON_READING_CLIENT)
    client = subprocess.Popen([sys.executable, str(script), str(server.port), server.username,
                               server.password, str(target.port)], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline() == "reading stops\n"
        wait_until(lambda: Path(f"/proc/{client.pid}/stat").read_text().split()[2] == "T", 10,
                   "the client to stop")
        before = rss_kib(server.process.pid)
        # A measuring window, not a synchronisation: unbounded, loopback fills ~1 GB/s.
        time.sleep(3)
        grown = rss_kib(server.process.pid) - before
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait(10)
    assert grown < 16 * 1024, f"server RSS grew {grown} KiB in 3 s with a non-reading client"
    server.wait_for_code("SSH_DISCONNECTED")


def test_a_target_that_stops_reading_cannot_grow_the_server(server: LiveServer, targets: Any) -> None:
    """client -> target: the target reads nothing; the client writes 64 MiB at once. The
    server holds at most the channel's window: it stops reading the channel (and
    adjusting the window) while the target's socket is full."""
    from test_faults import rss_kib
    target = targets("stall")

    async def main() -> int:
        async with connect(server) as conn:
            _, writer = await conn.open_connection("127.0.0.1", target.port)
            before = rss_kib(server.process.pid)
            writer.write(b"x" * (64 << 20))  # (buffered in this client, sent as the window allows)
            with contextlib.suppress(TimeoutError):
                # A measuring window: the drain never completes while the target stalls.
                await asyncio.wait_for(writer.drain(), 3)
            grown = rss_kib(server.process.pid) - before
            conn.abort()
            return grown

    grown = asyncio.run(main())
    assert grown < 16 * 1024, f"server RSS grew {grown} KiB in 3 s with a target that does not read"
    server.wait_for_code("SSH_DISCONNECTED")


# --- ssh -R: tcpip-forward listeners and the forwarded-tcpip channels they produce ------------


def test_ssh_R_with_exit_on_forward_failure_carries_curl(server: LiveServer, http_target: int) -> None:
    port = free_port()
    proc = tunnel(server, "-R", f"{port}:127.0.0.1:{http_target}")
    try:
        (listening,) = one(server, "SSH_REMOTE_FORWARD_LISTENING")
        # sshd's GatewayPorts no: the client named no address ("localhost"), bound on loopback.
        assert listening["labels"]["reason"] == f"localhost:{port}"
        done = curl(f"http://127.0.0.1:{port}/hello.txt")
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"hello through the tunnel\n"
        server.wait_for_code("SSH_FORWARD_CLOSED")
    finally:
        stop_tunnel(server, proc)
    (requested,) = one(server, "SSH_FORWARD_REQUESTED")
    assert requested["labels"]["requestType"] == "forwarded-tcpip"
    (opened,) = one(server, "SSH_FORWARD_OPEN")
    assert opened["labels"]["requestType"] == "forwarded-tcpip"


def test_ssh_R_denied_by_policy_exits_with_exit_on_forward_failure(server_factory: Any,
                                                                   http_target: int) -> None:
    live = server_factory({"forwarding": {"tcp": "local"}})
    done = subprocess.run([*live.ssh_args("-N", "-o", "ExitOnForwardFailure=yes", "-R",
                                          f"{free_port()}:127.0.0.1:{http_target}")],
                          capture_output=True, timeout=60)
    assert done.returncode == 255
    assert b"remote port forwarding failed" in done.stderr
    (denied,) = one(live, "SSH_REMOTE_FORWARD_DENIED")
    assert denied["level"] == "info"
    assert "forwarding.tcp does not allow remote forwarding" in denied["labels"]["reason"]
    live.wait_for_code("SSH_DISCONNECTED")


def test_permit_listen_and_gateway_ports(server_factory: Any, targets: Any) -> None:
    live = server_factory({"forwarding": {"permitListen": ["localhost:*", "0.0.0.0:*"]}})
    target = targets("echo")

    async def main() -> None:
        async with connect(live) as conn:
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.2", 0, "127.0.0.1", target.port)
            # The wildcard address is bound on loopback (gatewayPorts false), port 0 allocated.
            listener = await conn.forward_remote_port("0.0.0.0", 0, "127.0.0.1", target.port)
            port = listener.get_port()
            assert port != 0
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"round trip")
            writer.write_eof()
            assert await reader.read() == b"round trip"
            writer.close()
            listener.close()  # cancel-tcpip-forward
            await listener.wait_closed()
            await asyncio.to_thread(live.wait_for_code, "SSH_REMOTE_FORWARD_CANCELLED")
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(main())
    (denied,) = one(live, "SSH_REMOTE_FORWARD_DENIED")
    assert denied["labels"]["reason"] == "127.0.0.2:0: no forwarding.permitListen pattern matches"
    (requested,) = one(live, "SSH_REMOTE_FORWARD_REQUESTED")
    assert requested["labels"]["reason"] == "0.0.0.0:0, bound on 127.0.0.1:0"


def test_a_listener_that_cannot_bind_fails_the_request(server: LiveServer, targets: Any) -> None:
    target = targets("echo")
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        async def main() -> None:
            async with connect(server) as conn:
                with pytest.raises(asyncssh.ChannelListenError):
                    await conn.forward_remote_port("localhost", busy.getsockname()[1], "127.0.0.1",
                                                   target.port)
                # The slot is given back: another listener is fine.
                listener = await conn.forward_remote_port("localhost", 0, "127.0.0.1", target.port)
                listener.close()

        asyncio.run(main())
    finally:
        busy.close()
    (failed,) = one(server, "SSH_REMOTE_FORWARD_FAILED")
    assert failed["level"] == "info" and "in use" in failed["labels"]["reason"]


def test_max_listeners_per_connection(server_factory: Any, targets: Any) -> None:
    # Its log replays with the same limit (limited: .test-logs/limits/).
    live = limited(server_factory, {"forwarding": {"maxListenersPerConnection": 1}},
                   {"maxListenersPerConnection": 1})
    target = targets("echo")

    async def main() -> None:
        async with connect(live) as conn:
            first = await conn.forward_remote_port("localhost", 0, "127.0.0.1", target.port)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("localhost", 0, "127.0.0.1", target.port)
            first.close()

    asyncio.run(main())
    (limit,) = one(live, "SSH_REMOTE_FORWARD_LIMIT")
    assert "maxListenersPerConnection" in limit["labels"]["reason"]


def test_forwarded_connections_beyond_the_limit_are_closed(server_factory: Any, targets: Any) -> None:
    # Its log replays with the same limit (limited: .test-logs/limits/).
    live = limited(server_factory, {"forwarding": {"maxForwardsPerConnection": 1}},
                   {"maxForwardsPerConnection": 1})
    target = targets("echo")

    async def main() -> None:
        async with connect(live) as conn:
            listener = await conn.forward_remote_port("localhost", 0, "127.0.0.1", target.port)
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.get_port())
            writer.write(b"one")
            assert await reader.readexactly(3) == b"one"  # the first is through
            extra, _ = await asyncio.open_connection("127.0.0.1", listener.get_port())
            assert await extra.read() == b""  # the second is closed
            writer.close()
            listener.close()

    asyncio.run(main())
    (limit,) = one(live, "SSH_FORWARD_LIMIT")
    assert limit["labels"]["requestType"] == "forwarded-tcpip"


# --- ssh -A: agent forwarding ------------------------------------------------------------------


def test_ssh_A_then_ssh_add_lists_the_forwarded_key(server: LiveServer, agent: dict[str, str]) -> None:
    script = 'echo "$SSH_AUTH_SOCK"; stat -c %a "$(dirname "$SSH_AUTH_SOCK")"; ssh-add -l'
    done = subprocess.run([*server.ssh_args("-A"), script], capture_output=True, timeout=60, env=agent)
    assert done.returncode == 0, done.stderr
    path, mode, listed = done.stdout.decode().split("\n", 2)
    assert mode == "700"  # only the server's user may enter the socket's directory
    assert "forwarded-key" in listed
    server.wait_for_code("SSH_DISCONNECTED")
    assert not os.path.exists(os.path.dirname(path))  # removed when the session ended
    (requested,) = one(server, "SSH_FORWARD_REQUESTED")
    assert requested["labels"]["requestType"] == "auth-agent@openssh.com"
    assert records_with(server, "SSH_FORWARD_OPEN")


def test_agent_forwarding_off_is_denied_with_a_code(server_factory: Any, agent: dict[str, str]) -> None:
    live = server_factory({"forwarding": {"agent": False}})
    done = subprocess.run([*live.ssh_args("-A"), 'echo "[$SSH_AUTH_SOCK]"; ssh-add -l'], capture_output=True,
                          timeout=60, env=agent)
    assert done.returncode == 2  # ssh-add: no agent
    assert done.stdout == b"[]\n"
    (denied,) = one(live, "SSH_AGENT_FORWARDING_DENIED")
    assert denied["level"] == "info" and denied["labels"]["requestType"] == "auth-agent-req@openssh.com"


# --- the handler API decides where a direct-tcpip goes -----------------------------------------


def test_a_handler_routes_serves_or_refuses_forwards(server_factory: Any, targets: Any) -> None:
    live = server_factory(handler="apps:Forwarding")
    target = targets("echo")

    async def main() -> None:
        async with connect(live, username="demo", password="demo") as conn:
            # Served by the handler itself, both directions, half-close kept.
            reader, writer = await conn.open_connection("upper.internal", 7)
            writer.write(b"shout this")
            writer.write_eof()
            assert await reader.read() == b"SHOUT THIS" + b"BYE\n"
            # Routed elsewhere: the name means nothing to DNS, the handler maps it.
            reader, writer = await conn.open_connection("backend.internal", target.port)
            writer.write(b"via the handler")
            writer.write_eof()
            assert await reader.read() == b"via the handler"
            for host in ("example.com", "raise.internal"):
                with pytest.raises(asyncssh.ChannelOpenError) as info:
                    await conn.open_connection(host, 80)
                assert info.value.code == asyncssh.OPEN_CONNECT_FAILED

    asyncio.run(main())
    live.wait_for_code("SSH_DISCONNECTED")
    failed = [r["labels"]["reason"] for r in records_with(live, "SSH_FORWARD_CONNECT_FAILED")]
    assert failed == ["example.com:80: refused by the handler",
                      "raise.internal:80: refused by the handler: no route to the internal network"], failed
    assert len(records_with(live, "SSH_FORWARD_OPEN")) == 2


def test_git_clone_over_ssh_authenticates_through_the_forwarded_agent(
        tmp_path: Path, request: pytest.FixtureRequest, agent: dict[str, str]) -> None:
    """ssh -A to the first server; there git clones from a second sshspec server that
    authorizes only the agent's key: the clone's ssh signs through the forwarded agent."""
    first, second = tmp_path / "bastion", tmp_path / "git"
    first.mkdir()
    second.mkdir()
    agent_pub = (tmp_path / "agent_key.pub").read_text().strip()
    bastion = start_server(first, f"{request.node.name}-bastion")
    githost = start_server(second, f"{request.node.name}-git",
                           config={"auth": {"users": [{"username": "alice", "authorizedKeys": [agent_pub]}]}})
    repo, work = tmp_path / "repo.git", tmp_path / "work"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    subprocess.run(["git", "clone", "-q", str(repo), str(work)], check=True, capture_output=True)
    (work / "README").write_text("cloned through the agent\n")
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    subprocess.run([*git, "push", "-q", "origin", "HEAD"], check=True, capture_output=True)
    dest = tmp_path / "clone"
    inner_ssh = ("ssh -F /dev/null -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                 "-o BatchMode=yes")
    script = (f"GIT_SSH_COMMAND='{inner_ssh}' git clone -q "
              f"ssh://alice@127.0.0.1:{githost.port}{repo} {dest} && cat {dest}/README")
    try:
        done = subprocess.run([*bastion.ssh_args("-A"), script], capture_output=True, timeout=120, env=agent)
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"cloned through the agent\n"
        bastion.wait_for_code("SSH_DISCONNECTED")
        githost.wait_for_code("SSH_DISCONNECTED")
    finally:
        bastion.stop()
        githost.stop()
    assert records_with(bastion, "SSH_FORWARD_OPEN")[0]["labels"]["requestType"] == "auth-agent@openssh.com"
    (success,) = one(githost, "SSH_AUTH_SUCCESSFUL")
    assert success["labels"]["method"] == "publickey"


# --- a client that never answers the server's channel open -------------------------------------


def _raw_client(live: LiveServer) -> Any:
    from protocol_client import ProtocolClient
    c = ProtocolClient.connect(live.port, wait=5.0)
    c.service_request()
    assert c.next_auth_reply() == "SERVICE_ACCEPT"
    c.auth_password(live.username, live.password)
    assert c.next_auth_reply() == "USERAUTH_SUCCESS"
    return c


def _wait_eof(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server closed ``sock`` (it reads nothing before)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    assert sock.recv(1) == b""
    return time.monotonic() - started


def test_a_client_that_never_answers_a_forwarded_channel_does_not_hold_the_listener(
        server_factory: Any) -> None:
    """ssh -R, and the client ignores the server's CHANNEL_OPEN forwarded-tcpip: after
    forwarding.connectTimeout the accepted connection is closed (SSH_FORWARD_OPEN_TIMEOUT);
    the client's late confirmation is answered with a close; the connection goes on."""
    from protocol_client import string, uint32
    live = server_factory({"forwarding": {"connectTimeout": "1s"}})
    c = _raw_client(live)
    try:
        c.global_request(b"tcpip-forward", True, string("127.0.0.1") + uint32(0))
        assert c.next_global_reply() == "REQUEST_SUCCESS"
        (port,) = c.bound_ports
        peer = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert c.wait_until(lambda: bool(c.server_opens))
        (chan,) = c.server_opens
        assert c.channels[chan].kind == b"forwarded-tcpip"
        waited = _wait_eof(peer, 10)  # never answered: the server gives up on it
        assert 0.8 < waited < 5, waited
        (timeout,) = one(live, "SSH_FORWARD_OPEN_TIMEOUT")
        assert "did not answer the channel open within 1s" in timeout["labels"]["reason"]
        assert timeout["labels"]["requestType"] == "forwarded-tcpip"
        peer.close()
        c.answer_open(chan, True)  # too late: the server closes the channel at once
        assert c.wait_closed(chan)
        assert c.channels[chan].server_closed_first
        c.global_request(b"keepalive@openssh.com", True, b"")
        assert c.next_global_reply() == "REQUEST_FAILURE"  # still served
    finally:
        c.disconnect_now()
    live.wait_for_code("SSH_DISCONNECTED")
    assert not records_with(live, "SSH_FORWARD_OPEN")


def test_a_client_that_never_answers_an_agent_channel_does_not_hold_the_agent_client(
        server_factory: Any) -> None:
    """ssh -A, and the client ignores the server's CHANNEL_OPEN auth-agent@openssh.com: the
    program's agent client is closed after forwarding.connectTimeout, and the program goes on."""
    live = server_factory({"forwarding": {"connectTimeout": "1s", "agent": True}})
    c = _raw_client(live)
    try:
        chan = c.open_channel(b"session")
        assert c.open_reply(chan) == "OPEN_CONFIRMATION"
        c.request(chan, b"auth-agent-req@openssh.com", b"", want_reply=True)
        assert c.next_channel_reply(chan) == "CHANNEL_SUCCESS"
        program = ("python3 -c \"import os, socket, time; s = socket.socket(socket.AF_UNIX); "
                   "s.connect(os.environ['SSH_AUTH_SOCK']); t = time.monotonic(); "
                   "print(s.recv(1) == b'', round(time.monotonic() - t))\"")
        from protocol_client import exec_payload
        c.request(chan, b"exec", exec_payload(program), want_reply=True)
        assert c.next_channel_reply(chan) == "CHANNEL_SUCCESS"
        assert c.wait_until(lambda: bool(c.server_opens), 10)
        (agent_chan,) = c.server_opens
        assert c.channels[agent_chan].kind == b"auth-agent@openssh.com"
        assert c.wait_closed(chan, 15)  # the program ended: the server closed its agent client
        out = b"".join(e.value for e in c.channels[chan].events if e.kind == "data")
        assert out == b"True 1\n", c.channels[chan].events
    finally:
        c.disconnect_now()
    live.wait_for_code("SSH_DISCONNECTED")
    (timeout,) = one(live, "SSH_FORWARD_OPEN_TIMEOUT")
    assert timeout["labels"]["requestType"] == "auth-agent@openssh.com"


# --- the handler API decides agent forwarding; an app that never mentions forwarding forwards nothing


def test_a_handler_serves_the_agent_itself_or_refuses_it(server_factory: Any, agent: dict[str, str]) -> None:
    """agent_target: "demo"'s programs get SSH_AUTH_SOCK with the application's own agent
    behind it (ssh-add -l lists its key, not the client's); "noagent" is refused with the
    handler's reason. The app defines agent_target, so agent forwarding is on by default."""
    live = server_factory(handler="apps:OwnAgent")

    async def run(user: str) -> Any:
        async with connect(live, username=user, password=user, agent_forwarding=True,
                           agent_path=agent["SSH_AUTH_SOCK"]) as conn:
            return await conn.run('echo "[$SSH_AUTH_SOCK]"; ssh-add -l')

    served = asyncio.run(run("demo"))
    assert served.exit_status == 0, served.stderr
    path, listed = str(served.stdout).split("\n", 1)
    assert path.startswith("[/") and "sshspec-agent-" in path
    assert "app-agent-key" in listed and "forwarded-key" not in listed
    refused = asyncio.run(run("noagent"))
    assert refused.exit_status == 2 and str(refused.stdout).startswith("[]")  # no agent
    live.wait_for_code("SSH_DISCONNECTED", count=2)
    failed = [r["labels"] for r in records_with(live, "SSH_CHANNEL_REQUEST_FAILED")
              if r["labels"].get("requestType") == "auth-agent-req@openssh.com"]
    assert [f["reason"] for f in failed] == ["refused by the handler: no agent for this user"], failed
    assert not records_with(live, "SSH_FORWARD_REQUESTED")  # the app's agent: no channel to the client


def test_an_app_that_never_mentions_forwarding_forwards_nothing(server_factory: Any, targets: Any,
                                                                agent: dict[str, str]) -> None:
    """A --handler app that defines neither forward_target nor agent_target: with forwarding.tcp
    and forwarding.agent unset, ssh -L, -R and -A are refused (its clients are not the server's
    OS users: they must not reach its network); set in the config, they work."""
    target = targets("echo")

    async def main(live: LiveServer) -> tuple[bool, bool]:
        async with connect(live, username="demo", password="demo", agent_forwarding=True,
                           agent_path=agent["SSH_AUTH_SOCK"]) as conn:
            await conn.run("anything")
            try:
                reader, writer = await conn.open_connection("127.0.0.1", target.port)
            except asyncssh.ChannelOpenError as exc:
                assert exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
                local = False
            else:
                writer.write(b"ping")
                writer.write_eof()
                assert await reader.read() == b"ping"
                local = True
            try:
                (await conn.forward_remote_port("localhost", 0, "127.0.0.1", target.port)).close()
                remote = True
            except asyncssh.ChannelListenError:
                remote = False
            return local, remote

    default = server_factory(handler="apps:App")
    assert asyncio.run(main(default)) == (False, False)
    default.wait_for_code("SSH_DISCONNECTED")
    (denied,) = records_with(default, "SSH_FORWARD_DENIED")
    assert "forwarding.tcp does not allow local forwarding" in denied["labels"]["reason"]
    (listen,) = records_with(default, "SSH_REMOTE_FORWARD_DENIED")
    assert "forwarding.tcp does not allow remote forwarding" in listen["labels"]["reason"]
    (agent_denied,) = records_with(default, "SSH_AGENT_FORWARDING_DENIED")
    assert agent_denied["labels"]["reason"] == "forwarding.agent is off"

    explicit = server_factory({"forwarding": {"tcp": "all", "agent": True}}, handler="apps:App")
    assert asyncio.run(main(explicit)) == (True, True)
    explicit.wait_for_code("SSH_DISCONNECTED")
    assert not records_with(explicit, "SSH_AGENT_FORWARDING_DENIED")

    # An app that defines forward_target (apps:Forwarding): local forwarding on, -R still off.
    routing = server_factory(handler="apps:Forwarding")

    async def remote(live: LiveServer) -> None:
        async with connect(live, username="demo", password="demo") as conn:
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("localhost", 0, "127.0.0.1", target.port)
    asyncio.run(remote(routing))
    routing.wait_for_code("SSH_DISCONNECTED")
    assert records_with(routing, "SSH_REMOTE_FORWARD_DENIED")
