"""The log's own instructions per benchmark connection, counted in-process by callgrind.

    .venv/bin/python bench/log_instructions.py [-n N]   # needs valgrind

`bench/instructions.py` counts whole servers, whose counts move by up to ~1% from
run to run: more than the debug log's whole cost (~1.3%). This counts only the
log's path, to the instruction: the 11 calls a benchmark connection makes to its
log sink (`SpecConnection.log`, as the core makes them, with the identity changing
where the connection learns its address and user), batches of 50 connections
(550 records, as at ~500 connections/s with the 100 ms interval) encoded and
written to /dev/null, the clock stepping 180 us a call. Each level runs 200 and
200+N connections under callgrind; the difference over N is the count per
connection, start-up excluded. Debug minus error is what debug logging adds per
connection (error level still calls the sink, which finds no record to log).
Callgrind counts do not depend on the machine's load (hash seeds still move them a
little). Not part of `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

from sshspec.adapters import logs, server
from sshspec.adapters.logs import Labels, Logger
from sshspec.fsm import core

C, S = core.ConnectionEvent, core.SessionEvent
_NONE = {"reason": None, "method": None, "channel_id": None, "request_type": None}
_CHAN = {"channel_id": 0, "request_type": None, "reason": None, "exit_code": None, "signal": None}
# What the core hands the sink for one benchmark connection (connect, password, one exec, close).
CALLS: list[tuple[tuple[str, ...], str, dict[str, object]]] = [
    (("SSH_CONNECTED",), C.connected, _NONE),
    (("SSH_KEX_DONE",), C.auth_begin, _NONE),
    (("SSH_AUTH_ATTEMPT",), C.password, {**_NONE, "method": "password"}),
    (("SSH_AUTH_SUCCESSFUL",), C.auth_ok, {**_NONE, "method": "password"}),
    (("SSH_HANDSHAKE_SUCCESSFUL",), C.backend_accepted, {**_NONE, "method": "password"}),
    (("SSH_NEW_CHANNEL",), C.session_open, {**_NONE, "channel_id": 0, "request_type": "session"}),
    (("SSH_CHANNEL_REQUEST",), S.exec, {**_CHAN, "request_type": "exec"}),
    (("SSH_CHANNEL_REQUEST_SUCCESSFUL",), S.request_ok, {**_CHAN, "request_type": "exec"}),
    (("SSH_EXIT",), S.program_exited, {**_CHAN, "exit_code": 0}),
    (("SSH_CHANNEL_CLOSED",), S.close, _CHAN),
    (("SSH_DISCONNECTED",), C.lost, {**_NONE, "reason": "bench"}),
]
PER_BATCH = 50
STEP_NS = 180_000  # the clock between two log calls: 5.5k records/s, as at ~500 connections/s


def fake_clock() -> None:
    """The log's clock advances STEP_NS per call, whatever callgrind's slowdown: the count
    does not depend on how many steps share a second or a millisecond by chance. (A C
    callable, like time.time_ns; the logger reads `time.time_ns` from its module.)"""
    clock = itertools.count(1_764_326_245_000_000_000, STEP_NS).__next__
    logs.time = types.SimpleNamespace(  # type: ignore[assignment]
        time_ns=clock, strftime=logs.time.strftime, gmtime=logs.time.gmtime)


def bench_connection(host: object, i: int) -> server.SpecConnection:
    """The `i`th connection, with only what its log sink reads (`host` stands for the server)."""
    conn = object.__new__(server.SpecConnection)
    conn.server = host  # type: ignore[assignment]
    conn.info = server.ConnectionInfo(f"1f2e-{i:x}", "")
    conn.records = server.ConnectionLog(host.emitter, Labels(conn.info.connection_id))  # type: ignore[attr-defined]
    conn.log = conn.records.log
    return conn


async def connections(level: str, n: int) -> None:
    logger = Logger(level=level, path=os.devnull, flush_interval=3600)  # flushed below, per batch
    host = types.SimpleNamespace(emitter=server.Emitter(logger))
    for i in range(n):
        conn = bench_connection(host, i)
        for step, (codes, event, labels) in enumerate(CALLS):
            if step == 1:
                conn._identify(remote_addr="127.0.0.1:40000")
            elif step == 4:
                conn._identify(username="bench")
            conn.log(codes, event, **labels)  # type: ignore[arg-type]
        if i % PER_BATCH == PER_BATCH - 1:
            logger.flush()
    logger.close()


def counted(level: str, n: int, script: str = __file__) -> int:
    """Instructions callgrind counts for `script --run LEVEL N` (this script's, or another's
    with the same convention)."""
    with tempfile.TemporaryDirectory(prefix="sshspec-instructions-") as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                        script, "--run", level, str(n)], check=True, capture_output=True)
        lines = out.read_text().splitlines()
        totals = next(line for line in lines if line.startswith(("totals:", "summary:")))
        return int(totals.split()[1])


def main() -> None:
    if sys.argv[1:2] == ["--run"]:
        fake_clock()
        asyncio.run(connections(sys.argv[2], int(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000, help="connections counted per level (default 2000)")
    args = parser.parse_args()
    per_conn = {level: (counted(level, 200 + args.n) - counted(level, 200)) / args.n
                for level in ("debug", "error")}
    debug, error = per_conn["debug"], per_conn["error"]
    print(f"debug {debug:,.0f}  error {error:,.0f}  debug - error {debug - error:,.0f}"
          f" instructions per connection ({(debug - error) / len(CALLS):,.0f} per record)")


if __name__ == "__main__":
    main()
