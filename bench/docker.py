"""`make bench`'s docker phase: sshspec with backend.type docker on a podman engine of its own.

    .venv/bin/python bench/run.py --docker-only [--docker-n N] [--docker-concurrent C]

Three measures, one server (BenchHandler's auth, the docker backend's sessions, podman
started as the tests start it: tests/docker_engine.py, an image built from busybox-static):

* new container: time from the TCP connect to the first byte of shell output (a pty
  shell's prompt) in a fresh container, N connections one after another (p50, p99);
* exec in connection mode: on one connection, N execs of `true` one after another,
  each from channel open to exit status (p50, p99);
* concurrency: C connections at once, each a new container running `echo ok`; failures
  counted (target 0), the slowest and the wall time reported.

The client runs in this process; the server is not pinned (podman, conmon and runc
need the other CPU as much as it does).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncssh

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from docker_engine import IMAGE, EngineUnavailable, Podman  # noqa: E402

from bench.common import PASSWORD, USERNAME  # noqa: E402


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _options() -> asyncssh.SSHClientConnectionOptions:
    return asyncssh.SSHClientConnectionOptions(
        username=USERNAME, password=PASSWORD, known_hosts=None, client_keys=None, agent_path=None,
        gss_host=None, preferred_auth="password", config=None)


async def _first_output(port: int, options: asyncssh.SSHClientConnectionOptions) -> float:
    started = time.perf_counter()
    async with asyncssh.connect("127.0.0.1", port, options=options, config=None) as conn:
        proc = await conn.create_process(term_type="xterm", encoding=None)
        first = await proc.stdout.read(1)
        elapsed = time.perf_counter() - started
        if not first:
            raise RuntimeError("the shell wrote nothing")
        proc.stdin.write(b"exit\n")
        await proc.wait_closed()
    return elapsed


async def _execs(port: int, options: asyncssh.SSHClientConnectionOptions, n: int) -> list[float]:
    out = []
    async with asyncssh.connect("127.0.0.1", port, options=options, config=None) as conn:
        for _ in range(n):
            started = time.perf_counter()
            result = await conn.run("true")
            out.append(time.perf_counter() - started)
            if result.exit_status != 0:
                raise RuntimeError(f"exec exited {result.exit_status}")
    return out


async def _one(port: int, options: asyncssh.SSHClientConnectionOptions) -> float:
    started = time.perf_counter()
    async with asyncssh.connect("127.0.0.1", port, options=options, config=None) as conn:
        result = await conn.run("echo ok")
        if result.stdout != "ok\n" or result.exit_status != 0:
            raise RuntimeError(f"exit {result.exit_status} output {result.stdout!r}")
    return time.perf_counter() - started


async def _measure(port: int, n: int, concurrent: int) -> dict[str, Any]:
    options = _options()
    firsts = [await _first_output(port, options) for _ in range(n)]
    execs = await _execs(port, options, n)
    wall = time.perf_counter()
    results = await asyncio.gather(*(_one(port, options) for _ in range(concurrent)), return_exceptions=True)
    wall = time.perf_counter() - wall
    ok = [r for r in results if isinstance(r, float)]
    errors = [f"{type(r).__name__}: {r}"[:120] for r in results if not isinstance(r, float)]
    ms = 1000.0
    return {
        "n": n,
        "first_output_p50_ms": round(statistics.median(firsts) * ms, 1),
        "first_output_p99_ms": round(_pct(firsts, 99) * ms, 1),
        "first_output_max_ms": round(max(firsts) * ms, 1),
        "first_output_first_ms": round(firsts[0] * ms, 1),  # the server's first: a cold engine client
        "exec_p50_ms": round(statistics.median(execs) * ms, 1),
        "exec_p99_ms": round(_pct(execs, 99) * ms, 1),
        "concurrent": concurrent,
        "concurrent_failures": len(errors),
        "concurrent_errors": errors[:5],
        "concurrent_wall_s": round(wall, 2),
        "concurrent_p50_ms": round(statistics.median(ok) * ms, 1) if ok else None,
        "concurrent_max_ms": round(max(ok) * ms, 1) if ok else None,
    }


def docker_phase(work: Path, key: Path, n: int, concurrent: int, start: Any,
                 sshspec: list[str]) -> dict[str, Any]:
    """Start podman and a docker-backend server (``start`` is bench.run.start), measure."""
    root = work / "podman"
    root.mkdir()
    try:
        engine = Podman.start(root)
    except EngineUnavailable as exc:
        return {"skipped": str(exc)}
    server = None
    try:
        config = work / "docker.yaml"
        config.write_text(json.dumps({
            "ssh": {"listen": "127.0.0.1:0", "hostkeys": [str(key)]},
            # 20 at once from one address: limits.perSourceMaxStartups (5) would refuse 15 of
            # them (each is a startup until its container runs); this phase measures the engine.
            "limits": {"maxStartups": 1000, "perSourceMaxStartups": 0},
            "log": {"level": "info", "format": "json", "file": str(work / "docker.log")},
            "backend": {"type": "docker"},
            "docker": {"host": f"unix://{engine.socket}", "image": IMAGE, "pull": "never"},
            "stateDir": str(work / "state")}))
        server = start("docker", [*sshspec, "serve", "--config", str(config), "--handler",
                                  "bench.handler:BenchHandler"], work, pin=False)
        result = asyncio.run(_measure(server.port, n, concurrent))
        server.stop()
        server = None
        result["containers_left"] = len(engine.containers("io.sshspec.host"))
        return result
    finally:
        if server is not None:
            server.stop()
        engine.stop()
