"""ssh.proxyProtocol on a live server: real sockets from several loopback source
addresses (127.0.0.3 plays the trusted load balancer, 127.0.0.2 an untrusted
host), real SSH clients over the same socket after the header, and Debian's real
haproxy in front (`send-proxy`, `send-proxy-v2`), with OpenSSH connecting from
127.0.0.4. Every server's log is replayed by `make test` (check --complete,
coverage)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import paramiko
import pytest

from conftest import USERNAME, LiveServer, have
from sshspec.adapters.proxy_protocol import V2_SIGNATURE
from test_faults import check_log, limited

PROXY = "127.0.0.3"  # the trusted load balancer
STRANGER = "127.0.0.2"  # not trusted
CLIENT = "127.0.0.4"  # the client behind haproxy
HAPROXY_SOURCE = "127.0.0.5"  # haproxy's own address towards sshspec
TRUSTED = {"ssh": {"proxyProtocol": {"enabled": True, "trustedNetworks": [f"{PROXY}/32"]}}}


def trusted(**proxy: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"ssh": {"proxyProtocol": {**TRUSTED["ssh"]["proxyProtocol"], **proxy}}}
    return config


def connect_from(live: LiveServer, source: str, port: int | None = None) -> socket.socket:
    return socket.create_connection((live.host, port or live.port), timeout=10, source_address=(source, 0))


def v2_inet(source: str, sport: int, dport: int = 22) -> bytes:
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    destination = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    block = (socket.inet_pton(family, source) + socket.inet_pton(family, destination)
             + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))
    fam = (0x21 if family == socket.AF_INET6 else 0x11)
    return V2_SIGNATURE + bytes([0x21, fam]) + len(block).to_bytes(2, "big") + block


def paramiko_exec(sock: socket.socket, live: LiveServer, command: str) -> str:
    """Log in over `sock` (whatever was sent on it before) and run `command`."""
    transport = paramiko.Transport(sock)
    try:
        transport.connect(username=USERNAME, pkey=paramiko.Ed25519Key.from_private_key_file(str(live.key)))
        channel = transport.open_session()
        channel.exec_command(command)
        out = channel.makefile().read().decode()
        assert channel.recv_exit_status() == 0
        return out
    finally:
        transport.close()


def asyncssh_exec(sock: socket.socket, live: LiveServer, command: str) -> str:
    async def main() -> str:
        async with asyncssh.connect(sock=sock, username=USERNAME, client_keys=[str(live.key)],
                                    known_hosts=None) as conn:
            result = await conn.run(command, check=True)
            return str(result.stdout)
    return asyncio.run(main())


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            data += chunk
    return data


def records_of(live: LiveServer, code: str) -> list[dict[str, Any]]:
    return [r for r in live.records() if r["code"] == code]


def connection_records(live: LiveServer, remote_addr: str) -> list[dict[str, Any]]:
    """The records of the connection whose SSH_CONNECTED names `remote_addr`."""
    records = live.records()
    ids = {r["labels"]["connectionId"] for r in records
           if r["code"] == "SSH_CONNECTED" and r["labels"]["remoteAddr"] == remote_addr}
    assert len(ids) == 1, (remote_addr, ids)
    return [r for r in records if r["labels"].get("connectionId") in ids]


# --- a trusted proxy names the client ------------------------------------------------------------


def test_a_v1_header_names_the_client_everywhere(server_factory: Any) -> None:
    live: LiveServer = server_factory(TRUSTED)
    sock = connect_from(live, PROXY)
    proxy_port = sock.getsockname()[1]
    sock.sendall(b"PROXY TCP4 198.51.100.7 192.0.2.1 40001 2222\r\n")
    # SSH_CONNECTION is the client's and the address it connected to, as the header says.
    assert paramiko_exec(sock, live, 'echo "$SSH_CONNECTION"') == "198.51.100.7 40001 192.0.2.1 2222\n"
    live.wait_for_code("SSH_DISCONNECTED")
    header, = records_of(live, "SSH_PROXY_HEADER")
    assert header["labels"] == {"remoteAddr": "198.51.100.7:40001", "event": "proxy_header",
                                "reason": f"PROXY v1 header from {PROXY}:{proxy_port}"}
    records = connection_records(live, "198.51.100.7:40001")
    assert {r["labels"]["remoteAddr"] for r in records} == {"198.51.100.7:40001"}
    assert [r["code"] for r in records][:2] == ["SSH_CONNECTED", "SSH_KEX_DONE"]
    check_log(live)


@pytest.mark.parametrize(("source", "label"), [("198.51.100.8", "198.51.100.8:40002"),
                                               ("2001:db8::8", "2001:db8::8:40002")])
def test_a_v2_header_names_the_client(server_factory: Any, source: str, label: str) -> None:
    live: LiveServer = server_factory(TRUSTED)
    sock = connect_from(live, PROXY)
    sock.sendall(v2_inet(source, 40002))
    assert asyncssh_exec(sock, live, 'echo "$SSH_CLIENT"') == f"{source} 40002 22\n"
    live.wait_for_code("SSH_DISCONNECTED")
    assert records_of(live, "SSH_PROXY_HEADER")[0]["labels"]["remoteAddr"] == label
    assert {r["labels"]["remoteAddr"] for r in connection_records(live, label)} == {label}
    check_log(live)


def test_a_local_header_keeps_the_proxys_own_address(server_factory: Any) -> None:
    """v2 LOCAL (a health check of the balancer itself) and v1 UNKNOWN name nobody:
    the connection is the proxy's."""
    live: LiveServer = server_factory(TRUSTED)
    for header in (V2_SIGNATURE + b"\x20\x00\x00\x00", b"PROXY UNKNOWN\r\n"):
        sock = connect_from(live, PROXY)
        sock.sendall(header)
        proxy = f"{PROXY}:{sock.getsockname()[1]}"
        assert paramiko_exec(sock, live, "true") == ""
        assert connection_records(live, proxy)[0]["code"] == "SSH_CONNECTED"
    first, second = records_of(live, "SSH_PROXY_HEADER")
    assert "v2 header" in first["labels"]["reason"] and "v1 header" in second["labels"]["reason"]
    assert all(r["labels"]["reason"].endswith("the proxy's own connection, no client named")
               for r in (first, second))
    check_log(live)


def test_the_clients_bytes_after_the_header_reach_ssh_untouched(server_factory: Any) -> None:
    """Header and the client's version line in one segment: the server answers the
    version with its KEXINIT, so the line reached the SSH layer whole."""
    live: LiveServer = server_factory(TRUSTED)
    sock = connect_from(live, PROXY)
    sock.sendall(b"PROXY TCP4 198.51.100.9 192.0.2.1 40003 22\r\nSSH-2.0-OpenSSH_9.2p1 test\r\n")
    data = b""
    while b"\r\n" not in data or len(data) < data.index(b"\r\n") + 8:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    version, _, packet = data.partition(b"\r\n")
    assert version == b"SSH-2.0-sshspec"
    assert packet[5] == 20  # SSH_MSG_KEXINIT: sent once the client's version was read
    sock.close()
    live.wait_for_code("SSH_DISCONNECTED")
    assert [r["code"] for r in connection_records(live, "198.51.100.9:40003")] == [
        "SSH_CONNECTED", "SSH_HANDSHAKE_ABANDONED", "SSH_DISCONNECTED"]  # it left without trying
    check_log(live)


def test_admission_is_the_clients_the_header_names(server_factory: Any) -> None:
    """Behind one trusted balancer each client is its own source: per-source limits
    and penalties are decided after the header, for the address it names (the
    proxy's own address is one peer for all of them)."""
    live: LiveServer = server_factory({**trusted(), "limits": {
        "perSourceMaxStartups": 1, "perSourcePenalties": {"authfail": "20s"}}})
    # One unauthenticated connection per source: a second from 198.51.100.20 is refused,
    # one from 198.51.100.21 through the same proxy is served.
    first = connect_from(live, PROXY)
    first.sendall(b"PROXY TCP4 198.51.100.20 192.0.2.1 40020 22\r\n")
    transport = paramiko.Transport(first)
    transport.start_client(timeout=10)  # admitted, key exchange done, not authenticated
    second = connect_from(live, PROXY)
    second.sendall(b"PROXY TCP4 198.51.100.20 192.0.2.1 40021 22\r\n")
    assert read_to_eof(second) == b""
    full, = records_of(live, "SSH_SOURCE_STARTUPS_EXCEEDED")
    assert (full["labels"]["remoteAddr"], full["labels"]["event"]) == ("198.51.100.20:40021", "source_full")
    other = connect_from(live, PROXY)
    other.sendall(b"PROXY TCP4 198.51.100.21 192.0.2.1 40022 22\r\n")
    assert paramiko_exec(other, live, "true") == ""
    # A failed password (20 s of penalty, past `min`) refuses that client's source, not the proxy.
    try:
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_password(USERNAME, "wrong")
    finally:
        transport.close()
    live.wait_for_code("SSH_PENALTY_ACTIVE")  # (the log's last record may be another's by then)
    active, = records_of(live, "SSH_PENALTY_ACTIVE")
    assert active["labels"]["remoteAddr"] == "198.51.100.20:40020"
    again = connect_from(live, PROXY)
    again.sendall(b"PROXY TCP4 198.51.100.20 192.0.2.1 40023 22\r\n")
    assert read_to_eof(again) == b""
    penalised, = records_of(live, "SSH_SOURCE_PENALISED")
    assert (penalised["labels"]["remoteAddr"], penalised["labels"]["event"]) == (
        "198.51.100.20:40023", "source_penalised")
    served = connect_from(live, PROXY)
    served.sendall(b"PROXY TCP4 198.51.100.22 192.0.2.1 40024 22\r\n")
    assert paramiko_exec(served, live, "true") == ""
    check_log(live)


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [b"PROXY TCP4 198.51.100.10 192.0.2.1 40004 22\r\n",
                                    b"PRO",  # then the rest: decided when the signature is whole
                                    v2_inet("198.51.100.10", 40004)], ids=["v1", "v1-split", "v2"])
def test_a_header_from_an_untrusted_peer_ends_its_connection(server_factory: Any, header: bytes) -> None:
    live: LiveServer = server_factory(TRUSTED)
    sock = connect_from(live, STRANGER)
    peer = f"{STRANGER}:{sock.getsockname()[1]}"
    assert sock.recv(17) == b"SSH-2.0-sshspec\r\n"  # an untrusted peer is served at once, as ever
    sock.sendall(header)
    if header == b"PRO":
        sock.sendall(b"XY TCP4 198.51.100.10 192.0.2.1 40004 22\r\n")
    after = read_to_eof(sock)
    assert b"not in ssh.proxyProtocol.trustedNetworks" in after  # the DISCONNECT's description
    records = connection_records(live, peer)
    assert [r["code"] for r in records] == ["SSH_CONNECTED", "SSH_PROXY_HEADER_REFUSED",
                                            "SSH_HANDSHAKE_FAILED", "SSH_DISCONNECTED"]
    version = 2 if header.startswith(V2_SIGNATURE) else 1
    assert records[1]["labels"]["reason"] == (f"PROXY v{version} header from {peer}, "
                                              f"which is not in ssh.proxyProtocol.trustedNetworks")
    assert records[1]["labels"]["event"] == "untrusted_proxy_header"
    assert not records_of(live, "SSH_PROXY_HEADER")
    # The untrusted host is still served without a header, under its own address.
    sock = connect_from(live, STRANGER)
    assert paramiko_exec(sock, live, 'echo "$SSH_CLIENT"').startswith(f"{STRANGER} ")
    check_log(live)


BAD_HEADERS = [
    (b"SSH-2.0-OpenSSH_9.2p1\r\n",
     "no PROXY protocol header: the peer sent b'SSH-2.0-OpenSSH_9.2p1\\r\\n' first"),
    (b"PROXY TCP4 198.51.100.11 192.0.2.1 40005 22\n", "v1 line ends in a bare LF, not CRLF"),
    (b"PROXY TCP4 198.51.100.011 192.0.2.1 40005 22\r\n",
     "v1 TCP4 address '198.51.100.011' is not a canonical"),
    (b"PROXY TCP4 " + b"9" * 200, "v1 line without CRLF in its first 107 bytes"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "v2 header announces 65535 bytes of addresses and TLVs"),
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "v2 header of version 1, not 2"),
    (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "v2 PROXY for a DGRAM transport"),
]


def test_a_trusted_peer_without_a_valid_header_is_refused_and_others_are_served(
        server_factory: Any) -> None:
    """Missing, malformed and oversized headers: each connection is closed before a
    byte of SSH is sent (the peer reads EOF at once), logged with the proxy's
    address and why; the server serves everyone else throughout."""
    live: LiveServer = server_factory(TRUSTED)
    for n, (data, why) in enumerate(BAD_HEADERS, start=1):
        sock = connect_from(live, PROXY)
        peer = f"{PROXY}:{sock.getsockname()[1]}"
        sock.sendall(data)
        assert read_to_eof(sock) == b""
        invalid = live.wait_for_code("SSH_PROXY_HEADER_INVALID", n)
        record = [r for r in invalid if r["code"] == "SSH_PROXY_HEADER_INVALID"][-1]
        assert record["labels"]["remoteAddr"] == peer
        assert record["labels"]["reason"].startswith(why), record
        assert record["level"] == "warning" and record["labels"]["event"] == "proxy_header_invalid"
    assert not records_of(live, "SSH_CONNECTED")  # none of them was admitted
    sock = connect_from(live, PROXY)
    sock.sendall(b"PROXY TCP4 198.51.100.12 192.0.2.1 40006 22\r\n")
    assert paramiko_exec(sock, live, 'echo "$SSH_CLIENT"') == "198.51.100.12 40006 22\n"
    check_log(live)


def test_a_slow_or_silent_trusted_peer_is_refused_in_time(server_factory: Any) -> None:
    """headerTimeout bounds the wait; it is never longer than limits.loginTimeout."""
    live: LiveServer = server_factory({**trusted(headerTimeout="500ms")})
    for sent in (b"PROXY TCP4", b"", V2_SIGNATURE):
        sock = connect_from(live, PROXY)
        sock.sendall(sent)
        start = time.monotonic()
        assert read_to_eof(sock) == b""
        assert 0.4 < time.monotonic() - start < 5
    reasons = [r["labels"]["reason"] for r in records_of(live, "SSH_PROXY_HEADER_INVALID")]
    assert reasons == [f"no complete PROXY header within 0.5s ({n} bytes received)" for n in (10, 0, 12)]
    # A peer that closes half-way is refused at once, saying so.
    sock = connect_from(live, PROXY)
    sock.sendall(b"PROXY TCP4 198.51.100.13")
    sock.shutdown(socket.SHUT_WR)
    assert read_to_eof(sock) == b""
    live.wait_for(lambda rs: len([r for r in rs if r["code"] == "SSH_PROXY_HEADER_INVALID"]) == 4)
    assert records_of(live, "SSH_PROXY_HEADER_INVALID")[-1]["labels"]["reason"] == (
        "the peer closed the connection before a complete PROXY header (24 bytes received)")
    check_log(live)

    capped: LiveServer = server_factory({**trusted(headerTimeout="1h"), "limits": {"loginTimeout": "700ms"}})
    sock = connect_from(capped, PROXY)
    assert read_to_eof(sock) == b""
    capped.wait_for_code("SSH_PROXY_HEADER_INVALID")
    invalid, = records_of(capped, "SSH_PROXY_HEADER_INVALID")
    reason = invalid["labels"]["reason"]
    assert reason == "no complete PROXY header within 0.7s (0 bytes received)"
    check_log(capped)


def test_at_most_max_startups_connections_await_their_header(server_factory: Any) -> None:
    live = limited(server_factory, {**trusted(headerTimeout="30s"), "limits": {"maxStartups": 2}},
                   {"maxStartups": 2})
    waiting = [connect_from(live, PROXY) for _ in range(2)]
    third = connect_from(live, PROXY)  # accepted after the two (the backlog is FIFO)
    assert read_to_eof(third) == b""
    exceeded, = records_of(live, "SSH_STARTUPS_EXCEEDED")
    assert exceeded["labels"] == {"remoteAddr": f"{PROXY}:{third.getsockname()[1]}", "event": "proxy_connect"}
    # The two still wait; once one's header is in, its slot is free again.
    waiting[0].sendall(b"PROXY TCP4 198.51.100.14 192.0.2.1 40007 22\r\n")
    assert paramiko_exec(waiting[0], live, "true") == ""
    fourth = connect_from(live, PROXY)
    fourth.sendall(b"PROXY TCP4 198.51.100.15 192.0.2.1 40008 22\r\n")
    assert paramiko_exec(fourth, live, "true") == ""
    assert len(records_of(live, "SSH_STARTUPS_EXCEEDED")) == 1
    waiting[1].close()
    check_log(live)


def test_shutdown_cuts_connections_still_awaiting_their_header(server_factory: Any) -> None:
    live: LiveServer = server_factory(trusted(headerTimeout="30s"))
    pending = connect_from(live, PROXY)
    pending.sendall(b"PROXY TCP4 198.51.100.16")
    # An untrusted connection accepted after it gets the version line at once: by
    # then the server has taken the pending one too (accepts run in order).
    later = connect_from(live, STRANGER)
    assert later.recv(17) == b"SSH-2.0-sshspec\r\n"
    start = time.monotonic()
    assert live.stop() == 0
    assert time.monotonic() - start < 10  # not held up by the 30 s the header could take
    assert read_to_eof(pending) == b""
    assert not records_of(live, "SSH_PROXY_HEADER_INVALID")  # cut silently: never admitted
    check_log(live)


# --- Debian's haproxy in front ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Any]:
    """Start `haproxy -f cfg -db` in front of a server: one frontend per PROXY
    version, connecting to sshspec from HAPROXY_SOURCE; returns their ports."""
    if not have("haproxy"):
        pytest.skip("haproxy is not installed (make test installs it: .ci/system-packages)")
    processes: list[subprocess.Popen[bytes]] = []

    def start(ssh_port: int) -> dict[str, int]:
        ports = {"ready": free_port(), "send-proxy": free_port(), "send-proxy-v2": free_port()}
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text("\n".join([
            "global", "    maxconn 64",
            "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 30s",
            "    timeout server 30s",
            # Bound after the others: once it accepts, every frontend listens.
            "frontend ready", f"    bind 127.0.0.1:{ports['ready']}", "    tcp-request connection reject",
            *[line for option in ("send-proxy", "send-proxy-v2") for line in (
                f"frontend {option}", f"    bind 127.0.0.1:{ports[option]}", f"    default_backend {option}",
                f"backend {option}",
                f"    server sshspec 127.0.0.1:{ssh_port} {option} source {HAPROXY_SOURCE}")],
            ""]))
        process = subprocess.Popen(["haproxy", "-f", str(cfg), "-db"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
        processes.append(process)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", ports["ready"]), timeout=1).close()
                return ports
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    out = process.communicate()[0].decode(errors="replace")
                    raise AssertionError(f"haproxy did not start (status {process.returncode}):\n{out}") \
                        from None
                time.sleep(0.02)

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
def test_openssh_through_haproxy_is_logged_with_the_clients_address(
        server_factory: Any, haproxy: Any, option: str) -> None:
    live: LiveServer = server_factory(
        {"ssh": {"proxyProtocol": {"enabled": True, "trustedNetworks": [f"{HAPROXY_SOURCE}/32"]}}})
    port = haproxy(live.port)[option]
    args = [*live.ssh_args("-b", CLIENT), 'echo "$SSH_CONNECTION"']
    args[args.index("-p") + 1] = str(port)
    result = subprocess.run(args, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    client_ip, client_port, server_ip, server_port = result.stdout.decode().split()
    # What the client saw of its own connection to haproxy, end to end.
    assert (client_ip, server_ip, server_port) == (CLIENT, "127.0.0.1", str(port))
    remote = f"{CLIENT}:{client_port}"
    live.wait_for_code("SSH_DISCONNECTED")
    header, = records_of(live, "SSH_PROXY_HEADER")
    assert header["labels"]["remoteAddr"] == remote
    version = "v2" if option.endswith("v2") else "v1"
    assert header["labels"]["reason"].startswith(f"PROXY {version} header from {HAPROXY_SOURCE}:")
    records = connection_records(live, remote)
    assert {r["labels"]["remoteAddr"] for r in records} == {remote}
    assert "SSH_HANDSHAKE_SUCCESSFUL" in [r["code"] for r in records]
    check_log(live)


def test_haproxy_is_refused_when_its_network_is_not_trusted(server_factory: Any, haproxy: Any) -> None:
    """The same haproxy, but sshspec trusts only 127.0.0.3: the header is refused
    and the client's login fails, logged with haproxy's address."""
    live: LiveServer = server_factory(TRUSTED)
    port = haproxy(live.port)["send-proxy-v2"]
    args = [*live.ssh_args("-b", CLIENT), "true"]
    args[args.index("-p") + 1] = str(port)
    assert subprocess.run(args, capture_output=True, timeout=60).returncode != 0
    refused = live.wait_for_code("SSH_PROXY_HEADER_REFUSED")
    record, = [r for r in refused if r["code"] == "SSH_PROXY_HEADER_REFUSED"]
    assert record["labels"]["remoteAddr"].startswith(f"{HAPROXY_SOURCE}:")
    live.wait_for_code("SSH_DISCONNECTED")
    check_log(live)

