"""How many event sequences a second the sans-I/O core takes in-process.

Each sequence is one connection: connect, log in, open a session, then 20 random
channel events (requests of every kind, backend verdicts, EOF, program end,
close) answered the way the adapter answers them, then the connection ends.
The property tests (tests/test_engine.py, tests/test_fuzz_engine.py) drive the
same core through hypothesis, whose own bookkeeping costs more than the core.

    .venv/bin/python bench/core_sequences.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import random
import time

from sshspec.fsm import core

NAMES = ["env", "pty-req", "exec", "shell", "signal", "x11-req", "bogus", "window-change"]


def one_connection(machines: core.Machines, rng: random.Random) -> int:
    server = core.ServerCore(machines, lambda *a: None)
    server.handle(core.ServerEvent.start)
    server.handle(core.ServerEvent.listening)
    server.handle(core.ServerEvent.accept)
    conn = core.ConnectionCore(machines, server, lambda *a, **k: None)
    events = 0
    pending: list[int] = []
    started = ended = False

    def run(actions: list[core.Action]) -> None:
        nonlocal events, started
        for action in actions:
            answer: core.Event | None = None
            if isinstance(action, core.ChannelReply):
                answer = core.ChannelReplied(action.channel, None)
            elif isinstance(action, core.AskBackend):
                answer = core.RequestDone(action.channel, True)
            elif isinstance(action, core.StartProgram):
                pending.append(action.channel)
            elif isinstance(action, core.ProgramStarted):
                started = True
                answer = core.IoStarted(action.channel)
            elif isinstance(action, core.AdmitUser):
                answer = core.UserVerdict(True, action.method)
            if answer is not None:
                events += 1
                run(conn.handle(answer))

    for event in (core.Connected(), core.KexDone(1), core.AuthRequested("password"),
                  core.Credentials("ok", "password"), core.AuthCompleted(0.0), core.ChannelOpen("session")):
        events += 1
        run(conn.handle(event))
    channel = 0
    for _ in range(20):
        roll = rng.random()
        if roll < 0.6:
            event: core.Event = core.ChannelRequest(channel, rng.choice(NAMES), rng.random() < 0.7)
        elif roll < 0.75 and pending:
            event = core.RequestDone(pending.pop(), rng.random() < 0.8)
        elif 0.75 <= roll < 0.85 and started:
            event = core.ClientEof(channel)  # asyncssh holds EOF until a program started
        elif 0.85 <= roll < 0.95 and started and not ended:
            ended = True  # the adapter waits for its program once
            event = core.ProgramEnded(channel, 0)
        elif roll >= 0.95:
            event = core.ChannelClosed(channel)
        else:
            continue
        events += 1
        run(conn.handle(event))
    events += 1
    run(conn.handle(core.ConnectionLost(core.Lost.lost, "bench")))
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    machines = core.Machines.load({"maxSessions": 2, "maxEnv": 2}, max_queued_requests=4)
    rng = random.Random(1)
    sequences = events = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < args.seconds:
        events += one_connection(machines, rng)
        sequences += 1
    print(f"{sequences / elapsed:,.0f} sequences/s, {events / elapsed:,.0f} events/s "
          f"({sequences} sequences, {events / sequences:.1f} events each, {elapsed:.1f} s)")


if __name__ == "__main__":
    main()
