"""Instructions per connection, counted by valgrind's callgrind: A, B (log debug), B (log error).

    .venv/bin/python bench/instructions.py [-n N]      # needs valgrind (apt-get install valgrind)

Time on this machine drifts by more than the differences worth knowing; instruction
counts drift less (a server's count still moves by up to ~1% between runs, so repeat
a run before reading a ratio's last digits). They miss what time sees on real
hardware (cache misses, the kernel's side of a write), so they are a floor for the
CPU ratios of `make bench`, not a substitute. Each server runs alone under callgrind
(~50x slower), warms up on 20 connections with counting off, then counts N
connections of the bench load (C=4). B's log batches every 5 s instead of 100 ms, so
that a batch holds as many records as at full speed. Not part of `make bench`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import ENV, PY, SSHSPEC, load, start  # noqa: E402


def counted(work: Path, name: str, argv: list[str], n: int) -> int:
    out = work / f"{name}.callgrind"
    server = start(name, ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                          f"--callgrind-out-file={out}", *argv], work, pin=False,
                   within=300)  # ~50x slower under callgrind: 30 s was too short on a busy machine
    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(server.proc.pid)], check=True, capture_output=True)

    try:
        warm = subprocess.run(load("run", server.port, 20, 4), cwd=ROOT, env=ENV, capture_output=True)
        control("-i", "on")
        done = subprocess.run(load("run", server.port, n, 4), cwd=ROOT, env=ENV, capture_output=True)
        control("-i", "off")
        control("-d")
        result = json.loads(done.stdout)
        if warm.returncode or done.returncode or result["errors"]:
            raise SystemExit(f"instructions: load against {name} failed: {done.stderr.decode()[-2000:]}")
        total = dumped_total(out, name)
    finally:
        server.stop()
    return total // result["ok"]


def dumped_total(out: Path, name: str) -> int:
    """The instructions of callgrind's first dump (`callgrind_control -d`) for `out`,
    once callgrind has written it."""
    dump = out.with_name(out.name + ".1")
    deadline = time.monotonic() + 60
    while "totals:" not in (text := dump.read_text(errors="replace") if dump.exists() else ""):
        if time.monotonic() > deadline:
            raise SystemExit(f"instructions: callgrind wrote no dump for {name}")
        time.sleep(0.1)
    return int(next(line for line in text.splitlines() if line.startswith("totals:")).split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=300, help="connections counted per server (default 300)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("instructions: needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="sshspec-instructions-") as tmp:
        work = Path(tmp)
        import asyncssh
        key = work / "host_ed25519"
        key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
        key.chmod(0o600)
        per_conn = {"A": counted(work, "A", [PY, "-m", "bench.bare_server", str(key), "0"], args.n)}
        for name, level in (("B", "debug"), ("B_error", "error")):
            config = work / f"{name}.yaml"
            config.write_text(json.dumps({  # JSON is YAML
                "ssh": {"listen": "127.0.0.1:0", "hostkeys": [str(key)]},
                "limits": {"maxStartups": 100000, "loginTimeout": "600s"},
                "log": {"level": level, "file": str(work / f"{name}.log"), "flushInterval": "5s"},
                "stateDir": str(work / "state")}))
            per_conn[name] = counted(work, name, [*SSHSPEC, "serve", "--config", str(config), "--handler",
                                                  "bench.handler:BenchHandler"], args.n)
    for name, count in per_conn.items():
        print(f"{name:<8}{count:>12,} instructions per connection")
    a, b, e = per_conn["A"], per_conn["B"], per_conn["B_error"]
    print(f"B / A {b / a:.4f}   B debug / B error {b / e:.4f}   B error / A {e / a:.4f}")


if __name__ == "__main__":
    main()
