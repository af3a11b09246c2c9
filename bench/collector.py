"""CPU that Python's cyclic garbage collector takes per connection: A, B (log debug), B (log error).

    .venv/bin/python bench/collector.py [-n N] [-c C]

Each server runs with a `sitecustomize` (on PYTHONPATH, this script writes it) that
times every collection with `gc.callbacks` (thread CPU time, per generation) and
writes its totals when sent SIGUSR1. The servers run one after another, pinned as in
`bench/run.py`, each warmed up, then asked for its totals before and after N bench
connections (C in flight). A connection whose objects sit in reference cycles is
freed only by the collector, which pays for them many times over: promoted through the
generations while the connection lives, found dead by a full collection (HACKS.md row
36). Instruction counts (`bench/instructions.py`) hardly see this: a collection's
passes over objects are memory-bound, and callgrind's slow server keeps fewer of them
alive at a time. Not part of `make bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import ENV, run_load, server_a, server_b  # noqa: E402

SITECUSTOMIZE = '''\
import gc, json, os, signal, time

_out = os.environ["SSHSPEC_BENCH_GC_DIR"]
_totals = {"collections": [0, 0, 0], "cpu_s": [0.0, 0.0, 0.0], "collected": [0, 0, 0], "dumps": 0}
_start = [0.0]


def _timed(phase, info):
    if phase == "start":
        _start[0] = time.thread_time()
    else:
        generation = info["generation"]
        _totals["collections"][generation] += 1
        _totals["cpu_s"][generation] += time.thread_time() - _start[0]
        _totals["collected"][generation] += info["collected"]


def _dump(signum, frame):
    _totals["dumps"] += 1
    path = os.path.join(_out, f"gc-{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(_totals, f)
    os.replace(path + ".tmp", path)


gc.callbacks.append(_timed)
signal.signal(signal.SIGUSR1, _dump)
'''


def totals(pid: int, out: Path, within: float = 10.0) -> dict[str, list[float]]:
    """The server's collector totals so far (it writes them when sent SIGUSR1)."""
    path = out / f"gc-{pid}.json"
    dumps = json.loads(path.read_text())["dumps"] if path.exists() else 0
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists():
            now = json.loads(path.read_text())
            if now["dumps"] > dumps:
                return now  # type: ignore[no-any-return]
        time.sleep(0.01)
    raise SystemExit(f"collector: server {pid} wrote no totals")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=1000, help="connections per server (default 1000)")
    parser.add_argument("-c", type=int, default=16, help="connections in flight (default 16)")
    args = parser.parse_args()
    import asyncssh  # only to make the shared host key
    with tempfile.TemporaryDirectory(prefix="sshspec-collector-") as tmp:
        work = Path(tmp)
        site = work / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        ENV["PYTHONPATH"] = f"{site}{os.pathsep}{ENV['PYTHONPATH']}"
        ENV["SSHSPEC_BENCH_GC_DIR"] = str(work)
        key = work / "host_ed25519"
        key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
        key.chmod(0o600)
        print(f"collector: N={args.n} C={args.c} each, one server at a time; per connection:")
        for make in (lambda: server_a(work, key), lambda: server_b(work, key, "debug", "B"),
                     lambda: server_b(work, key, "error", "B_error")):
            server = make()
            try:
                run_load(server, min(args.n, 100), args.c)  # warm-up
                before = totals(server.proc.pid, work)
                result = run_load(server, args.n, args.c)
                after = totals(server.proc.pid, work)
            finally:
                server.stop()
            ok = result["ok"]
            runs = [(a - b) / ok for a, b in zip(after["collections"], before["collections"], strict=True)]
            cpu = [(a - b) / ok * 1e6 for a, b in zip(after["cpu_s"], before["cpu_s"], strict=True)]
            found = [(a - b) / ok for a, b in zip(after["collected"], before["collected"], strict=True)]
            print(f"  {server.name:<8} collector {sum(cpu):6.1f} us"
                  f" (gen0/1/2 {cpu[0]:.1f} {cpu[1]:.1f} {cpu[2]:.1f}),"
                  f" collections {runs[0]:.3f} {runs[1]:.3f} {runs[2]:.3f},"
                  f" found dead {sum(found):.1f};  server CPU {result['server_cpu_ms'] * 1000:.0f} us")


if __name__ == "__main__":
    main()
