"""sshspec serve with real clients: the ContainerSSH conformance cases, sftp,
auth by every method, and the log each of them leaves."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncssh
import pytest

from conftest import SSHSPEC, LiveServer


def ssh(server: LiveServer, command: str, *options: str, input: bytes | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*server.ssh_args(*options), command], input=input, capture_output=True,
                          timeout=timeout)


def connect(server: LiveServer, **kwargs: object) -> asyncssh.misc._ACMWrapper:  # type: ignore[name-defined]
    options = {"username": server.username, "password": server.password, "known_hosts": None,
               "client_keys": None, **kwargs}
    return asyncssh.connect(server.host, server.port, **options)


def connection_codes(server: LiveServer) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for record in server.records():
        cid = record["labels"].get("connectionId")
        if cid:
            out.setdefault(cid, []).append(record["code"])
    return out


def test_exec_hello_world_with_openssh(server: LiveServer) -> None:
    done = ssh(server, 'echo "Hello world!"')
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"Hello world!\n"
    server.wait_for_code("SSH_DISCONNECTED")
    (codes,) = connection_codes(server).values()
    # ssh's EOF (its stdin is empty) races the program's exit: before it or not at all.
    assert codes.count("SSH_CHANNEL_EOF") <= 1
    codes = [c for c in codes if c != "SSH_CHANNEL_EOF"]
    # OpenSSH: "none" first, then asks whether the key may sign, then signs.
    assert codes == ["SSH_CONNECTED", "SSH_KEX_DONE", "SSH_AUTH_NONE", "SSH_AUTH_QUERY", "SSH_AUTH_PK_OK",
                     "SSH_AUTH_ATTEMPT", "SSH_AUTH_SUCCESSFUL", "SSH_HANDSHAKE_SUCCESSFUL",
                     "SSH_NEW_CHANNEL", "SSH_CHANNEL_REQUEST", "SSH_CHANNEL_REQUEST_SUCCESSFUL",
                     "SSH_EXIT", "SSH_CHANNEL_CLOSED", "SSH_DISCONNECTED"]


def test_exit_code_42(server: LiveServer) -> None:
    done = ssh(server, "exit 42")
    assert done.returncode == 42
    records = server.wait_for_code("SSH_EXIT")
    assert [r["labels"].get("exitCode") for r in records if r["code"] == "SSH_EXIT"] == [42]


def test_env_is_passed_to_the_program(server: LiveServer) -> None:
    done = ssh(server, 'echo "$FOO"', "-o", "SetEnv=FOO=bar")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"bar\n"


def test_dynamic_loader_env_is_refused(server: LiveServer) -> None:
    done = ssh(server, 'echo "[$LD_PRELOAD]"', "-o", "SetEnv=LD_PRELOAD=/tmp/evil.so")
    assert done.stdout == b"[]\n"
    records = server.wait_for_code("SSH_CHANNEL_REQUEST_FAILED")
    failed = [r for r in records if r["code"] == "SSH_CHANNEL_REQUEST_FAILED"]
    assert failed[0]["labels"]["requestType"] == "env"


def test_pty_size_and_window_change(server: LiveServer) -> None:
    async def main() -> tuple[bytes, int | None]:
        async with connect(server) as conn:
            proc = await conn.create_process(term_type="xterm", term_size=(80, 25), encoding=None)
            proc.stdin.write(b"echo START; tput cols; tput lines\n")
            out = await proc.stdout.readuntil(b"25\r\n")
            assert b"80\r\n25\r\n" in out
            proc.change_terminal_size(120, 25)
            proc.stdin.write(b"tput cols; tput lines\n")
            out2 = await proc.stdout.readuntil(b"25\r\n")
            proc.stdin.write(b"exit\n")
            await proc.wait_closed()
            return out2, proc.exit_status
    out, status = asyncio.run(main())
    assert b"120\r\n25\r\n" in out
    assert status == 0


def test_signal_usr1_reaches_the_program(server: LiveServer) -> None:
    async def main() -> tuple[bytes, int | None]:
        async with connect(server) as conn:
            proc = await conn.create_process(
                "trap 'echo got; exit 7' USR1; echo ready; while :; do sleep 0.05; done", encoding=None)
            await proc.stdout.readuntil(b"ready\n")
            proc.send_signal("USR1")
            rest = await proc.stdout.read()
            await proc.wait_closed()
            return rest, proc.exit_status
    out, status = asyncio.run(main())
    assert out == b"got\n" and status == 7


def test_killed_program_sends_exit_signal(server: LiveServer) -> None:
    async def main() -> asyncssh.SSHCompletedProcess:
        async with connect(server) as conn:
            return await conn.run("kill -TERM $$")
    result = asyncio.run(main())
    assert result.exit_signal is not None and result.exit_signal[0] == "TERM"
    records = server.wait_for_code("SSH_EXIT_SIGNAL")
    assert [r["labels"].get("signal") for r in records if r["code"] == "SSH_EXIT_SIGNAL"] == ["TERM"]


def test_sftp_with_openssh(server: LiveServer, tmp_path: Path) -> None:
    source = tmp_path / "upload.bin"
    source.write_bytes(bytes(range(256)) * 400)
    target = tmp_path / "remote.bin"
    back = tmp_path / "back.bin"
    batch = tmp_path / "batch"
    batch.write_text(f"put {source} {target}\nget {target} {back}\nls {tmp_path}\n")
    args = server.ssh_args()
    done = subprocess.run(["sftp", "-b", str(batch), "-P", str(server.port), *args[3:-1], args[-1]],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert back.read_bytes() == source.read_bytes()


def test_password_and_wrong_password(server: LiveServer) -> None:
    async def good() -> str:
        async with connect(server) as conn:
            return (await conn.run("whoami", check=True)).stdout  # type: ignore[return-value]
    assert asyncio.run(good()).strip()

    async def bad() -> None:
        async with connect(server, password="wrong", preferred_auth="password"):
            pass
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(bad())
    records = server.wait_for_code("SSH_AUTH_FAILED")
    failed = [r for r in records if r["code"] == "SSH_AUTH_FAILED"]
    assert failed[0]["labels"]["method"] == "password"


def test_keyboard_interactive(server: LiveServer) -> None:
    async def main() -> int | None:
        async with connect(server, preferred_auth="keyboard-interactive") as conn:
            return (await conn.run("true")).exit_status
    assert asyncio.run(main()) == 0
    records = server.wait_for_code("SSH_AUTH_SUCCESSFUL")
    ok = [r for r in records if r["code"] == "SSH_AUTH_SUCCESSFUL"]
    assert ok[0]["labels"]["method"] == "keyboard-interactive"


def _demo_run(server: LiveServer, command: str = "world") -> asyncssh.SSHCompletedProcess:
    async def main() -> asyncssh.SSHCompletedProcess:
        async with connect(server, username="demo", password="demo", preferred_auth="password") as conn:
            return await conn.run(command)
    return asyncio.run(main())


def test_handler_api_serves_an_in_process_app(server_factory) -> None:  # type: ignore[no-untyped-def]
    live = server_factory(handler="apps:App")
    result = _demo_run(live, "world")
    assert result.stdout == "hello world\n" and result.exit_status == 0


def test_backend_rejection(server_factory) -> None:  # type: ignore[no-untyped-def]
    live = server_factory(handler="apps:Rejecting")
    with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError)):
        _demo_run(live)
    codes = live.wait_for_code("SSH_DISCONNECTED")
    assert [r["code"] for r in codes][-3:] == ["SSH_AUTH_SUCCESSFUL", "SSH_BACKEND_REJECTED_HANDSHAKE",
                                               "SSH_DISCONNECTED"]


def test_backend_failing_to_open_a_session_rejects_the_channel(server_factory) -> None:  # type: ignore[no-untyped-def]
    live = server_factory(handler="apps:Broken")

    async def main() -> None:
        async with connect(live, username="demo", password="demo", preferred_auth="password") as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("true")
            with pytest.raises(asyncssh.ChannelOpenError):  # the connection still serves
                await conn.run("true")
    asyncio.run(main())
    codes = live.codes()
    assert codes.count("SSH_NEW_CHANNEL_REJECTED") == 2 and "SSH_BACKEND_ERROR" not in codes


# --- the default log mode: records batched (log.flushInterval, 100ms) ----------------------


def test_batched_log_has_every_record_of_concurrent_connections(server_factory) -> None:  # type: ignore[no-untyped-def]
    """The default log.flushInterval (which conftest sets to 0 for lockstep tests):
    records of 16 concurrent connections arrive without a stop, whole, and in an
    order `sshspec check --complete` accepts."""
    live = server_factory({"log": {"flushInterval": "100ms"}})

    async def main() -> list[int | None]:
        async def one(n: int) -> int | None:
            async with connect(live) as conn:
                return (await conn.run(f"exit {n}")).exit_status
        return list(await asyncio.gather(*(one(n) for n in range(16))))

    assert asyncio.run(main()) == list(range(16))
    records = live.wait_for(lambda rs: sum(r["code"] == "SSH_DISCONNECTED" for r in rs) == 16)
    assert sorted(r["labels"]["exitCode"] for r in records if r["code"] == "SSH_EXIT") == list(range(16))
    assert live.stop() == 0
    done = subprocess.run([*SSHSPEC, "check", "--complete", str(live.log)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_batched_log_is_written_when_the_server_stops(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Records wait for their batch (here an hour; `durable: false`, so what the
    client sees waits too), and a SIGTERM writes them all."""
    live = server_factory({"log": {"flushInterval": "1h", "durable": False}})

    async def main() -> int | None:
        async with connect(live) as conn:
            return (await conn.run("exit 3")).exit_status

    assert asyncio.run(main()) == 3
    assert live.records() == []  # not even SSH_AVAILABLE: the first batch is still due
    assert live.stop() == 0
    codes = [r["code"] for r in live.records()]
    assert codes[0] == "SSH_AVAILABLE" and codes[-1] == "SSH_STOPPED"
    assert {"SSH_CONNECTED", "SSH_EXIT", "SSH_DISCONNECTED"} <= set(codes)
    done = subprocess.run([*SSHSPEC, "check", "--complete", str(live.log)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _fingerprint(pubkey: Path) -> str:
    # As OpenSSH prints it: `ssh-keygen -l` -> "256 SHA256:... comment (ED25519)".
    done = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pubkey)], capture_output=True,
                          text=True, check=True)
    return done.stdout.split()[1]


def test_log_labels_name_the_key_and_the_command(server: LiveServer, tmp_path: Path) -> None:
    """The key's SHA256 fingerprint labels every record from the publickey request on
    (as sshd's "Accepted publickey ... SHA256:..."); the exec command labels its
    request's records and then every record of its channel; a subsystem its name."""
    done = ssh(server, "exit 3")
    assert done.returncode == 3, done.stderr
    args = server.ssh_args()
    done = subprocess.run(["sftp", "-b", "-", "-P", str(server.port), *args[3:-1], args[-1]],
                          input=b"pwd\n", capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    server.wait_for(lambda rs: sum(r["code"] == "SSH_DISCONNECTED" for r in rs) == 2)
    fingerprint = _fingerprint(server.key.with_suffix(".pub"))
    assert fingerprint.startswith("SHA256:") and not fingerprint.endswith("=")
    by_conn: dict[str, list[dict[str, object]]] = {}
    for record in server.records():
        by_conn.setdefault(str(record["labels"].get("connectionId")), []).append(record["labels"])
    exec_conn, sftp_conn = (labels for cid, labels in by_conn.items() if cid != "None")
    for labels in (exec_conn, sftp_conn):
        keyed = [lb for lb in labels if lb["event"] not in ("connected", "auth_begin", "none_auth")]
        assert {lb.get("keyFingerprint") for lb in keyed} == {fingerprint}, keyed
        assert all("keyFingerprint" not in lb for lb in labels[:3]), labels[:3]
    channel = [lb for lb in exec_conn if "channelId" in lb and lb["event"] != "session_open"]
    assert channel and {lb.get("command") for lb in channel} == {"exit 3"}, channel
    assert [lb["exitCode"] for lb in channel if "exitCode" in lb] == [3]
    subsystem = [lb for lb in sftp_conn if lb.get("requestType") == "subsystem"]
    assert subsystem and {lb.get("command") for lb in subsystem} == {"sftp"}
    long = "true #" + "x" * 2000  # labels every record of its channel: cut at 1024 characters
    assert ssh(server, long).returncode == 0
    records = server.wait_for(lambda rs: sum(r["code"] == "SSH_DISCONNECTED" for r in rs) == 3)
    assert {r["labels"].get("command") for r in records if r["code"] == "SSH_EXIT"} == {
        "exit 3", "sftp", f"{long[:1024]}... (2006 characters)"}


def test_auth_requests_after_login_rename_nobody(server: LiveServer, tmp_path: Path) -> None:
    """RFC 4252 5.1: USERAUTH_REQUESTs after the success are ignored; they must not
    change who the log (or ConnectionInfo) says is logged in, nor the key."""
    from test_faults import RawClient, ssh_string
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    blob = asyncssh.read_public_key(str(other) + ".pub").public_data
    client = RawClient.login(server.port)
    try:
        # A publickey query for "root" with another key: asyncssh ignores it after success.
        client.send(bytes([50]) + ssh_string("root") + ssh_string("ssh-connection") + ssh_string("publickey")
                    + b"\x00" + ssh_string("ssh-ed25519") + ssh_string(blob))
        chan = client.open_session()
        client.channel_request(chan, "exec", ssh_string("exit 5"))
        client.wait_replies(channel=1)
        assert client.channel_replies == [(chan.get_id(), True)]
        server.wait_for_code("SSH_EXIT")
    finally:
        client.close()
    records = server.wait_for_code("SSH_DISCONNECTED")
    users = {r["labels"].get("username") for r in records if r["labels"].get("connectionId")}
    assert users - {None} == {server.username}, users
    assert not any("keyFingerprint" in r["labels"] for r in records)  # a password login
