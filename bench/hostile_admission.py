"""Hostile admission: the issue's two attacks on a fresh `sshspec serve` with the
default admission settings, from several loopback addresses (all of 127/8 is
loopback on Linux), against a legitimate user's password logins.

    .venv/bin/python bench/hostile_admission.py [stalled|guessing|both] [--runs R]
        [--logins N] [--stalled S] [--connections N] [--guesses G] [--concurrency C]
        [--duration SECONDS] [--json FILE]

* stalled: S (150) connections from 127.0.0.2 send a version line and then nothing;
  meanwhile N (16) sequential logins from 127.0.0.3 (password, `true`, close).
  Target: N of N succeed, median latency at most 2x the same server's idle median.
* guessing: C (16) workers from 127.0.0.4 open up to N (300) connections, each
  trying G (6) wrong passwords, retrying at once when refused, for DURATION (60 s);
  meanwhile sequential logins from 127.0.0.5, one a second (idle: N logins before
  the attack and N after it, on the same server). The guesses that
  reached the password check are the server log's SSH_AUTH_ATTEMPT records from
  127.0.0.4. Then PAIRING (40 s) more of the attack, the attacker stopped and
  resumed every 5 s, logins every half second: attack and idle moments apart
  (the "paired" ratio; on a busy machine the before/after idle drifts). Targets:
  after the first 10 s at most 1 guess/s from that source; the legitimate median
  login at most 1.5x the idle median.

The server runs pinned to CPU 0, the clients on CPU 1 (as bench/run.py); the
guessing attacker is a separate process scheduled SCHED_IDLE (nice 19 where that
is refused), so its client-side crypto does not delay the legitimate client's
(on a real network it is another machine). Each run uses a fresh server; medians
and spreads are over runs.
Targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncssh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import CLIENT_CPU, ENV, PY, ROOT, SSHSPEC, TWO_CPUS, Server, start  # noqa: E402

USERNAME, PASSWORD = "alice", "correct horse battery"
TIMEOUT = 30.0


# --- the server --------------------------------------------------------------------------------


def server(work: Path, name: str) -> Server:
    """A fresh server with the default admission settings (nothing under limits but
    what every server needs)."""
    from sshspec.adapters.passwords import hash_password
    config = work / f"{name}.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "ssh": {"listen": "127.0.0.1:0"},
        "auth": {"users": [{"username": USERNAME, "passwordHash": hash_password(PASSWORD)}]},
        "backend": {"shell": "/bin/sh"},
        "log": {"level": "debug", "format": "json", "file": str(work / f"{name}.log")},
        "stateDir": str(work / "state")}))
    return start(name, [*SSHSPEC, "serve", "--config", str(config)], work)


def records(work: Path, name: str) -> list[dict[str, Any]]:
    path = work / f"{name}.log"
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def at(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


# --- the legitimate user -----------------------------------------------------------------------


def options() -> asyncssh.SSHClientConnectionOptions:
    return asyncssh.SSHClientConnectionOptions(
        username=USERNAME, password=PASSWORD, known_hosts=None, client_keys=None, agent_path=None,
        gss_host=None, preferred_auth="password", config=None, login_timeout=TIMEOUT)


async def one_login(port: int, source: str) -> float | str:
    """Seconds for connect, password, `true`, close; or what went wrong."""
    started = time.monotonic()
    try:
        async with asyncssh.connect("127.0.0.1", port, options=options(), config=None,
                                    local_addr=(source, 0)) as conn:
            await asyncio.wait_for(conn.run("true", check=True), TIMEOUT)
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"[:100]
    return time.monotonic() - started


async def logins(port: int, source: str, n: int, *, every: float = 0.0,
                 until: float | None = None) -> list[tuple[float, float | str]]:
    """n sequential logins (or until `until`, one started every `every` seconds):
    (start time, latency or error) each."""
    out: list[tuple[float, float | str]] = []
    while len(out) < n if until is None else time.time() < until:
        began = time.time()
        out.append((began, await one_login(port, source)))
        if every:
            await asyncio.sleep(max(0.0, began + every - time.time()))
    return out


def latencies(results: list[tuple[float, float | str]]) -> list[float]:
    return [r for _, r in results if isinstance(r, float)]


# --- attack (a): stalled pre-auth connections --------------------------------------------------


def stall(port: int, source: str, count: int) -> tuple[list[socket.socket], int]:
    """`count` connections that send a version line and then nothing; the open ones
    (the server answered with its version) and how many it closed at once."""
    socks = []
    sel = selectors.DefaultSelector()
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0))
        s.sendall(b"SSH-2.0-stalled\r\n")
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    answered: dict[socket.socket, bool] = {}
    deadline = time.monotonic() + 10
    while len(answered) < count and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(256)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            answered[s] = bool(data)
            sel.unregister(s)
    sel.close()
    held = [s for s in socks if answered.get(s)]
    for s in socks:
        if s not in held:
            s.close()
    return held, count - len(held)


def run_stalled(work: Path, n: int, count: int, index: int) -> dict[str, Any]:
    srv = server(work, f"stalled{index}")
    try:
        idle = asyncio.run(logins(srv.port, "127.0.0.3", n))
        held, refused = stall(srv.port, "127.0.0.2", count)
        attack = asyncio.run(logins(srv.port, "127.0.0.3", n))
        for s in held:
            s.close()
    finally:
        srv.stop()
    codes = [r["code"] for r in records(work, f"stalled{index}")]
    ok = latencies(attack)
    return {"admitted": len(held), "refused": refused, "succeeded": len(ok), "logins": n,
            "idle_latencies": latencies(idle), "attack_latencies": ok,
            "idle_median": statistics.median(latencies(idle)),
            "attack_median": statistics.median(ok) if ok else None,
            "ratio": statistics.median(ok) / statistics.median(latencies(idle)) if ok else None,
            "errors": [r for _, r in attack if isinstance(r, str)],
            "refusal_codes": {c: codes.count(c) for c in ("SSH_SOURCE_STARTUPS_EXCEEDED",
                                                          "SSH_STARTUPS_EARLY_DROP",
                                                          "SSH_STARTUPS_EXCEEDED") if c in codes}}


# --- attack (b): password guessing -------------------------------------------------------------


class Guesser(asyncssh.SSHClient):
    """Tries `guesses` wrong passwords on one connection."""

    def __init__(self, guesses: int) -> None:
        self.left = guesses

    def password_auth_requested(self) -> str | None:
        if self.left <= 0:
            return None
        self.left -= 1
        return f"wrong-{self.left}"


async def attacker(port: int, source: str, connections: int, guesses: int, concurrency: int,
                   duration: float) -> dict[str, int]:
    """`concurrency` workers until `connections` connections made all their guesses
    or `duration` passed; a refused connection is retried at once."""
    stats = {"completed": 0, "refused": 0, "cut": 0}
    deadline = time.monotonic() + duration
    opts = asyncssh.SSHClientConnectionOptions(
        username=USERNAME, known_hosts=None, client_keys=None, agent_path=None, gss_host=None,
        preferred_auth="password", config=None, login_timeout=TIMEOUT)

    async def worker() -> None:
        while stats["completed"] < connections and time.monotonic() < deadline:
            guesser = Guesser(guesses)
            try:
                conn = await asyncio.wait_for(asyncssh.connect(
                    "127.0.0.1", port, options=opts, config=None, local_addr=(source, 0),
                    client_factory=lambda g=guesser: g), max(0.1, deadline - time.monotonic()))
                conn.close()  # (never: every guess is wrong)
            except asyncssh.PermissionDenied:
                stats["completed"] += 1
            except (asyncssh.Error, OSError):
                # Closed before the version exchange (refused), or cut mid-way.
                stats["refused" if guesser.left == guesses else "cut"] += 1
            except TimeoutError:
                return

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return stats


def attacker_main(argv: list[str]) -> None:
    # The attacker stands for another machine: on the clients' CPU it runs only when
    # the legitimate client does not (SCHED_IDLE), so what slows the legitimate user
    # down is the server's work, not the attacker's own client-side crypto.
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)
    port, connections, guesses, concurrency = (int(a) for a in argv[:4])
    duration = float(argv[4])
    stats = asyncio.run(attacker(port, "127.0.0.4", connections, guesses, concurrency, duration))
    print(json.dumps(stats), flush=True)


async def paired(port: int, source: str, attacker: int, until: float,
                 window: float) -> list[tuple[str, float | str]]:
    """Logins every half second while the attacker is stopped (SIGSTOP) and resumed
    every `window` seconds: each labelled "attack" or "paused" by the attacker's
    state throughout it ("mixed" if it changed meanwhile). Both kinds see the same
    machine moments apart, which a drifting machine needs."""
    paused = False
    out: list[tuple[str, float | str]] = []

    async def toggle() -> None:
        nonlocal paused
        while time.time() < until:
            await asyncio.sleep(min(window, max(0.0, until - time.time())))
            paused = not paused
            os.kill(attacker, signal.SIGSTOP if paused else signal.SIGCONT)
        if paused:
            os.kill(attacker, signal.SIGCONT)

    async def log_in() -> None:
        while time.time() < until:
            began, before = time.time(), paused
            result = await one_login(port, source)
            out.append(("mixed" if paused != before else "paused" if before else "attack", result))
            await asyncio.sleep(max(0.0, began + 0.5 - time.time()))

    await asyncio.gather(toggle(), log_in())
    return out


def run_guessing(work: Path, n: int, connections: int, guesses: int, concurrency: int,
                 duration: float, pairing: float, index: int) -> dict[str, Any]:
    name = f"guessing{index}"
    srv = server(work, name)
    try:
        idle = asyncio.run(logins(srv.port, "127.0.0.5", n))
        begin = time.time()
        attack = subprocess.Popen(
            [PY, __file__, "attacker", str(srv.port), str(connections), str(guesses), str(concurrency),
             str(duration + pairing)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
            preexec_fn=(lambda: os.sched_setaffinity(0, {CLIENT_CPU})) if TWO_CPUS else None)
        during = asyncio.run(logins(srv.port, "127.0.0.5", 0, every=1.0, until=begin + duration))
        pairs = asyncio.run(paired(srv.port, "127.0.0.5", attack.pid, begin + duration + pairing, 5.0)) \
            if pairing > 0 else []
        out, _ = attack.communicate(timeout=duration + pairing + 60)
        stats = json.loads(out)
        cpu_s = srv.cpu_ns() / 1e9
        # Idle again once the attack is over (the same server; 127.0.0.5 was never penalised):
        # on a machine whose speed drifts, idle before and after brackets the attack.
        idle += asyncio.run(logins(srv.port, "127.0.0.5", n))
    finally:
        srv.stop()
    recs = records(work, name)
    attempts = [at(r) - begin for r in recs if r["code"] == "SSH_AUTH_ATTEMPT"
                and r["labels"].get("remoteAddr", "").startswith("127.0.0.4:")]
    attempts = [t for t in attempts if t < duration]  # the continuous phase (the attacker is never paused)
    late = [t for t in attempts if t >= 10.0]
    attacked = [r for kind, r in pairs if kind == "attack" and isinstance(r, float)]
    paused = [r for kind, r in pairs if kind == "paused" and isinstance(r, float)]
    per_second = [sum(1 for t in late if s <= t < s + 1) for s in range(10, int(duration))]
    ok_all = latencies(during)
    ok_late = [r for t, r in during if isinstance(r, float) and t - begin >= 10.0]
    idle_median = statistics.median(latencies(idle))
    codes = [r["code"] for r in recs]
    return {"guesses_checked": len(attempts), "guesses_first_10s": len(attempts) - len(late),
            "guesses_after_10s": len(late), "rate_after_10s": len(late) / (duration - 10.0),
            "max_in_one_second_after_10s": max(per_second, default=0),
            "attacker": stats, "idle_median": idle_median,
            "attack_median": statistics.median(ok_all) if ok_all else None,
            "attack_median_after_10s": statistics.median(ok_late) if ok_late else None,
            "ratio": statistics.median(ok_all) / idle_median if ok_all else None,
            "ratio_after_10s": statistics.median(ok_late) / idle_median if ok_late else None,
            "paired_attack_median": statistics.median(attacked) if attacked else None,
            "paired_paused_median": statistics.median(paused) if paused else None,
            "paired_ratio": statistics.median(attacked) / statistics.median(paused)
            if attacked and paused else None,
            "paired_samples": (len(attacked), len(paused)),
            "paired_failed": [r for _, r in pairs if isinstance(r, str)],
            "legit_logins": len(during), "legit_failed": [r for _, r in during if isinstance(r, str)],
            "idle_latencies": latencies(idle), "attack_latencies": [(t - begin, r) for t, r in during],
            "server_cpu_s": cpu_s,
            "codes": {c: codes.count(c) for c in ("SSH_PENALTY", "SSH_PENALTY_ACTIVE", "SSH_SOURCE_PENALISED",
                                                  "SSH_AUTH_PENALISED", "SSH_SOURCE_STARTUPS_EXCEEDED",
                                                  "SSH_STARTUPS_EARLY_DROP", "SSH_AUTH_FAILED")}}


# --- report ------------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "attacker":
        attacker_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", nargs="?", default="both", choices=["stalled", "guessing", "both"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--logins", type=int, default=16)
    parser.add_argument("--stalled", type=int, default=150)
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--guesses", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--pairing", type=float, default=40.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if TWO_CPUS:
        os.sched_setaffinity(0, {CLIENT_CPU})
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="sshspec-hostile-") as tmp:
        work = Path(tmp)
        if args.scenario in ("stalled", "both"):
            runs = [run_stalled(work, args.logins, args.stalled, i) for i in range(args.runs)]
            result["stalled"] = runs
            print(f"(a) {args.stalled} stalled connections from 127.0.0.2, "
                  f"{args.logins} logins from 127.0.0.3:")
            for i, r in enumerate(runs):
                print(f"  run {i}: admitted {r['admitted']}, refused {r['refused']} {r['refusal_codes']}; "
                      f"{r['succeeded']}/{r['logins']} logins; idle {r['idle_median']:.3f}s, "
                      f"attack {r['attack_median'] or float('nan'):.3f}s, "
                      f"ratio {r['ratio'] or float('nan'):.2f}"
                      + (f"; errors {r['errors'][:3]}" if r["errors"] else ""))
            print(f"  succeeded: {[r['succeeded'] for r in runs]} of {args.logins} (target all)")
            print(f"  ratio attack/idle: {spread([r['ratio'] for r in runs if r['ratio']])} (target <= 2)")
        if args.scenario in ("guessing", "both"):
            runs = [run_guessing(work, args.logins, args.connections, args.guesses, args.concurrency,
                                 args.duration, args.pairing, i) for i in range(args.runs)]
            result["guessing"] = runs
            print(f"(b) {args.concurrency} workers x {args.guesses} wrong passwords from 127.0.0.4 for "
                  f"{args.duration:g}s, logins from 127.0.0.5 every second:")
            for i, r in enumerate(runs):
                print(f"  run {i}: {r['guesses_checked']} guesses checked ({r['guesses_first_10s']} in the "
                      f"first 10 s, {r['guesses_after_10s']} after: {r['rate_after_10s']:.3f}/s, at most "
                      f"{r['max_in_one_second_after_10s']} in one second); attacker {r['attacker']}; "
                      f"legit idle {r['idle_median']:.3f}s, attack {r['attack_median'] or float('nan'):.3f}s "
                      f"(ratio {r['ratio'] or float('nan'):.2f}; after 10 s "
                      f"{r['ratio_after_10s'] or float('nan'):.2f}), {len(r['legit_failed'])} of "
                      f"{r['legit_logins']} failed; server CPU {r['server_cpu_s']:.1f}s; {r['codes']}; "
                      f"paired: attack {r['paired_attack_median'] or float('nan'):.3f}s, paused "
                      f"{r['paired_paused_median'] or float('nan'):.3f}s, ratio "
                      f"{r['paired_ratio'] or float('nan'):.2f} ({r['paired_samples'][0]} + "
                      f"{r['paired_samples'][1]} logins, {len(r['paired_failed'])} failed)")
            print(f"  guesses/s after 10 s: {spread([r['rate_after_10s'] for r in runs])} (target <= 1)")
            print(f"  legit attack/idle: {spread([r['ratio'] for r in runs if r['ratio']])} (target <= 1.5)")
            paired_ratios = [r["paired_ratio"] for r in runs if r["paired_ratio"]]
            print(f"  legit attack/paused, paired: {spread(paired_ratios)} (target <= 1.5)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
