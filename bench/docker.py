"""`make bench`'s docker phase: sshspec with backend.type docker on a podman engine of its own.

    .venv/bin/python bench/run.py --docker-only [--docker-n N] [--docker-concurrent C]

Three measures, one server (BenchHandler's auth, the docker backend's sessions, podman
started as the tests start it: tests/docker_engine.py, an image built from busybox-static):

* new container: time from the TCP connect to the first byte of shell output (a pty
  shell's prompt) in a fresh container, N connections one after another (p50, p99);
* exec in connection mode: on one connection, N execs of `true` one after another,
  each from channel open to exit status (p50, p99);
* concurrency: C connections at once, each a new container running `echo ok`; failures
  counted (target 0), the slowest and the wall time reported;
* docker.agent side by side: a second server whose programs run under sshspec-agent
  (built here with gcc -static, bind-mounted); on one connection to each, rounds that
  alternate which server goes first, each round 10 execs of `true` and 10 of
  `kill -TERM $$` (exit-status 143 without the agent; exit-signal TERM with it, at the cost
  of the exec that reads the agent's status); p50 of each, and agent / plain.

The client runs in this process; the server is not pinned (podman, conmon and runc
need the other CPU as much as it does).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
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


AGENT_ROUNDS, AGENT_PER_ROUND = 6, 10


async def _agent_side_by_side(plain: int, agent: int) -> dict[str, Any]:
    options = _options()
    times: dict[tuple[str, str], list[float]] = {}
    expected = {("plain", "kill -TERM $$"): (143, None), ("agent", "kill -TERM $$"): (-1, "TERM")}
    async with asyncssh.connect("127.0.0.1", plain, options=options, config=None) as a, \
            asyncssh.connect("127.0.0.1", agent, options=options, config=None) as b:
        servers = [("plain", a), ("agent", b)]
        for round_ in range(AGENT_ROUNDS):
            for name, conn in servers if round_ % 2 == 0 else servers[::-1]:
                for command in ("true", "kill -TERM $$"):
                    for _ in range(AGENT_PER_ROUND):
                        started = time.perf_counter()
                        result = await conn.run(command)
                        times.setdefault((name, command), []).append(time.perf_counter() - started)
                        signal = result.exit_signal[0] if result.exit_signal else None
                        if (result.exit_status, signal) != expected.get((name, command), (0, None)):
                            raise RuntimeError(f"{name} {command}: {result.exit_status} {signal}")
    p50 = {key: statistics.median(values) * 1000.0 for key, values in times.items()}

    def rounds(command: str) -> list[float]:  # each round's agent / plain medians: the spread
        cut = [slice(r * AGENT_PER_ROUND, (r + 1) * AGENT_PER_ROUND) for r in range(AGENT_ROUNDS)]
        agent, plain = times["agent", command], times["plain", command]
        return [round(statistics.median(agent[c]) / statistics.median(plain[c]), 3) for c in cut]
    return {
        "n": AGENT_ROUNDS * AGENT_PER_ROUND,
        "true_plain_p50_ms": round(p50["plain", "true"], 1),
        "true_agent_p50_ms": round(p50["agent", "true"], 1),
        "true_agent_vs_plain": round(p50["agent", "true"] / p50["plain", "true"], 3),
        "killed_plain_p50_ms": round(p50["plain", "kill -TERM $$"], 1),
        "killed_agent_p50_ms": round(p50["agent", "kill -TERM $$"], 1),
        "killed_agent_vs_plain": round(p50["agent", "kill -TERM $$"] / p50["plain", "kill -TERM $$"], 3),
        "true_round_ratios": rounds("true"),
        "killed_round_ratios": rounds("kill -TERM $$"),
    }


def _build_agent(work: Path) -> Path | None:
    if shutil.which("gcc") is None:
        return None
    out = work / "sshspec-agent"
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(out),
                    str(ROOT / "adapters" / "agent" / "sshspec-agent.c")], check=True, timeout=120)
    return out


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
    servers: list[Any] = []

    def serve(name: str, **docker: Any) -> Any:
        config = work / f"{name}.yaml"
        config.write_text(json.dumps({
            "ssh": {"listen": "127.0.0.1:0", "hostkeys": [str(key)]},
            # 20 at once from one address: limits.perSourceMaxStartups (5) would refuse 15 of
            # them (each is a startup until its container runs); this phase measures the engine.
            "limits": {"maxStartups": 1000, "perSourceMaxStartups": 0},
            "log": {"level": "info", "format": "json", "file": str(work / f"{name}.log")},
            "backend": {"type": "docker"},
            "docker": {"host": f"unix://{engine.socket}", "image": IMAGE, "pull": "never", **docker},
            "stateDir": str(work / f"{name}-state")}))
        server = start(name, [*sshspec, "serve", "--config", str(config), "--handler",
                              "bench.handler:BenchHandler"], work, pin=False)
        servers.append(server)
        return server

    try:
        server = serve("docker")
        result = asyncio.run(_measure(server.port, n, concurrent))
        agent = _build_agent(work)
        if agent is None:
            result["agent"] = {"skipped": "gcc is not installed"}
        else:
            with_agent = serve("docker-agent", agent={"source": str(agent)})
            result["agent"] = asyncio.run(_agent_side_by_side(server.port, with_agent.port))
        while servers:
            servers.pop().stop()
        result["containers_left"] = len(engine.containers("io.sshspec.host"))
        return result
    finally:
        for server in servers:
            server.stop()
        engine.stop()
