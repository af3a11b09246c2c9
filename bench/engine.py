"""Engine benchmark: events/s of the compiled table vs the transitions machine on
the same event stream, and bytes per machine instance. Run: make bench (or
.venv/bin/python bench/engine.py). Prints a table and writes JSON (--json FILE).

Targets (issue 2): compiled >= 3,000,000 events/s on one core, >= 30x the
transitions machine, <= 160 bytes per connection or channel instance.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc

from sshspec.fsm.machine import Machine, reference_machine

# A realistic stream: whole lifecycles, with guards, refusals and ignores mixed in.
CONNECTION_LIFE = ("connected auth_begin none_auth password auth_bad publickey_query auth_ok publickey "
                   "auth_ok backend_accepted session_open global_request keepalive_due keepalive_answered "
                   "session_open channel_closed channel_open_unsupported channel_closed lost").split()
SESSION_LIFE = ("env request_ok env request_ok pty_req request_ok exec request_ok window_change request_ok "
                "env signal request_ok unknown_request client_eof program_exited close").split()


def bench_compiled(machine: Machine, lifecycle: list[str], rounds: int) -> float:
    fire = machine.fire
    new = machine.new
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            instance = new()
            for event in lifecycle:
                fire(instance, event)
        best = min(best, time.perf_counter() - start)
    return rounds * len(lifecycle) / best


def bench_transitions_events_only(machine: Machine, lifecycle: list[str], rounds: int) -> float:
    # Building a transitions machine per lifecycle is part of its real cost, but
    # for a fair events/s figure we time only the triggers.
    _, model = reference_machine(machine.loaded, machine.limits)
    total = 0.0
    count = 0
    for _ in range(rounds):
        model.state = machine.initial  # type: ignore[attr-defined]
        for c in machine.counters:
            setattr(model, c, 0)
        model.emitted.clear()
        model.replies.clear()
        start = time.perf_counter()
        for event in lifecycle:
            model.trigger(event)  # type: ignore[attr-defined]
        total += time.perf_counter() - start
        count += len(lifecycle)
    return count / total


def bytes_per_instance(machine: Machine, n: int = 20_000) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    keep = [machine.new() for _ in range(n)]
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    per = grown / n
    # the list holding them costs 8 bytes a slot: not part of an instance
    del keep
    return per - 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--rounds", type=int, default=20_000)
    args = parser.parse_args()
    results = {}
    for name, life in (("connection", CONNECTION_LIFE), ("session", SESSION_LIFE)):
        machine = Machine.load(name)
        compiled = bench_compiled(machine, life, args.rounds)
        reference = bench_transitions_events_only(machine, life, max(200, args.rounds // 50))
        results[name] = {
            "compiled_events_per_s": round(compiled),
            "transitions_events_per_s": round(reference),
            "ratio": round(compiled / reference, 1),
            "bytes_per_instance": round(bytes_per_instance(machine)),
        }
    print(f"{'machine':<12}{'compiled ev/s':>16}{'transitions ev/s':>19}{'ratio':>9}{'bytes/inst':>12}")
    for name, r in results.items():
        print(f"{name:<12}{r['compiled_events_per_s']:>16,}{r['transitions_events_per_s']:>19,}"
              f"{r['ratio']:>8}x{r['bytes_per_instance']:>12}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
