"""Server lifecycle: start-up failures, config errors, graceful shutdown, workers, defaults."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import pytest

from conftest import SSHSPEC, TEST_LOGS, LiveServer, start_server
from sshspec.adapters.config import load_config
from sshspec.adapters.logs import Logger
from sshspec.adapters.server import Server


def run_sshspec(*args: str, timeout: float = 30, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SSHSPEC, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def test_unknown_config_key_stops_startup_with_status_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("ssh:\n  listen: 127.0.0.1:0\n  lisen: 1\n")
    done = run_sshspec("serve", "--config", str(config))
    assert done.returncode == 2
    assert f"{config}: ssh.lisen: unknown key" in done.stderr
    assert "listening" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("yaml, key", [
    ("limits:\n  maxAuthTries: 0\n", "limits.maxAuthTries"),
    ("limits:\n  loginTimeout: soon\n", "limits.loginTimeout"),
    ("log:\n  level: loud\n", "log.level"),
    ("ssh:\n  listen: 127.0.0.1:99999\n", "ssh.listen"),
    ("backend:\n  shell: sh\n", "backend.shell"),
    ("limits:\n  maxAuthTries: 2\n  maxAuthTries: 3\n", "limits.maxAuthTries: duplicate key"),
])
def test_wrong_values_name_the_key(tmp_path: Path, yaml: str, key: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml)
    done = run_sshspec("serve", "--config", str(config))
    assert done.returncode == 2 and f"{config}: {key}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_port_in_use_is_start_failed_with_status_1(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    TEST_LOGS.mkdir(exist_ok=True)  # `make test` checks this log against the specs
    log = TEST_LOGS / f"port-in-use-{os.getpid()}-{time.monotonic_ns()}.jsonl"
    config = tmp_path / "c.yaml"
    config.write_text(f"stateDir: {tmp_path}/state\nssh:\n  listen: 127.0.0.1:{port}\n"
                      f"log:\n  file: {log}\nauth:\n  users: []\n")
    done = run_sshspec("serve", "--config", str(config))
    busy.close()
    assert done.returncode == 1, done.stderr
    assert "Address already in use" in done.stderr
    assert '"code":"SSH_START_FAILED"' in log.read_text()


def test_shutdown_while_starting_stops_without_listening(tmp_path: Path) -> None:
    """SIGTERM can arrive while asyncio sets the listener up (start() is awaiting):
    the server goes straight to stopped (SSH_STOPPED), and the listener it was
    making is closed rather than left accepting."""
    import msgspec

    from sshspec.adapters.config import Listen
    config = load_config(None)
    config = msgspec.structs.replace(config, state_dir=str(tmp_path), ssh=msgspec.structs.replace(
        config.ssh, listen=Listen("127.0.0.1", 0)))
    TEST_LOGS.mkdir(exist_ok=True)
    log = TEST_LOGS / f"shutdown-while-starting-{os.getpid()}-{time.monotonic_ns()}.jsonl"

    async def main() -> tuple[str, int]:
        server = Server(config, logger=Logger(path=str(log)))
        starting = asyncio.create_task(server.start())
        while server.sock is None:  # start() runs up to its first await: the socket is bound
            await asyncio.sleep(0)
        port = server.sock.getsockname()[1]
        await server.shutdown()
        await starting
        return server.core.state, port

    state, port = asyncio.run(main())
    assert state == "stopped"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    codes = [line.split('"code":"')[1].split('"')[0] for line in log.read_text().splitlines()]
    assert codes == ["SSH_STOPPED"]


def test_already_running_is_refused_by_the_api(tmp_path: Path) -> None:
    config = load_config(None)
    import msgspec

    from sshspec.adapters.config import Listen
    config = msgspec.structs.replace(config, state_dir=str(tmp_path), ssh=msgspec.structs.replace(
        config.ssh, listen=Listen("127.0.0.1", 0)))
    log = tmp_path / "log.jsonl"

    async def main() -> None:
        server = Server(config, logger=Logger(path=str(log)))
        await server.start()
        with pytest.raises(RuntimeError, match="already running"):
            await server.start()
        await server.shutdown()
    asyncio.run(main())
    codes = [line.split('"code":"')[1].split('"')[0] for line in log.read_text().splitlines()]
    assert codes == ["SSH_AVAILABLE", "SSH_ALREADY_RUNNING", "SSH_SHUTTING_DOWN", "SSH_STOPPED"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_delivers_exit_status(server: LiveServer, sig: int) -> None:
    async def main() -> asyncssh.SSHClientProcess[bytes]:
        async with asyncssh.connect(server.host, server.port, username=server.username,
                                    password=server.password, known_hosts=None, client_keys=None) as conn:
            proc = await conn.create_process("echo started; sleep 30", encoding=None)
            await proc.stdout.readuntil(b"started\n")
            server.process.send_signal(sig)
            await proc.wait_closed()
            return proc
    proc = asyncio.run(main())
    assert proc.exit_signal is not None and proc.exit_signal[0] == "TERM"
    assert server.process.wait(20) == 0
    codes = server.codes()
    assert codes[-1] == "SSH_STOPPED"
    assert codes.count("SSH_CONNECTED") == codes.count("SSH_DISCONNECTED") == 1
    assert "SSH_SHUTTING_DOWN" in codes and "SSH_EXIT_SIGNAL" in codes


def test_shutdown_deadline_closes_what_is_left(server_factory) -> None:  # type: ignore[no-untyped-def]
    live = server_factory({"limits": {"shutdownTimeout": "300ms"}})

    async def main() -> None:
        async with asyncssh.connect(live.host, live.port, username=live.username,
                                    password=live.password, known_hosts=None, client_keys=None) as conn:
            # A program that ignores SIGTERM outlives the deadline.
            proc = await conn.create_process("trap '' TERM; echo started; sleep 30", encoding=None)
            await proc.stdout.readuntil(b"started\n")
            live.process.send_signal(signal.SIGTERM)
            await conn.wait_closed()
    asyncio.run(main())
    assert live.process.wait(20) == 0
    codes = live.codes()
    assert codes[-4:] == ["SSH_SHUTDOWN_DEADLINE", "SSH_CHANNEL_CLOSED", "SSH_DISCONNECTED", "SSH_STOPPED"]
    assert codes.count("SSH_DISCONNECTED") == 1


def test_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    # Its log holds two server lifetimes: kept out of .test-logs (checked as
    # one-server logs by `make test`) and checked here with --workers 2.
    live = start_server(tmp_path, "workers", extra_args=["--workers", "2"], log_dir=tmp_path)
    try:
        workers = subprocess.run(["pgrep", "-P", str(live.process.pid)], capture_output=True, text=True)
        assert len(workers.stdout.split()) == 2
        for _ in range(4):
            done = subprocess.run([*live.ssh_args(), "echo ok"], capture_output=True, timeout=30)
            assert done.stdout == b"ok\n"
    finally:
        assert live.stop() == 0
    codes = live.codes()
    assert codes.count("SSH_AVAILABLE") == 2 and codes.count("SSH_STOPPED") == 2
    done = run_sshspec("check", "--complete", "--workers", "2", str(live.log))
    assert done.returncode == 0, done.stdout + done.stderr


def test_embedded_defaults_offer_a_one_time_password(tmp_path: Path) -> None:
    # `make run`: no config at all. HOME points into tmp so the host key and
    # ~/.ssh/authorized_keys lookups stay inside the test.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    # The defaults listen on 127.0.0.1:2222, one port for the whole machine: suites of
    # several checkouts running at once take turns here rather than failing each other.
    with open("/tmp/sshspec-test-port-2222.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _serve_on_defaults(env, tmp_path)


def _serve_on_defaults(env: dict[str, str], tmp_path: Path) -> None:
    process = subprocess.Popen([*SSHSPEC, "serve"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        lines = []
        for line in process.stderr:
            lines.append(line)
            if line.startswith("sshspec: listening on"):
                break
        text = "".join(lines)
        assert "listening on 127.0.0.1:2222" in text, text
        password = text.split("one-time password ")[1].split()[0]
        user = text.split("log in as '")[1].split("'")[0]
        assert (tmp_path / "state" / "sshspec" / "ssh_host_ed25519_key").exists()

        async def main() -> str:
            async with asyncssh.connect("127.0.0.1", 2222, username=user, password=password,
                                        known_hosts=None, client_keys=None) as conn:
                return str((await conn.run("echo hi", check=True)).stdout)
        assert asyncio.run(main()) == "hi\n"

        async def wrong() -> None:
            async with asyncssh.connect("127.0.0.1", 2222, username=user, password="guess",
                                        known_hosts=None, client_keys=None, preferred_auth="password"):
                pass
        with pytest.raises(asyncssh.PermissionDenied):
            asyncio.run(wrong())
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    assert sys.platform.startswith("linux")


def _mask(status: str, field: str) -> int:
    line = next(x for x in status.splitlines() if x.startswith(field + ":"))
    return int(line.split()[1], 16)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_programs_get_default_signals_when_the_server_inherited_them_ignored(tmp_path: Path) -> None:
    """`nohup sshspec serve &` from a script: the server inherits SIGHUP, SIGINT and
    SIGQUIT ignored. It still survives SIGHUP (nohup's point), yet its programs, on
    pipes and on a pty, start with the three at their defaults, as under sshd."""
    nohup = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)
    live = start_server(tmp_path, "nohup-signals", ignore_signals=nohup)
    try:
        server_status = Path(f"/proc/{live.process.pid}/status").read_text()
        bits = sum(1 << (sig - 1) for sig in nohup)
        assert _mask(server_status, "SigIgn") & bits == 0  # adopted: caught, doing nothing
        assert _mask(server_status, "SigCgt") & bits == bits
        live.process.send_signal(signal.SIGHUP)
        for opts in ((), ("-tt",)):
            done = subprocess.run([*live.ssh_args(*opts), "cat /proc/$$/status"], capture_output=True,
                                  text=True, timeout=30, stdin=subprocess.DEVNULL)
            assert done.returncode == 0, done.stderr
            ignored = _mask(done.stdout, "SigIgn")
            assert ignored & bits == 0, f"{opts}: SigIgn {ignored:#x}"
        assert live.process.poll() is None  # SIGHUP did not end it
    finally:
        assert live.stop() == 0
