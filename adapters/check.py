"""`sshspec check` and `sshspec coverage`: replay `sshspec serve` JSON logs against the specs.

The replay itself is `sshspec.fsm.replay` (no I/O); this module reads the files,
decodes the records, prints what it finds and turns it into an exit status:

* 0: every record allowed (check), or the report was printed (coverage);
* 1: a record the specs do not allow, a machine unfinished (``--complete``), or
  coverage below ``--fail-under``;
* 2: a corrupt record, an unreadable file, a bad option.

Each file is replayed on its own (its own machine instances), as one server
process from its start (``--workers N``: N processes appending to one file). A
file stops at its first problem and the next file is still replayed; coverage
counts a file up to its first problem and warns. Findings go to stdout as
``FILE:LINE: ...``, an unreadable file to stderr.

What the log cannot say comes from options: ``--limit NAME=VALUE`` for the
limits the server ran with (default: the specs' defaults), ``--level`` for its
log level (codes below it were never written, so they replay as silent moves).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from sshspec.adapters.config import SPEC_LIMITS
from sshspec.adapters.logs import decode_record
from sshspec.codes import CATALOG
from sshspec.fsm.replay import (
    CodeAutomaton,
    RecordError,
    Replay,
    SpecCoverage,
    automata,
    coverage,
    transition_label,
)
from sshspec.fsm.spec import SPEC_VIOLATION, Entry

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_VIOLATION = 3  # between coverage_logs and the command only: exits EXIT_FAIL
LEVELS = ("debug", "info", "warning", "error")


@dataclass
class FileResult:
    """What replaying one file found."""

    status: int = EXIT_OK
    problems: list[str] = field(default_factory=list)  # printed as they are, one per line
    records: int = 0
    replay: Replay | None = None
    violation: bool = False  # an SSH_SPEC_VIOLATION record: a failure for check and coverage alike


def silent_codes(level: str) -> frozenset[str]:
    """The codes a server logging at ``level`` never writes (the Logger drops them)."""
    floor = LEVELS.index(level)
    return frozenset(name for name, code in CATALOG.items() if LEVELS.index(code.level) < floor)


def replay_lines(name: str, lines: Iterable[bytes], machines: Mapping[str, CodeAutomaton], *,
                 complete: bool = False, track: bool = False, workers: int = 1) -> FileResult:
    """Replay one log's lines (``name`` is how findings name the file)."""
    replay = Replay(machines, track=track, workers=workers)
    result = FileResult(replay=replay)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue  # the Logger never writes one; an editor might
        try:
            record = decode_record(line)
            if record.code not in CATALOG:
                raise RecordError(f"unknown code {record.code!r} (not in the catalog)")
            if record.code == SPEC_VIOLATION:
                result.problems.append(f"{name}:{number}: {SPEC_VIOLATION}: {record.labels.reason} "
                                       f"(connection {record.labels.connection_id})")
                result.status, result.violation = EXIT_FAIL, True
                return result
            problem = replay.feed(record.code, record.labels.connection_id, record.labels.channel_id,
                                  record.labels.event, record.labels.container)
        except ValueError as exc:  # RecordError is one
            reason = str(exc).removeprefix("corrupt log record: ")
            result.problems.append(f"{name}:{number}: corrupt record: {reason}")
            result.status = EXIT_USAGE
            return result
        result.records += 1
        if problem is not None:
            result.problems.append(f"{name}:{number}: {problem}")
            result.status = EXIT_FAIL
            return result
    if complete:
        unfinished = replay.unfinished()
        result.problems.extend(f"{name}: {p}" for p in unfinished)
        if unfinished:
            result.status = EXIT_FAIL
    return result


def replay_file(path: str, machines: Mapping[str, CodeAutomaton], *, complete: bool = False,
                track: bool = False, workers: int = 1, err: TextIO | None = None) -> FileResult:
    try:
        with open(path, "rb") as f:
            return replay_lines(path, f, machines, complete=complete, track=track, workers=workers)
    except OSError as exc:
        print(f"sshspec: {path}: cannot read: {exc.strerror or exc}", file=err or sys.stderr)
        return FileResult(status=EXIT_USAGE)


_LIMITS_DIR = re.compile(r"^\w+=\d+(?:,\w+=\d+)*$")


def limits_for(path: str, limits: Mapping[str, int] | None) -> dict[str, int]:
    """The limits a log replays with: ``limits``, overridden by its folder's name
    when that reads like ``maxAuthTries=3,maxSessions=2`` (how the test suite
    files the logs of servers it ran with other limits)."""
    merged = dict(limits or {})
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    if _LIMITS_DIR.match(folder):
        for item in folder.split(","):
            name, value = item.split("=")
            merged[name] = int(value)
    return merged


def _machines_for(path: str, limits: Mapping[str, int] | None, level: str,
                  cache: dict[tuple[tuple[str, int], ...], Mapping[str, CodeAutomaton]]
                  ) -> Mapping[str, CodeAutomaton]:
    key = tuple(sorted(limits_for(path, limits).items()))
    if key not in cache:
        cache[key] = automata(dict(key), silent_codes(level))
    return cache[key]


def check_logs(paths: Sequence[str], *, limits: Mapping[str, int] | None = None, level: str = "debug",
               workers: int = 1, complete: bool = False, out: TextIO | None = None,
               err: TextIO | None = None) -> int:
    """`sshspec check`: print each file's first problem (or that it is ok); the exit status."""
    out = out or sys.stdout
    cache: dict[tuple[tuple[str, int], ...], Mapping[str, CodeAutomaton]] = {}
    status = EXIT_OK
    for path in paths:
        machines = _machines_for(path, limits, level, cache)
        result = replay_file(path, machines, complete=complete, workers=workers, err=err)
        for problem in result.problems:
            print(problem, file=out)
        if result.status == EXIT_OK and result.replay is not None:
            r = result.replay
            print(f"{path}: ok ({result.records} records, {len(r.connections)} connections, "
                  f"{len(r.sessions)} sessions)", file=out)
        status = max(status, result.status)
    return status


def coverage_logs(paths: Sequence[str], *, limits: Mapping[str, int] | None = None, level: str = "debug",
                  workers: int = 1, err: TextIO | None = None) -> tuple[list[SpecCoverage], int]:
    """Replay every file for coverage; problems are warned on ``err`` (each file counts
    up to its first problem). Returns the coverage per spec and the worst file status."""
    err = err or sys.stderr
    cache: dict[tuple[tuple[str, int], ...], Mapping[str, CodeAutomaton]] = {}
    machines = _machines_for("", limits, level, cache)
    credited: dict[str, set[int]] = {name: set() for name in machines}
    seen: dict[str, set[str]] = {name: set() for name in machines}
    status = EXIT_OK
    for path in paths:
        result = replay_file(path, _machines_for(path, limits, level, cache), track=True,
                             workers=workers, err=err)
        for problem in result.problems:
            print(f"{problem} (coverage counts this file up to here)", file=err)
        status = max(status, EXIT_VIOLATION if result.violation else result.status)
        if result.replay is not None:
            for name, indexes in result.replay.credited().items():
                credited[name] |= indexes
            for name, codes in result.replay.codes_seen.items():
                seen[name] |= codes
    return coverage(machines, credited, seen), status


def format_coverage(report: Sequence[SpecCoverage], *, summary: bool = False) -> str:
    lines: list[str] = []
    if summary:
        lines += [spec.summary() for spec in report]
        missing = [f"  {spec.name}: {transition_label(t)}" for spec in report
                   for i, t in enumerate(spec.transitions) if i not in spec.exercised]
        if missing:
            lines += ["not exercised:", *missing]
        return "\n".join(lines) + "\n"
    for spec in report:
        lines.append(spec.summary())
        for i, t in enumerate(spec.transitions):
            lines.append(f"  {'+' if i in spec.exercised else '-'} {transition_label(t)}")
        unseen = [c for c in spec.codes if c not in spec.codes_seen]
        lines.append(f"  codes seen: {', '.join(sorted(spec.codes_seen)) or '-'}")
        lines.append(f"  codes not seen: {', '.join(unseen) or '-'}")
    return "\n".join(lines) + "\n"


def coverage_json(report: Sequence[SpecCoverage]) -> str:
    def row(e: Entry) -> dict[str, object]:
        return {"source": e.source, "event": e.event, "guard": str(e.guard) if e.guard else None,
                "target": e.target, "codes": list(e.codes), "label": transition_label(e)}

    specs = [{
        "machine": s.name,
        "transitions": {"exercised": len(s.exercised), "total": len(s.transitions),
                        "percent": round(s.percent(), 1)},
        "codes": {"seen": len(s.codes_seen), "total": len(s.codes)},
        "exercised": [row(t) for i, t in enumerate(s.transitions) if i in s.exercised],
        "not_exercised": [row(t) for i, t in enumerate(s.transitions) if i not in s.exercised],
        "codes_seen": sorted(s.codes_seen),
        "codes_not_seen": [c for c in s.codes if c not in s.codes_seen],
    } for s in report]
    return json.dumps({"specs": specs, "percent": round(overall_percent(report), 1)}, indent=2) + "\n"


def overall_percent(report: Sequence[SpecCoverage]) -> float:
    total = sum(len(s.transitions) for s in report)
    return 100.0 * sum(len(s.exercised) for s in report) / total if total else 100.0


# --- the command line --------------------------------------------------------------------


@functools.cache
def _limit_names() -> frozenset[str]:
    return frozenset(SPEC_LIMITS)


def _limit(text: str) -> tuple[str, int]:
    """``--limit maxAuthTries=3``."""
    name, sep, value = text.partition("=")
    if not sep or not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=NUMBER, e.g. maxAuthTries=3")
    if name not in _limit_names():
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown limit {name!r} (the specs have {', '.join(sorted(_limit_names()))})")
    return name, int(value)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of processes, 1 or more")
    return int(text)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("logs", nargs="+", metavar="LOG", help="JSON-lines logs of `sshspec serve`")
    p.add_argument("--limit", type=_limit, action="append", default=[], metavar="NAME=VALUE",
                   help="a limit the server ran with (its config is not in the log); "
                        "default: the specs' defaults")
    p.add_argument("--level", choices=LEVELS, default="debug",
                   help="the log.level the server ran with: codes below it are not in the log")
    p.add_argument("--workers", type=_positive, default=1, metavar="N",
                   help="each log was written by N server processes (serve --workers N)")


def _cmd_check(args: argparse.Namespace) -> int:
    return check_logs(args.logs, limits=dict(args.limit), level=args.level, workers=args.workers,
                      complete=args.complete)


def _cmd_coverage(args: argparse.Namespace) -> int:
    report, status = coverage_logs(args.logs, limits=dict(args.limit), level=args.level,
                                   workers=args.workers)
    if args.json:
        sys.stdout.write(coverage_json(report))
    else:
        sys.stdout.write(format_coverage(report, summary=args.summary))
    if status == EXIT_USAGE:
        return EXIT_USAGE  # a refused record (status 1) is only a warning in a report
    if status == EXIT_VIOLATION:
        print(f"sshspec coverage: a log holds {SPEC_VIOLATION} (above): the server reached a pair "
              "its spec calls impossible", file=sys.stderr)
        return EXIT_FAIL
    if args.fail_under is not None and overall_percent(report) < args.fail_under:
        print(f"sshspec coverage: {overall_percent(report):.1f}% of the transitions, "
              f"under --fail-under {args.fail_under:g}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `check` and `coverage` on the `sshspec` sub-command parser."""
    p = sub.add_parser("check", help="replay server logs against the specs")
    _common(p)
    p.add_argument("--complete", action="store_true",
                   help="also require every machine to end finished (each SSH_CONNECTED has its "
                        "SSH_DISCONNECTED, each channel closed, each request its outcome)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("coverage", help="which spec transitions and codes the logs exercised")
    _common(p)
    p.add_argument("--summary", action="store_true",
                   help="one line per spec, then the transitions not exercised")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.add_argument("--fail-under", type=float, metavar="PCT",
                   help="exit 1 when under PCT%% of all transitions are exercised")
    p.set_defaults(func=_cmd_coverage)
