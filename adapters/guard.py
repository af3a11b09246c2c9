"""The guard: ends a server's session programs when the server dies, however it dies.

Run by :mod:`sshspec.adapters.backend_local` as ``python -I -S guard.py`` (stdlib only,
no site, no sshspec import: it starts in a few milliseconds), in a session of its own,
with the read end of a pipe as stdin. The server keeps the only write end and writes
one line per event:

    +<sid>    a program was started; it leads session and process group <sid>
    -<sid>    the program's leader is about to be reaped: forget <sid>

The kernel closes the write end when the server exits, whether it returned, crashed
or was SIGKILLed, so end of file on stdin means "the server is gone". The guard then
SIGKILLs, for every session still listed, its process group and every process whose
session id it is (found in /proc: an interactive shell's jobs get process groups of
their own inside the session), scanning again until a scan finds none, and exits.

Pids stay valid for this: a reaped leader's pid is not handed out again while any
process still has it as its process group or session id, and the server writes
``-<sid>`` *before* it reaps the leader.

Limits: a process that left the session with setsid() (a daemon) is not found; the
guard itself can be killed (the server then starts a new one at its next write).
"""

from __future__ import annotations

import os
import signal
import sys


def _session_members(sids: set[int]) -> list[int]:
    found: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...: comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2:].split()
        try:
            pgrp, session = int(fields[2]), int(fields[3])
        except (IndexError, ValueError):
            continue
        if session in sids or pgrp in sids:
            found.append(int(name))
    return found


def end_sessions(sids: set[int]) -> None:
    """SIGKILL every process of the listed sessions (and process groups)."""
    # try/except rather than contextlib.suppress: the guard imports as little as it can.
    for sid in sids:
        try:  # noqa: SIM105
            os.killpg(sid, signal.SIGKILL)
        except OSError:
            pass
    for _ in range(100):  # until a scan finds nobody (a fork may race the first kills)
        members = [pid for pid in _session_members(sids) if pid != os.getpid()]
        if not members:
            return
        for pid in members:
            try:  # noqa: SIM105
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def main() -> None:
    sids: set[int] = set()
    pending = b""
    while True:
        try:
            chunk = os.read(0, 65536)
        except InterruptedError:
            continue
        except OSError:
            chunk = b""
        if not chunk:
            break
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            try:
                sid = int(line[1:])
            except ValueError:
                continue
            if line[:1] == b"+":
                sids.add(sid)
            elif line[:1] == b"-":
                sids.discard(sid)
    end_sessions({sid for sid in sids if sid > 1})
    sys.exit(0)


if __name__ == "__main__":
    main()
