"""Shared fixtures: a real `sshspec serve` subprocess on 127.0.0.1 with a known
user, a key pair and a JSON log the tests read back.

Every live server's log is kept under `.test-logs/` (one file per server), so
`make test` can run `sshspec check --complete` and `sshspec coverage` over all
of them afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_LOGS = ROOT / ".test-logs"
SSHSPEC = [sys.executable, "-m", "sshspec.adapters.cli"]
PASSWORD = "correct horse"
USERNAME = "alice"


def _hash(password: str) -> str:
    from sshspec.adapters.passwords import hash_password
    return hash_password(password)


_PASSWORD_HASH = _hash(PASSWORD)


@dataclass
class LiveServer:
    """A running `sshspec serve` subprocess."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path
    key: Path  # the user's private key (OpenSSH format); key.pub is authorized
    host: str = "127.0.0.1"
    username: str = USERNAME
    password: str = PASSWORD
    stderr_lines: list[str] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        # A write(2) to a file is not atomic against a concurrent read: a reader
        # can see the first bytes of a record being written. Only lines that
        # end in a newline are whole records.
        complete, _, _partial = self.log.read_bytes().rpartition(b"\n")
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def codes(self, connection_id: str | None = None) -> list[str]:
        return [r["code"] for r in self.records()
                if connection_id is None or r["labels"].get("connectionId") == connection_id]

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Poll the log until `predicate(records)` is true: the server writes each
        record before it acts on the decision, so the file is the synchronisation point."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.records()
            if predicate(records):
                return records
            if time.monotonic() > deadline:
                codes = [(r["code"], r["labels"].get("connectionId")) for r in records]
                raise AssertionError(f"log never satisfied the condition; it has {codes}")
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}")
            time.sleep(0.02)

    def wait_for_code(self, code: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        return self.wait_for(lambda rs: sum(r["code"] == code for r in rs) >= count, timeout)

    def ssh_args(self, *extra: str) -> list[str]:
        return ["ssh", "-p", str(self.port), "-i", str(self.key), "-F", "/dev/null",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes",
                *extra, f"{self.username}@{self.host}"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def in_process_config(tmp: Path) -> Any:
    """A config for a `Server` run in the test's own event loop (tests that look inside
    the server process: its tasks, what it frees): loopback port 0, the test user, /bin/sh."""
    import msgspec

    from sshspec.adapters.config import AuthConfig, BackendConfig, Listen, User, load_config
    base = load_config(None)
    return msgspec.structs.replace(
        base, state_dir=str(tmp / "state"),
        ssh=msgspec.structs.replace(base.ssh, listen=Listen("127.0.0.1", 0)),
        auth=AuthConfig(users=(User(username=USERNAME, password_hash=_PASSWORD_HASH),)),
        backend=BackendConfig(shell="/bin/sh"))


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    """In the test's event loop, until ``predicate()`` holds (the server runs in the same loop)."""
    import asyncio
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def write_config(path: Path, *, state: Path, log: Path, pubkey: str,
                 overrides: dict[str, Any] | None = None) -> Path:
    import yaml
    config: dict[str, Any] = {
        "stateDir": str(state),
        "ssh": {"listen": "127.0.0.1:0"},
        # failureDelay 0: the suite fails authentications on purpose, many times over;
        # the delay has its own tests (tests/test_admission.py).
        "auth": {"users": [{"username": USERNAME, "passwordHash": _PASSWORD_HASH,
                            "authorizedKeys": [pubkey]}], "failureDelay": 0},
        # Every test client comes from 127.0.0.1, many at once, and many misbehave on
        # purpose: that address is never penalised, has no per-source limit, and
        # maxStartups is a hard limit (no random refusals). The admission tests
        # (tests/test_admission.py) run the defaults, playing attackers and users
        # from other 127.0.0.x addresses (all loopback on Linux).
        "limits": {"maxStartups": 100, "perSourceMaxStartups": 0,
                   "perSourcePenalties": {"exempt": ["127.0.0.1"]}},
        # flushInterval 0: each step's records are in the file before the reply the
        # step sends, so a test (the fuzzer above all) can read the log in lockstep with
        # what its client saw. The default (batched) mode has its own live tests
        # (tests/test_server.py).
        "log": {"level": "debug", "format": "json", "file": str(log), "flushInterval": 0},
        # /bin/sh (dash) reads no rc file: root's ~/.bashrc here runs `pyenv init`,
        # whose lock file, left behind by a killed session, stalls bash for 60 s.
        "backend": {"shell": "/bin/sh"},
    }
    _deep_merge(config, overrides or {})
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def start_server(tmp: Path, name: str, *, config: dict[str, Any] | None = None,
                 handler: str | None = None, extra_args: list[str] | None = None,
                 log_dir: Path = TEST_LOGS,
                 env: dict[str, str] | None = None,
                 ignore_signals: tuple[int, ...] = ()) -> LiveServer:
    """Start `sshspec serve` with a fresh key pair; wait until it listens.

    `ignore_signals`: the server starts with these ignored, as `nohup` (SIGHUP) or a
    script's `cmd &` (SIGINT, SIGQUIT) would start it."""
    key = tmp / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    log_dir.mkdir(exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:120]
    log = log_dir / f"{safe}-{os.getpid()}-{time.monotonic_ns()}.jsonl"
    path = write_config(tmp / "config.yaml", state=tmp / "state", log=log,
                        pubkey=(tmp / "id_ed25519.pub").read_text().strip(), overrides=config)
    cmd = [*SSHSPEC, "serve", "--config", str(path)]
    if handler:
        cmd += ["--handler", handler]
    cmd += extra_args or []
    def ignore() -> None:
        for sig in ignore_signals:
            signal.signal(sig, signal.SIG_IGN)
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp,
                               env={**os.environ, "PYTHONPATH": str(ROOT / "tests"), **(env or {})},
                               preexec_fn=ignore if ignore_signals else None)
    assert process.stderr is not None
    lines: list[str] = []
    for raw in process.stderr:
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        m = re.match(r"sshspec: listening on 127\.0\.0\.1:(\d+)$", line)
        if m:
            break
    else:
        process.wait()
        raise AssertionError("server did not start:\n" + "\n".join(lines))
    # Keep draining stderr so the server never blocks on a full pipe.
    import threading
    threading.Thread(target=lambda: [lines.append(r.decode(errors="replace")) for r in process.stderr],
                     daemon=True).start()
    return LiveServer(process, int(m.group(1)), log, key, stderr_lines=lines)


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """A live server with the default limits."""
    live = start_server(tmp_path, request.node.name)
    yield live
    live.stop()


@pytest.fixture
def server_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Start servers with config overrides (a dict deep-merged into the base config)."""
    started: list[LiveServer] = []

    def make(config: dict[str, Any] | None = None, **kwargs: Any) -> LiveServer:
        sub = tmp_path / f"s{len(started)}"
        sub.mkdir()
        live = start_server(sub, f"{request.node.name}-{len(started)}", config=config, **kwargs)
        started.append(live)
        return live

    yield make
    for live in started:
        live.stop()


def have(program: str) -> bool:
    return shutil.which(program) is not None


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A real ssh-agent holding a fresh key (comment `forwarded-key`); yields the environment
    that points at it (ssh -A)."""
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    key = tmp_path / "agent_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "forwarded-key", "-f", str(key)],
                   check=True)
    env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
    deadline = time.monotonic() + 10
    while subprocess.run(["ssh-add", str(key)], env=env, capture_output=True).returncode != 0:
        assert time.monotonic() < deadline and proc.poll() is None, "ssh-agent did not start"
        time.sleep(0.05)
    yield env
    proc.terminate()
    proc.wait(10)
