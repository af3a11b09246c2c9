"""The load client: one process, asyncssh, C connections in flight.

    python -m bench.load run  --port P [-n N] [-c C]   # connect, auth, exec, read, close; N times
    python -m bench.load hold --port P [-n N] [-c C]   # N idle sessions, then wait for a stdin line

Each prints one JSON line on stdout (hold: one when all are open, one after release).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from typing import Any

import asyncssh

from bench.common import OUTPUT, PASSWORD, USERNAME, WAIT_COMMAND

TIMEOUT = 20.0  # per connection: a stuck server fails the run, not the bench
DEADLINE = 200.0  # per phase: no new connection after this (the rest count as errors)


class Collect(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.data = bytearray()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.data += data


def client_options() -> asyncssh.SSHClientConnectionOptions:
    # Built once: no ~/.ssh/config, known_hosts, agent, client keys or GSS per connection.
    return asyncssh.SSHClientConnectionOptions(
        username=USERNAME, password=PASSWORD, known_hosts=None, client_keys=None, agent_path=None,
        gss_host=None, preferred_auth="password", config=None)


async def open_conn(port: int, options: asyncssh.SSHClientConnectionOptions) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect("127.0.0.1", port, options=options, config=None)


async def one_exec(port: int, options: asyncssh.SSHClientConnectionOptions) -> None:
    async with await open_conn(port, options) as conn:
        chan, session = await conn.create_session(Collect, "echo", encoding=None)
        await chan.wait_closed()
        if chan.get_exit_status() != 0 or bytes(session.data) != OUTPUT:
            raise RuntimeError(f"exit {chan.get_exit_status()} output {bytes(session.data)!r}")
    await conn.wait_closed()


def error_kind(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:120]


async def run(port: int, n: int, c: int) -> dict[str, Any]:
    options = client_options()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            start = time.perf_counter()
            if start > deadline:
                errors["deadline"] += 1
                continue
            try:
                async with asyncio.timeout(TIMEOUT):
                    await one_exec(port, options)
            except (OSError, asyncssh.Error, RuntimeError, TimeoutError) as exc:
                errors[error_kind(exc)] += 1
            else:
                latencies.append(time.perf_counter() - start)

    cpu, start = time.process_time(), time.perf_counter()
    deadline = start + DEADLINE
    await asyncio.gather(*(worker() for _ in range(c)))
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return 0.0
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2)

    return {"n": n, "c": c, "ok": len(latencies), "errors": sum(errors.values()),
            "error_kinds": dict(errors.most_common(5)), "elapsed_s": round(elapsed, 3),
            "conns_per_s": round(len(latencies) / elapsed, 1), "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "client_cpu": round((time.process_time() - cpu) / elapsed, 2)}


async def hold(port: int, n: int, c: int) -> None:
    options = client_options()
    held: list[tuple[asyncssh.SSHClientConnection, asyncssh.SSHClientChannel[bytes]]] = []
    errors: Counter[str] = Counter()
    todo = iter(range(n))

    async def opener() -> None:
        for _ in todo:
            if time.perf_counter() > deadline:
                errors["deadline"] += 1
                continue
            try:
                async with asyncio.timeout(TIMEOUT):
                    conn = await open_conn(port, options)
                    try:
                        chan, _ = await conn.create_session(Collect, WAIT_COMMAND, encoding=None)
                    except BaseException:
                        conn.close()
                        raise
                held.append((conn, chan))
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                errors[error_kind(exc)] += 1

    start = time.perf_counter()
    deadline = start + DEADLINE
    await asyncio.gather(*(opener() for _ in range(c)))
    print(json.dumps({"held": len(held), "errors": sum(errors.values()),
                      "error_kinds": dict(errors.most_common(5)),
                      "open_s": round(time.perf_counter() - start, 2)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    exit_ok = 0
    deadline = time.perf_counter() + DEADLINE
    for batch in range(0, len(held), 200):  # release in bounded batches
        if time.perf_counter() > deadline:
            for conn, _ in held[batch:]:
                conn.abort()
            break
        part = held[batch:batch + 200]
        for _, chan in part:
            chan.write_eof()
        try:
            async with asyncio.timeout(TIMEOUT):
                await asyncio.gather(*(chan.wait_closed() for _, chan in part))
        except TimeoutError:
            pass
        exit_ok += sum(chan.get_exit_status() == 0 for _, chan in part)
        for conn, _ in part:
            conn.close()
    print(json.dumps({"released": len(held), "exit_ok": exit_ok}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["run", "hold"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("-c", type=int, default=16)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.n + 1024)), hard))
    if args.mode == "run":
        print(json.dumps(asyncio.run(run(args.port, args.n, args.c))), flush=True)
    else:
        asyncio.run(hold(args.port, args.n, args.c))


if __name__ == "__main__":
    main()
