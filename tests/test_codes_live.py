"""Each ContainerSSH code that tests/test_server.py and tests/test_lifecycle.py do
not already prove, emitted by its real cause against a live `sshspec serve`.

Clients: OpenSSH `ssh` where it can produce the cause; paramiko or asyncssh at
the protocol level where it cannot (a method no client would try, a malformed
payload, two sessions on one connection). Failures inside the server (socket
reuse, listen close, reply send, exit-status send) come from the operating
system: tests/failsys.c, preloaded into the server, makes the call fail.

Every test asserts the code, its labels, and what the client saw.
Synchronisation is by client events or by polling the server's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import queue
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import paramiko
import pytest
from paramiko.common import (
    MSG_CHANNEL_FAILURE,
    cMSG_CHANNEL_REQUEST,
    cMSG_GLOBAL_REQUEST,
    cMSG_USERAUTH_REQUEST,
)
from paramiko.message import Message
from protocol_client import ProtocolClient, string

from conftest import SSHSPEC, LiveServer, start_server

TESTS = Path(__file__).resolve().parent
TIMEOUT = 10.0
APP = "codes_apps:App"  # in-process programs (no login shell to wait for); demo/demo or the test key


# --------------------------------------------------------------------------- helpers


def ssh(live: LiveServer, *args: str, log_level: str = "ERROR",
        timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """OpenSSH `ssh` with the test key; `args` are options, then the command."""
    base = live.ssh_args()
    base[base.index("LogLevel=ERROR")] = f"LogLevel={log_level}"
    *options, command = args
    return subprocess.run([*base[:-1], *options, base[-1], command], capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def connect(live: LiveServer, **kwargs: Any) -> Any:
    options = {"username": live.username, "password": live.password, "known_hosts": None,
               "client_keys": None, "preferred_auth": "password", **kwargs}
    return asyncssh.connect(live.host, live.port, **options)


def connect_app(live: LiveServer, **kwargs: Any) -> Any:
    return connect(live, username="demo", password="demo", **kwargs)


def of_connection(records: list[dict[str, Any]], code: str, nth: int = 0) -> list[dict[str, Any]]:
    """Every record of the connection whose `nth` record with `code` this is."""
    cid = [r for r in records if r["code"] == code][nth]["labels"]["connectionId"]
    return [r for r in records if r["labels"].get("connectionId") == cid]


def codes(records: list[dict[str, Any]]) -> list[str]:
    return [r["code"] for r in records]


def one(records: list[dict[str, Any]], code: str) -> dict[str, Any]:
    (record,) = [r for r in records if r["code"] == code]
    return record


def wait_disconnected(live: LiveServer, count: int = 1) -> list[dict[str, Any]]:
    return live.wait_for_code("SSH_DISCONNECTED", count)


def check_log(log: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SSHSPEC, "check", "--complete", *options, str(log)],
                          capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def paramiko_transport(live: LiveServer) -> Iterator[paramiko.Transport]:
    sock = socket.create_connection((live.host, live.port), timeout=TIMEOUT)
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=TIMEOUT)
        yield transport
    finally:
        transport.close()
        sock.close()


def send_raw(transport: paramiko.Transport, *fields: tuple[str, Any]) -> None:
    """One message built field by field, sent as it is (paramiko's internal sender)."""
    message = Message()
    for kind, value in fields:
        getattr(message, "add_" + kind)(value)
    transport._send_user_message(message)


# --------------------------------------------------------------------------- failsys.so


@pytest.fixture(scope="session")
def failsys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/failsys.c built as an LD_PRELOAD shim."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: cannot build the tests/failsys.c LD_PRELOAD shim")
    out = tmp_path_factory.mktemp("failsys") / "failsys.so"
    done = subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(TESTS / "failsys.c"), "-ldl"],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"gcc could not build tests/failsys.c:\n{done.stderr}"
    return out


def preload(shim: Path, **variables: str) -> dict[str, str]:
    return {"LD_PRELOAD": str(shim), **variables}


# --------------------------------------------------------------------------- SSH_AUTH_UNAVAILABLE


def test_auth_unavailable_for_methods_we_do_not_offer(server: LiveServer) -> None:
    """hostbased and gssapi-with-mic (no client tries a method the server does not
    list, so paramiko sends the raw USERAUTH_REQUEST); the same connection then
    logs in with a password."""
    with paramiko_transport(server) as t:
        with pytest.raises(paramiko.BadAuthenticationType) as offered:
            t.auth_none(server.username)
        assert set(offered.value.allowed_types) == {"publickey", "password", "keyboard-interactive"}
        local = f"127.0.0.1:{t.sock.getsockname()[1]}"
        for method, fields in [
            ("hostbased", [("string", "ssh-ed25519"), ("string", b"key"), ("string", "client.example"),
                           ("string", server.username), ("string", b"signature")]),
            ("gssapi-with-mic", [("int", 1), ("string", b"\x06\x09\x2a\x86\x48\x86\xf7\x12\x01\x02\x02")]),
        ]:
            answered = threading.Event()
            t.auth_handler.auth_method, t.auth_handler.auth_event = method, answered
            send_raw(t, ("byte", cMSG_USERAUTH_REQUEST), ("string", server.username),
                     ("string", "ssh-connection"), ("string", method), *fields)
            assert answered.wait(TIMEOUT)
            refused = t.get_exception()  # USERAUTH_FAILURE without the method in its list
            assert isinstance(refused, paramiko.BadAuthenticationType)
            assert method not in refused.allowed_types and "password" in refused.allowed_types
        t.auth_password(server.username, server.password)
        assert t.is_authenticated()
    records = of_connection(wait_disconnected(server), "SSH_AUTH_UNAVAILABLE")
    assert codes(records) == ["SSH_CONNECTED", "SSH_KEX_DONE", "SSH_AUTH_NONE", "SSH_AUTH_UNAVAILABLE",
                              "SSH_AUTH_UNAVAILABLE", "SSH_AUTH_ATTEMPT", "SSH_AUTH_SUCCESSFUL",
                              "SSH_HANDSHAKE_SUCCESSFUL", "SSH_DISCONNECTED"]
    unavailable = [r for r in records if r["code"] == "SSH_AUTH_UNAVAILABLE"]
    assert [r["labels"] for r in unavailable] == [
        {"connectionId": records[0]["labels"]["connectionId"], "remoteAddr": local,
         "username": server.username, "method": method, "event": "other_method"}
        for method in ("hostbased", "gssapi-with-mic")]
    assert all(r["level"] == "info" for r in unavailable)


def test_auth_unavailable_keyboard_interactive_when_no_user_has_a_password(server_factory: Any) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    live = server_factory({"auth": {"users": [{"username": "alice", "authorizedKeys": [key]}]}})

    async def main() -> None:
        async with connect(live, preferred_auth="keyboard-interactive"):
            pass
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(main())
    records = of_connection(wait_disconnected(live), "SSH_AUTH_UNAVAILABLE")
    assert codes(records) == ["SSH_CONNECTED", "SSH_KEX_DONE", "SSH_AUTH_NONE", "SSH_AUTH_ATTEMPT",
                              "SSH_AUTH_UNAVAILABLE",
                              "SSH_HANDSHAKE_ABANDONED", "SSH_DISCONNECTED"]  # it gave up: nothing failed
    labels = one(records, "SSH_AUTH_UNAVAILABLE")["labels"]
    assert labels["method"] == "keyboard-interactive" and labels["username"] == "alice"
    assert labels["event"] == "auth_unavailable"


def test_auth_unavailable_publickey_with_openssh(server_factory: Any) -> None:
    """The README's app checks passwords only: a key is "unavailable", not "bad"."""
    live = server_factory(handler="apps:App")
    done = ssh(live, "true")
    assert done.returncode == 255
    assert b"Permission denied (publickey,keyboard-interactive,password)" in done.stderr
    records = of_connection(wait_disconnected(live), "SSH_AUTH_UNAVAILABLE")
    # OpenSSH asks whether the key may sign first (the query), then gives up on it.
    assert codes(records) == ["SSH_CONNECTED", "SSH_KEX_DONE", "SSH_AUTH_NONE", "SSH_AUTH_QUERY",
                              "SSH_AUTH_UNAVAILABLE",
                              "SSH_HANDSHAKE_ABANDONED", "SSH_DISCONNECTED"]  # it gave up: nothing failed
    labels = one(records, "SSH_AUTH_UNAVAILABLE")["labels"]
    assert labels["method"] == "publickey" and labels["username"] == live.username


# --------------------------------------------------------------------------- SSH_HANDSHAKE_FAILED


def test_handshake_abandoned_client_leaves_during_key_exchange(server: LiveServer) -> None:
    """A client that leaves without trying (a probe) is logged at info, not warning."""
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"SSH-2.0-leaver\r\n")
        seen = b""
        while b"ssh-ed25519" not in seen:  # the server's version line, then its KEXINIT
            chunk = sock.recv(4096)
            assert chunk, seen
            seen += chunk
        local = f"127.0.0.1:{sock.getsockname()[1]}"
        sock.shutdown(socket.SHUT_WR)
    assert seen.startswith(b"SSH-2.0-sshspec\r\n")
    records = of_connection(wait_disconnected(server), "SSH_HANDSHAKE_ABANDONED")
    assert codes(records) == ["SSH_CONNECTED", "SSH_HANDSHAKE_ABANDONED", "SSH_DISCONNECTED"]
    failed = one(records, "SSH_HANDSHAKE_ABANDONED")
    assert failed["level"] == "info" and failed["labels"]["remoteAddr"] == local
    assert "username" not in failed["labels"] and failed["labels"]["reason"]


def name_list(*names: str) -> bytes:
    text = ",".join(names).encode()
    return len(text).to_bytes(4, "big") + text


def kexinit_packet(kex: str) -> bytes:
    """A cleartext SSH_MSG_KEXINIT offering only `kex` (RFC 4253 7.1)."""
    payload = (bytes([20]) + bytes(16) + name_list(kex) + name_list("ssh-ed25519")
               + name_list("aes128-ctr") * 2 + name_list("hmac-sha2-256") * 2 + name_list("none") * 2
               + name_list() * 2 + b"\0" + bytes(4))
    padding = -(5 + len(payload)) % 8
    padding += 8 if padding < 4 else 0
    return (1 + len(payload) + padding).to_bytes(4, "big") + bytes([padding]) + payload + bytes(padding)


def test_handshake_failed_no_common_key_exchange(server: LiveServer) -> None:
    """OpenSSH gives up first, right after its KEXINIT went out: the server still logs
    the mismatch, every time (the negotiation runs as the packet is read, before the
    client's EOF can be seen); a raw client that offers only
    diffie-hellman-group1-sha1 and waits gets DISCONNECT key exchange failed, with the
    reason."""
    done = ssh(server, "-o", "KexAlgorithms=diffie-hellman-group1-sha1", "true", log_level="INFO")
    assert done.returncode == 255
    assert b"no matching key exchange method found" in done.stderr
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"SSH-2.0-old\r\n" + kexinit_packet("diffie-hellman-group1-sha1"))
        seen = b""
        while chunk := sock.recv(4096):  # until the server closes
            seen += chunk
    mismatch = b"No matching key exchange algorithm found"
    at = seen.index(mismatch)
    assert seen[at - 9:at - 4] == b"\x01\x00\x00\x00\x03"  # DISCONNECT, KEY_EXCHANGE_FAILED
    records = wait_disconnected(server, 2)
    reasons = []
    for nth in (0, 1):
        connection = of_connection(records, "SSH_HANDSHAKE_FAILED", nth)
        assert codes(connection) == ["SSH_CONNECTED", "SSH_HANDSHAKE_FAILED", "SSH_DISCONNECTED"]
        reasons.append(one(connection, "SSH_HANDSHAKE_FAILED")["labels"]["reason"])
    assert reasons[0].startswith(mismatch.decode())
    assert reasons[1].startswith(mismatch.decode()) and "received diffie-hellman-group1-sha1" in reasons[1]


# --------------------------------------------------------------------------- channels


def test_new_channel_rejected_at_max_sessions(server_factory: Any, tmp_path: Path) -> None:
    # The log is replayed here with the limit the server ran with, not in
    # .test-logs (which `make test` replays with the specs' defaults).
    live = server_factory({"limits": {"maxSessions": 1}}, handler=APP, log_dir=tmp_path)

    async def main() -> str:
        async with connect_app(live) as conn:
            first = await conn.create_process("cat")
            with pytest.raises(asyncssh.ChannelOpenError) as refused:
                await conn.create_process("echo second")
            assert refused.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            first.stdin.write_eof()
            await first.wait_closed()
            assert first.exit_status == 0
            await asyncio.to_thread(live.wait_for_code, "SSH_CHANNEL_CLOSED")  # the slot is free
            return str((await conn.run("echo third", check=True)).stdout)
    assert asyncio.run(main()) == "third\n"
    records = wait_disconnected(live)
    assert codes(records).count("SSH_NEW_CHANNEL") == 2
    rejected = one(records, "SSH_NEW_CHANNEL_REJECTED")
    assert rejected["level"] == "info"
    assert rejected["labels"]["channelId"] == 1 and rejected["labels"]["requestType"] == "session"
    trail = codes(records)
    assert trail.index("SSH_NEW_CHANNEL") < trail.index("SSH_NEW_CHANNEL_REJECTED") \
        < trail.index("SSH_CHANNEL_CLOSED") < len(trail) - 1 - trail[::-1].index("SSH_NEW_CHANNEL")
    assert live.stop() == 0
    done = check_log(live.log, "--limit", "maxSessions=1")
    assert done.returncode == 0, done.stdout + done.stderr


def test_unsupported_channel_type_direct_streamlocal(server_factory: Any) -> None:
    """A channel type the server does not serve (ssh -L to a unix socket:
    direct-streamlocal@openssh.com) is refused as unknown; the connection goes on.
    (direct-tcpip is served: tests/test_forwarding.py.)"""
    server = server_factory(handler=APP)

    async def main() -> str:  # the connection goes on serving after the refusal
        async with connect_app(server) as conn:
            with pytest.raises(asyncssh.ChannelOpenError) as refused:
                await conn.open_unix_connection("/tmp/nowhere.sock")
            assert refused.value.code == asyncssh.OPEN_UNKNOWN_CHANNEL_TYPE
            return str((await conn.run("echo still serving", check=True)).stdout)
    assert asyncio.run(main()) == "still serving\n"
    records = wait_disconnected(server, 1)
    connection = of_connection(records, "SSH_UNSUPPORTED_CHANNEL_TYPE", 0)
    unsupported = one(connection, "SSH_UNSUPPORTED_CHANNEL_TYPE")
    assert unsupported["level"] == "info"
    assert unsupported["labels"]["requestType"] == "direct-streamlocal@openssh.com"
    assert "channelId" not in unsupported["labels"]
    assert codes(connection)[codes(connection).index("SSH_UNSUPPORTED_CHANNEL_TYPE") + 1] == "SSH_NEW_CHANNEL"
    assert codes(connection)[-3:] == ["SSH_EXIT", "SSH_CHANNEL_CLOSED", "SSH_DISCONNECTED"]


def test_remote_forwarding_denied_is_logged_at_info(server_factory: Any) -> None:
    """ssh -R where forwarding.tcp allows only local forwarding: the client is told
    ("remote port forwarding failed"), the denial is logged at info like a denied -L,
    and the connection goes on (tcpip-forward is served: tests/test_forwarding.py)."""
    server = server_factory({"forwarding": {"tcp": "local"}}, handler=APP)
    done = ssh(server, "-R", "0:127.0.0.1:9", "echo still here", log_level="INFO")
    assert done.returncode == 0 and done.stdout == b"still here\n"
    assert b"remote port forwarding failed" in done.stderr

    async def main() -> str:
        async with connect_app(server) as conn:
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)
            return str((await conn.run("echo still serving", check=True)).stdout)
    assert asyncio.run(main()) == "still serving\n"
    records = wait_disconnected(server, 2)
    for nth in (0, 1):
        connection = of_connection(records, "SSH_REMOTE_FORWARD_DENIED", nth)
        denied = one(connection, "SSH_REMOTE_FORWARD_DENIED")
        assert denied["level"] == "info" and denied["labels"]["requestType"] == "tcpip-forward"
        assert "forwarding.tcp" in denied["labels"]["reason"]
        assert "channelId" not in denied["labels"]
        assert "SSH_EXIT" in codes(connection) and codes(connection)[-1] == "SSH_DISCONNECTED"


def test_decode_failed_keeps_the_channel_and_the_connection(server_factory: Any) -> None:
    """A truncated env payload and a non-ASCII global request name: each gets a
    failure reply; then the same channel runs an exec to its exit status."""
    server = server_factory(handler=APP)
    failures: queue.Queue[int] = queue.Queue()

    def failure(chan: paramiko.Channel, m: Message) -> None:
        # paramiko's own handler closes a channel whose request failed; record instead.
        failures.put(chan.get_id())
        chan.event.set()  # a blocking request on it fails rather than hangs

    with paramiko_transport(server) as t:
        t._channel_handler_table = {**t._channel_handler_table, MSG_CHANNEL_FAILURE: failure}
        t.auth_password("demo", "demo")
        chan = t.open_session()
        chan.settimeout(TIMEOUT)
        request = [("byte", cMSG_CHANNEL_REQUEST), ("int", chan.remote_chanid)]
        send_raw(t, *request, ("string", "env"), ("boolean", True), ("string", "FOO"))  # no value
        assert failures.get(timeout=TIMEOUT) == chan.get_id()
        send_raw(t, *request, ("string", "frobnicate@example.com"), ("boolean", True))
        assert failures.get(timeout=TIMEOUT) == chan.get_id()
        answered = t.completion_event = threading.Event()
        t.global_response = "no answer yet"
        send_raw(t, ("byte", cMSG_GLOBAL_REQUEST), ("string", b"\xff\xfe"), ("boolean", True))
        assert answered.wait(TIMEOUT) and t.global_response is None  # REQUEST_FAILURE
        chan.exec_command("echo still usable")
        output = b""
        while chunk := chan.recv(1024):
            output += chunk
        assert chan.status_event.wait(TIMEOUT) and chan.exit_status == 0
        assert output == b"still usable\n" and failures.empty()
    records = wait_disconnected(server)
    requests = [(r["code"], r["labels"].get("requestType")) for r in records
                if "channelId" in r["labels"] or r["code"] == "SSH_DECODE_FAILED"]
    assert requests == [
        ("SSH_NEW_CHANNEL", "session"),
        ("SSH_CHANNEL_REQUEST", "env"), ("SSH_DECODE_FAILED", "env"), ("SSH_CHANNEL_REQUEST_FAILED", "env"),
        ("SSH_CHANNEL_REQUEST", "frobnicate@example.com"),
        ("SSH_NOT_IMPLEMENTED", "frobnicate@example.com"),
        ("SSH_CHANNEL_REQUEST_FAILED", "frobnicate@example.com"),
        ("SSH_DECODE_FAILED", r"b'\xff\xfe'"),
        ("SSH_CHANNEL_REQUEST", "exec"), ("SSH_CHANNEL_REQUEST_SUCCESSFUL", "exec"),
        ("SSH_EXIT", None), ("SSH_CHANNEL_CLOSED", None)]
    channel_decode, global_decode = [r for r in records if r["code"] == "SSH_DECODE_FAILED"]
    assert channel_decode["labels"]["channelId"] == 0 and channel_decode["level"] == "debug"
    assert channel_decode["labels"]["reason"] == "truncated value length"
    assert "channelId" not in global_decode["labels"]
    assert global_decode["labels"]["reason"] == "name is not ASCII"


# --------------------------------------------------------------------------- failures inside the server


def test_socket_reuse_failed_and_the_server_still_serves(server_factory: Any, failsys: Path) -> None:
    live = server_factory(handler=APP, env=preload(failsys, FAILSYS_REUSEADDR=str(errno.EACCES)))
    assert ssh(live, "echo served").stdout == b"served\n"
    records = wait_disconnected(live)
    assert codes(records)[:2] == ["SSH_SOCKET_REUSE_FAILED", "SSH_AVAILABLE"]
    failed = records[0]
    assert failed["level"] == "warning"
    assert failed["labels"] == {"reason": "SO_REUSEADDR: [Errno 13] Permission denied",
                                "event": "reuse_failed"}


def test_socket_reuse_failed_workers_still_share_the_port(tmp_path: Path, failsys: Path) -> None:
    """SO_REUSEADDR failing must not cost SO_REUSEPORT, which --workers needs to bind."""
    live = start_server(tmp_path, "reuse-workers", handler=APP, extra_args=["--workers", "2"],
                        log_dir=tmp_path, env=preload(failsys, FAILSYS_REUSEADDR=str(errno.EACCES)))
    try:
        assert ssh(live, "echo served").stdout == b"served\n"
        live.wait_for(lambda rs: codes(rs).count("SSH_AVAILABLE") == 2)
    finally:
        assert live.stop() == 0
    assert codes(live.records()).count("SSH_SOCKET_REUSE_FAILED") == 2
    done = check_log(live.log, "--workers", "2")
    assert done.returncode == 0, done.stdout + done.stderr


def test_listen_close_failed_at_shutdown(server_factory: Any, failsys: Path) -> None:
    """close() of the listen socket reports EIO (the descriptor is gone, as Linux
    does): the failure is logged, nothing listens any more, the open session is
    still served and delivers its exit status, and the server exits 0."""
    live = server_factory(handler=APP, env=preload(failsys, FAILSYS_LISTEN_CLOSE=str(errno.EIO)))

    async def main() -> asyncssh.SSHClientProcess[bytes]:
        async with connect_app(live) as conn:
            proc = await conn.create_process("cat", encoding=None)  # ignores SIGTERM
            live.process.terminate()
            await asyncio.to_thread(live.wait_for_code, "SSH_LISTEN_CLOSE_FAILED")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((live.host, live.port), timeout=TIMEOUT)
            proc.stdin.write(b"still draining\n")  # the open session is still served
            assert await proc.stdout.readuntil(b"\n") == b"still draining\n"
            proc.stdin.write_eof()
            await proc.wait_closed()
            return proc
    proc = asyncio.run(main())
    assert proc.exit_status == 0
    assert live.process.wait(20) == 0
    records = live.records()
    assert codes(records)[-1] == "SSH_STOPPED"
    tail = [c for c in codes(records) if c in ("SSH_SHUTTING_DOWN", "SSH_LISTEN_CLOSE_FAILED", "SSH_STOPPED")]
    assert tail == ["SSH_SHUTTING_DOWN", "SSH_LISTEN_CLOSE_FAILED", "SSH_STOPPED"]
    failed = one(records, "SSH_LISTEN_CLOSE_FAILED")
    assert failed["level"] == "error" and failed["labels"] == {"reason": "[Errno 5] Input/output error",
                                                                       "event": "close_failed"}


@pytest.fixture
def send_flag(tmp_path: Path) -> Iterator[Path]:
    flag = tmp_path / "send-fails"
    yield flag
    flag.unlink(missing_ok=True)


def test_reply_send_failed_for_a_channel_request(server_factory: Any, failsys: Path,
                                                 send_flag: Path) -> None:
    """OpenSSH sends env (no reply wanted; the handler arms the failure), then
    exec: its CHANNEL_SUCCESS is the send that fails."""
    live = server_factory(handler=APP,
                          env=preload(failsys, FAILSYS_SEND_FLAG=str(send_flag)))
    done = ssh(live, "-o", "SetEnv=FAILSYS_ARM=1", "hello")
    assert done.returncode == 255 and done.stdout == b""  # the connection ended unanswered
    records = of_connection(wait_disconnected(live), "SSH_REPLY_SEND_FAILED")
    failed = one(records, "SSH_REPLY_SEND_FAILED")
    assert failed["level"] == "debug"
    assert {k: failed["labels"][k] for k in ("channelId", "requestType", "reason")} == {
        "channelId": 0, "requestType": "exec", "reason": "send failed"}
    trail = codes(records)
    start = trail.index("SSH_REPLY_SEND_FAILED")
    assert trail[start - 2:start] == ["SSH_CHANNEL_REQUEST", "SSH_CHANNEL_REQUEST_SUCCESSFUL"]
    assert trail[-2:] == ["SSH_CHANNEL_CLOSED", "SSH_DISCONNECTED"]
    send_flag.unlink()
    assert ssh(live, "hello").stdout == b"ran hello\n"  # other connections are served


def test_reply_send_failed_for_a_global_request(server_factory: Any, failsys: Path,
                                                send_flag: Path) -> None:
    # (remote forwarding off: the request is refused at once, its failure's send fails)
    live = server_factory({"forwarding": {"tcp": "local"}}, handler=APP,
                          env=preload(failsys, FAILSYS_SEND_FLAG=str(send_flag)))
    with paramiko_transport(live) as t:
        t.auth_password("demo", "demo")
        chan = t.open_session()  # kept: paramiko closes a channel it no longer references
        chan.set_environment_variable("FAILSYS_ARM", "1")  # no reply wanted
        with pytest.raises(paramiko.SSHException):
            t.request_port_forward("127.0.0.1", 0)
        assert not t.is_active()  # no REQUEST_FAILURE came: the connection ended
    records = of_connection(wait_disconnected(live), "SSH_REPLY_SEND_FAILED")
    trail = codes(records)
    assert trail[trail.index("SSH_REMOTE_FORWARD_DENIED"):] == [
        "SSH_REMOTE_FORWARD_DENIED", "SSH_REPLY_SEND_FAILED", "SSH_CHANNEL_CLOSED",
        "SSH_DISCONNECTED"]
    failed = one(records, "SSH_REPLY_SEND_FAILED")
    assert "channelId" not in failed["labels"] and failed["labels"]["reason"] == "send failed"


def log_in_and_open(c: ProtocolClient, username: str, password: str) -> int:
    """Password login and one session channel; returns the channel."""
    c.service_request()
    c.auth_password(username, password)
    replies = [c.next_auth_reply(TIMEOUT), c.next_auth_reply(TIMEOUT)]
    assert replies == ["SERVICE_ACCEPT", "USERAUTH_SUCCESS"]
    ch = c.open_channel("session")
    assert c.open_reply(ch, TIMEOUT) == "OPEN_CONFIRMATION"
    return ch


def test_reply_send_failed_after_the_exit_status(server: LiveServer) -> None:
    """The program exited: the server sent EOF, exit-status and CLOSE. A request the
    client sends before it answers that CLOSE is refused (session: exited), and its
    failure reply cannot go out on a closing channel: SSH_REPLY_SEND_FAILED, and
    nothing on the wire, where a reply after CLOSE would break the protocol."""
    c = ProtocolClient.connect(server.port, answer_close=False)
    try:
        ch = log_in_and_open(c, server.username, server.password)
        c.request(ch, "exec", string("exit 3"))
        assert c.next_channel_reply(ch, TIMEOUT) == "CHANNEL_SUCCESS"
        assert c.wait_until(lambda: c.channels[ch].close_received, TIMEOUT)
        c.request(ch, "env", string("LANG") + string("C"))
        server.wait_for_code("SSH_REPLY_SEND_FAILED")
        c.close(ch)
        # The server answers in order: once this global request has its reply, a
        # reply to the env would have come before it.
        c.global_request("keepalive@openssh.com", True)
        assert c.next_global_reply(TIMEOUT) == "REQUEST_FAILURE"
        assert not c.channels[ch].replies, c.transcript()  # the refused env got no reply
    finally:
        c.close_all()
    records = [r for r in wait_disconnected(server) if r["labels"].get("channelId") == 0
               and r["code"] != "SSH_NEW_CHANNEL"]
    assert [(r["code"], r["labels"]["event"]) for r in records][-5:] == [
        ("SSH_EXIT", "program_exited"), ("SSH_CHANNEL_REQUEST", "env"), ("SSH_CHANNEL_REQUEST_FAILED", "env"),
        ("SSH_REPLY_SEND_FAILED", "reply_send_failed"), ("SSH_CHANNEL_CLOSED", "close")]


def test_reply_send_failed_before_any_program(server_factory: Any) -> None:
    """A shutdown closes a session that has no program (the server sends CLOSE); an
    env the client sends before it answers that CLOSE is still decided in `setup`,
    and its reply cannot go out on the closing channel: SSH_REPLY_SEND_FAILED."""
    live = server_factory()
    c = ProtocolClient.connect(live.port, answer_close=False)
    try:
        ch = log_in_and_open(c, live.username, live.password)
        live.process.send_signal(signal.SIGTERM)
        assert c.wait_until(lambda: c.channels[ch].close_received, TIMEOUT)
        c.request(ch, "env", string("LANG") + string("C"))
        live.wait_for_code("SSH_REPLY_SEND_FAILED")
        c.close(ch)
        assert live.process.wait(TIMEOUT) == 0
        assert not c.channels[ch].replies, c.transcript()
    finally:
        c.close_all()
    records = [r for r in live.records() if r["labels"].get("channelId") == 0
               and r["code"] != "SSH_NEW_CHANNEL"]
    assert [(r["code"], r["labels"]["event"]) for r in records] == [
        ("SSH_CHANNEL_REQUEST", "env"), ("SSH_CHANNEL_REQUEST_SUCCESSFUL", "request_ok"),
        ("SSH_REPLY_SEND_FAILED", "reply_send_failed"), ("SSH_CHANNEL_CLOSED", "close")]


def test_close_while_the_program_starts(server_factory: Any) -> None:
    """The client closes the channel while its program is starting (a backend whose
    start is slow: `apps:SlowStart`): session starting --close. The start gets its
    failure outcome, no reply follows the close (the one owed is logged as not sent),
    the channel closes."""
    live = server_factory(handler="apps:SlowStart")
    c = ProtocolClient.connect(live.port)
    try:
        ch = log_in_and_open(c, "demo", "demo")
        c.request(ch, "exec", string("anything"))
        live.wait_for_code("SSH_CHANNEL_REQUEST")  # the program is starting
        c.close(ch)
        assert c.wait_closed(ch, TIMEOUT)
        live.wait_for_code("SSH_CHANNEL_CLOSED")
        c.global_request("keepalive@openssh.com", True)  # answered in order: after any exec reply
        assert c.next_global_reply(TIMEOUT) == "REQUEST_FAILURE"
        assert not c.channels[ch].replies, c.transcript()
    finally:
        c.close_all()
    records = [r for r in wait_disconnected(live) if r["labels"].get("channelId") == 0
               and r["code"] != "SSH_NEW_CHANNEL"]
    assert [(r["code"], r["labels"]["event"]) for r in records] == [
        ("SSH_CHANNEL_REQUEST", "exec"), ("SSH_CHANNEL_REQUEST_FAILED", "close"),
        ("SSH_CHANNEL_CLOSED", "close"),
        # the exec wanted a reply: owed, and it cannot go out on a closed channel
        ("SSH_REPLY_SEND_FAILED", "reply_send_failed")]


def test_exit_code_failed(server_factory: Any, failsys: Path, send_flag: Path) -> None:
    """The program writes "bye", arms the failure and returns 3: its output
    reached the client, its exit status could not."""
    live = server_factory(handler=APP,
                          env=preload(failsys, FAILSYS_SEND_FLAG=str(send_flag)))
    done = ssh(live, "arm-exit")
    assert done.stdout == b"bye\n" and done.returncode == 255  # 255: no exit status arrived
    records = of_connection(wait_disconnected(live), "SSH_EXIT_CODE_FAILED")
    trail = codes(records)
    assert trail[trail.index("SSH_EXIT"):] == ["SSH_EXIT", "SSH_EXIT_CODE_FAILED", "SSH_CHANNEL_CLOSED",
                                               "SSH_DISCONNECTED"]
    assert one(records, "SSH_EXIT")["labels"]["exitCode"] == 3
    failed = one(records, "SSH_EXIT_CODE_FAILED")
    assert failed["level"] == "debug" and failed["labels"]["channelId"] == 0
    assert failed["labels"]["reason"]
    send_flag.unlink()
    again = ssh(live, "hello")
    assert again.stdout == b"ran hello\n" and again.returncode == 0


def _rsa_login(live: LiveServer, key: asyncssh.SSHKey, *, sha1: bool) -> bool:
    """asyncssh as the client (paramiko will not sign with ssh-rsa once the server's
    server-sig-algs leave it out, which is also the point)."""
    async def login() -> bool:
        try:
            async with asyncssh.connect(live.host, live.port, username=live.username, client_keys=[key],
                                        known_hosts=None, config=None, preferred_auth="publickey",
                                        signature_algs=["ssh-rsa"] if sha1 else ["rsa-sha2-256"]):
                return True
        except asyncssh.PermissionDenied:
            return False
    return asyncio.run(login())


def test_sha1_rsa_signatures_are_refused_unless_allowed(server_factory: Any) -> None:
    """As OpenSSH since 8.8: a user key signing with SHA-1 (`ssh-rsa`) is refused, logged
    as unavailable with the reason; rsa-sha2-256 with the same key logs in; the config
    can allow SHA-1 for old clients."""
    key = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    line = key.export_public_key().decode().strip()
    users = {"auth": {"users": [{"username": "alice", "authorizedKeys": [line]}]}}
    live = server_factory(users)
    assert not _rsa_login(live, key, sha1=True)
    records = of_connection(wait_disconnected(live), "SSH_AUTH_UNAVAILABLE")
    labels = one(records, "SSH_AUTH_UNAVAILABLE")["labels"]
    assert labels["method"] == "publickey" and labels["reason"] == "ssh-rsa signatures (SHA-1) are refused"
    assert _rsa_login(live, key, sha1=False)
    allowing = server_factory({**users, "auth": {**users["auth"], "allowSha1Rsa": True}})
    assert _rsa_login(allowing, key, sha1=True)
