"""The metrics' own instructions per benchmark connection, counted in-process by callgrind.

    .venv/bin/python bench/metrics_instructions.py [-n N]   # needs valgrind

`make bench`'s metrics phase times whole servers side by side; on a busy machine its
rounds spread by several percent, more than the 2% the metrics may cost. This counts
only what metrics add to a connection, to the instruction: the 11 calls a benchmark
connection makes to its log sink (bench/log_instructions.py's `CALLS`, through the
`Emitter`, at log level error so that no record is built), plus what the adapter
does per connection when metrics are on (one authentication and one program start
timed and observed). Each mode runs 200 and 200+N connections under callgrind; the
difference over N is the count per connection. `on - off` is what metrics add.
Not part of `make bench`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.log_instructions import CALLS, bench_connection, counted  # noqa: E402
from sshspec.adapters import server  # noqa: E402
from sshspec.adapters.logs import Logger  # noqa: E402


def connections(mode: str, n: int) -> None:
    logger = Logger(level="error", path=os.devnull, flush_interval=3600)
    metrics = None
    if mode == "on":
        from sshspec.adapters.config import default_config
        from sshspec.adapters.metrics import Metrics
        metrics = Metrics(server.machines(default_config()))
    host = types.SimpleNamespace(emitter=server.Emitter(logger, metrics), metrics=metrics)
    for i in range(n):
        conn = bench_connection(host, i)
        for step, (codes, event, labels) in enumerate(CALLS):
            if step == 1:
                conn._identify(remote_addr="127.0.0.1:40000")
            elif step == 2 and metrics is not None:  # SpecConnection._check: the password, timed
                started = time.perf_counter()
                metrics.observe_auth("password", "ok", time.perf_counter() - started)
            elif step == 4:
                conn._identify(username="bench")
            elif step == 6 and metrics is not None:  # SpecSession.start_program, timed
                started = time.perf_counter()
                metrics.observe_session_start("exec", time.perf_counter() - started)
            conn.log(codes, event, **labels)  # type: ignore[arg-type]
    logger.close()


def main() -> None:
    if sys.argv[1:2] == ["--run"]:
        connections(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000, help="connections counted per mode (default 2000)")
    args = parser.parse_args()
    per_conn = {mode: (counted(mode, 200 + args.n, __file__) - counted(mode, 200, __file__)) / args.n
                for mode in ("off", "on")}
    off, on = per_conn["off"], per_conn["on"]
    print(f"off {off:,.0f}  on {on:,.0f}  on - off {on - off:,.0f} instructions per connection")


if __name__ == "__main__":
    main()
