"""`sshspec check` and `sshspec coverage`: logs made by firing events through the
compiled machines and logging each step's codes the way adapters/server.py does."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshspec.adapters.check import add_commands, coverage_logs, replay_lines
from sshspec.adapters.logs import Labels, Logger
from sshspec.codes import CATALOG
from sshspec.fsm.machine import Machine, Step
from sshspec.fsm.replay import automata, transition_label
from sshspec.fsm.spec import BUNDLED

# Small limits, so random event sequences reach both sides of every guard.
LIMITS = {"maxStartups": 1, "maxAuthTries": 2, "maxSessions": 2, "clientAliveCountMax": 1, "maxEnv": 1}
LIMIT_ARGS = [a for name, value in LIMITS.items() for a in ("--limit", f"{name}={value}")]
SMALL = automata(LIMITS)


class FakeServer:
    """Drives server, connection and session machines and logs their codes with the
    labels adapters/server.py gives them (real Logger, real JSON lines)."""

    def __init__(self, limits: dict[str, int] | None = None, level: str = "debug") -> None:
        self.machines = {name: Machine.load(name, limits) for name in BUNDLED}
        self.out = io.BytesIO()
        self.logger = Logger(stream=self.out, level=level)
        self.server = self.machines["server"].new()
        self.connections: dict[str, object] = {}
        self.sessions: dict[tuple[str, int], object] = {}
        self.next_channel: dict[str, int] = {}

    def fire(self, name: str, instance: object, event: str) -> Step:
        """Fire as the adapter may: a pair the spec calls impossible is one the core
        never fires (it would log SSH_SPEC_VIOLATION, which the check refuses), so it
        is skipped: a step that changes and logs nothing."""
        machine = self.machines[name]
        state = instance.state  # type: ignore[attr-defined]
        if any(s.kind == "impossible" for s in machine.steps(state, event)):
            return Step(state, event, state, "ignore", (), None, (), "skipped")
        return machine.fire(instance, event)

    def _log(self, step: Step, labels: Labels) -> None:
        labels = msgspec.structs.replace(labels, event=step.event)  # as the adapter's fire()
        for code in step.codes:  # what adapters.server.Emitter does
            if self.logger.enabled(CATALOG[code].level):
                self.logger.log(CATALOG[code].level, code, code.lower(), labels)

    def server_event(self, event: str) -> Step:
        step = self.fire("server", self.server, event)
        self._log(step, Labels(remote_addr="127.0.0.1:40000" if event == "accept" else None))
        return step

    def connect(self, cid: str) -> None:
        self.connections[cid] = self.machines["connection"].new()
        self.next_channel[cid] = 0
        self.conn_event(cid, "connected")

    def conn_event(self, cid: str, event: str, *, channel: int | None = None) -> Step:
        if event in ("session_open", "session_open_failed") and channel is None:
            channel = self.next_channel[cid]  # the adapter numbers channels before firing
            self.next_channel[cid] += 1
        step = self.fire("connection", self.connections[cid], event)
        self._log(step, Labels(connection_id=cid, remote_addr="127.0.0.1:40000", username="alice",
                               channel_id=channel))
        if step.codes == ("SSH_NEW_CHANNEL",):
            assert channel is not None
            self.sessions[(cid, channel)] = self.machines["session"].new()
        return step

    def open_channel(self, cid: str) -> int:
        channel = self.next_channel[cid]
        assert self.conn_event(cid, "session_open").codes == ("SSH_NEW_CHANNEL",)
        return channel

    def session_event(self, cid: str, channel: int, event: str) -> Step:
        instance = self.sessions[(cid, channel)]
        step = self.fire("session", instance, event)
        self._log(step, Labels(connection_id=cid, username="alice", channel_id=channel,
                               request_type=event if event in ("exec", "env", "pty_req") else None,
                               exit_code=0 if event == "program_exited" else None))
        if step.moved and step.target == "closed":
            self.conn_event(cid, "channel_closed", channel=channel)  # as SpecSession.connection_lost
        return step

    def login(self, cid: str) -> None:
        self.connect(cid)
        for event in ("auth_begin", "password", "auth_ok", "backend_accepted"):
            self.conn_event(cid, event)

    def finished(self) -> bool:
        instances = [(self.machines["server"], self.server)]
        instances += [(self.machines["connection"], c) for c in self.connections.values()]
        instances += [(self.machines["session"], s) for s in self.sessions.values()]
        return all(i.state in m.final for m, i in instances)  # type: ignore[attr-defined]

    def lines(self) -> list[bytes]:
        return self.out.getvalue().splitlines(keepends=True)


def session_run(fs: FakeServer, cid: str, channel: int) -> None:
    for event in ("pty_req", "request_ok", "exec", "request_ok", "program_exited", "close"):
        fs.session_event(cid, channel, event)


def good_log() -> FakeServer:
    """Two connections, three channels, interleaved; the server starts and stops."""
    fs = FakeServer()
    for event in ("start", "listening", "accept"):
        fs.server_event(event)
    fs.login("c1")
    fs.server_event("accept")
    fs.connect("c2")
    a = fs.open_channel("c1")
    for event in ("auth_begin", "password", "auth_bad", "publickey", "auth_ok", "backend_accepted"):
        fs.conn_event("c2", event)
    b = fs.open_channel("c1")
    c = fs.open_channel("c2")
    fs.session_event("c1", a, "env")
    fs.session_event("c2", c, "exec")
    fs.session_event("c1", b, "shell")
    fs.session_event("c1", a, "request_failed")
    fs.session_event("c2", c, "request_ok")
    fs.session_event("c1", b, "request_ok")
    fs.conn_event("c2", "keepalive_due")
    fs.session_event("c1", b, "program_killed")
    fs.conn_event("c2", "keepalive_answered")
    fs.session_event("c2", c, "program_exited")
    fs.session_event("c1", a, "close")
    fs.session_event("c2", c, "close")
    fs.session_event("c1", b, "close")
    fs.server_event("shutdown")
    fs.conn_event("c1", "shutdown")
    fs.conn_event("c1", "drained")
    fs.conn_event("c2", "lost")
    fs.server_event("drained")
    assert fs.finished()
    return fs


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    status = args.func(args)
    out, err = capsys.readouterr()
    return status, out, err


def write(tmp_path: Path, lines: list[bytes], name: str = "server.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(b"".join(lines))
    return str(path)


def codes_of(lines: list[bytes]) -> list[str]:
    return [json.loads(line)["code"] for line in lines]


# --- check: valid logs


def test_interleaved_log_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = write(tmp_path, good_log().lines())
    status, out, _ = run_cli(capsys, "check", "--complete", log)
    assert status == 0, out
    assert out == f"{log}: ok (32 records, 2 connections, 3 sessions)\n"


def test_each_file_is_replayed_on_its_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The same connection ids in two files are two server processes, not one.
    first = write(tmp_path, good_log().lines(), "a.jsonl")
    second = write(tmp_path, good_log().lines(), "b.jsonl")
    status, out, _ = run_cli(capsys, "check", "--complete", first, second)
    assert status == 0 and out.count(": ok (") == 2


def pick(machine: Machine, instance: object, n: int, moving: bool) -> str:
    """Event number ``n`` of the whole alphabet, or (``moving``) of the events that
    move in the current state, so that random runs get past authentication."""
    events = machine.allowed(instance.state) if moving else []  # type: ignore[attr-defined]
    events = events or list(machine.loaded.spec.events)
    return events[n % len(events)]


ACTION = st.tuples(st.sampled_from(["server", "connect", "login", "open", "refused", "conn", "conn",
                                    *["session"] * 6]),
                   st.integers(0, 7), st.integers(0, 99), st.booleans())


@settings(max_examples=200, deadline=None)
@given(st.lists(ACTION, min_size=10, max_size=100), st.tuples(st.booleans(), st.booleans(), st.booleans()))
def test_any_event_sequence_yields_a_log_check_accepts(actions: list[tuple[str, int, int, bool]],
                                                       wrap_up: tuple[bool, bool, bool]) -> None:
    fs = FakeServer(LIMITS)
    m = fs.machines
    for kind, which, n, moving in actions:
        connections, sessions = list(fs.connections), list(fs.sessions)
        if kind == "server":
            fs.server_event(pick(m["server"], fs.server, n, moving))
        elif kind == "connect" or (kind in ("login", "open", "conn", "refused") and not connections):
            fs.connect(f"c{len(connections)}")
        elif kind == "login":  # a shortcut to where channels open (or not, in another state)
            for event in ("auth_begin", "password", "auth_ok", "backend_accepted"):
                fs.conn_event(connections[which % len(connections)], event)
        elif kind == "open":
            fs.conn_event(connections[which % len(connections)], "session_open")
        elif kind == "conn":
            cid = connections[which % len(connections)]
            fs.conn_event(cid, pick(m["connection"], fs.connections[cid], n, moving))
        elif kind == "refused":  # opened, then the backend fails it (same channel id)
            cid = connections[which % len(connections)]
            channel = fs.next_channel[cid]
            if fs.conn_event(cid, "session_open").codes == ("SSH_NEW_CHANNEL",):
                del fs.sessions[(cid, channel)]
                fs.conn_event(cid, "session_open_failed", channel=channel)
        elif not sessions:  # no channel yet: log one in and open one
            fs.login(f"c{len(connections)}")
            fs.open_channel(f"c{len(connections)}")
        else:
            cid, channel = sessions[which % len(sessions)]
            fs.session_event(cid, channel, pick(m["session"], fs.sessions[(cid, channel)], n, moving))
    # Often end what is open, so that --complete is exercised both ways.
    close_sessions, close_connections, stop_server = wrap_up
    for cid, channel in list(fs.sessions) if close_sessions else []:
        fs.session_event(cid, channel, "close")
    for cid in list(fs.connections) if close_connections else []:
        fs.conn_event(cid, "lost")
    for event in ("start", "listening", "shutdown", "drained") if stop_server else ():
        fs.server_event(event)
    lines = fs.lines()
    plain = replay_lines("log", lines, SMALL)
    assert plain.status == 0, (plain.problems, codes_of(lines))
    complete = replay_lines("log", lines, SMALL, complete=True)
    assert (complete.status == 0) == fs.finished(), (complete.problems, codes_of(lines))


def test_workers_share_one_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # serve --workers 2: two processes append to one file; the server records carry
    # nothing that tells the workers apart, the connection ids do.
    one, two = small_log().lines(), small_log().lines()
    two = [line.replace(b'"c1"', b'"w2-c1"') for line in two]
    lines = [one[0], two[0], *one[1:4], *two[1:], *one[4:]]
    log = write(tmp_path, lines)
    status, out, _ = run_cli(capsys, "check", "--workers", "2", "--complete", log)
    assert (status, out) == (0, f"{log}: ok (32 records, 2 connections, 2 sessions)\n")
    status, out, _ = run_cli(capsys, "check", log)
    assert (status, out) == (1, (f"{log}:2: server: in state(s) available, the spec allows "
                                 "SSH_ALREADY_RUNNING, SSH_PENALTY, SSH_PENALTY_ACTIVE, "
                                 "SSH_PENALTY_TABLE_FULL, SSH_PROXY_HEADER, SSH_PROXY_HEADER_INVALID, "
                                 "SSH_SHUTTING_DOWN, SSH_SOURCE_PENALISED, SSH_SOURCE_STARTUPS_EXCEEDED, "
                                 "SSH_STARTUPS_EARLY_DROP, SSH_STARTUPS_EXCEEDED, "
                                 "saw SSH_AVAILABLE (event listening)\n"))
    status, out, _ = run_cli(capsys, "check", "--workers", "3", "--complete", log)
    assert status == 1 and "server (one of 3 workers): in state(s) created, " in out


def test_limits_come_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fs = FakeServer({"maxAuthTries": 2})
    fs.connect("c1")
    for event in ("auth_begin", "password", "auth_bad", "kbdint_begin", "auth_bad", "password"):
        fs.conn_event("c1", event)
    lines = fs.lines()
    assert codes_of(lines)[-3:] == ["SSH_AUTH_TOO_MANY_TRIES", "SSH_HANDSHAKE_FAILED", "SSH_DISCONNECTED"]
    log = write(tmp_path, lines)
    status, out, _ = run_cli(capsys, "check", "--limit", "maxAuthTries=2", log)
    assert status == 0, out
    status, out, _ = run_cli(capsys, "check", log)  # the default, 6 tries
    assert status == 1
    assert out == (f"{log}:7: connection (c1): in state(s) authenticating, the spec allows "
                   "SSH_AUTH_ATTEMPT, SSH_AUTH_NONE, SSH_AUTH_PENALISED, SSH_AUTH_QUERY, "
                   "SSH_AUTH_UNAVAILABLE, SSH_BUFFER_EXCEEDED, SSH_HANDSHAKE_ABANDONED, "
                   "SSH_HANDSHAKE_FAILED, SSH_LOGIN_TIMEOUT, saw SSH_AUTH_TOO_MANY_TRIES (event password)\n")
    with pytest.raises(SystemExit) as exc:
        run_cli(capsys, "check", "--limit", "maxNope=2", log)
    assert exc.value.code == 2 and "unknown limit 'maxNope'" in capsys.readouterr().err


def test_log_level_hides_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fs = FakeServer(level="info")  # SSH_CONNECTED, SSH_DISCONNECTED, the channel codes are debug
    fs.login("c1")
    session_run(fs, "c1", fs.open_channel("c1"))
    fs.conn_event("c1", "lost")
    log = write(tmp_path, fs.lines())
    assert run_cli(capsys, "check", "--level", "info", log)[0] == 0
    status, out, _ = run_cli(capsys, "check", log)
    assert status == 1 and out.startswith(f"{log}:1: connection (c1): in state(s) accepted, the spec "
                                          "allows SSH_CONNECTED, saw SSH_AUTH_SUCCESSFUL")


# --- check: doctored logs


def doctored(tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[bytes],
             *options: str) -> tuple[int, str]:
    status, out, _ = run_cli(capsys, "check", *options, write(tmp_path, lines))
    return status, out.replace(str(tmp_path / "server.jsonl"), "LOG")


def index(lines: list[bytes], code: str, connection: str | None = None, nth: int = 0) -> int:
    found = [i for i, line in enumerate(lines) if json.loads(line)["code"] == code
             and (connection is None or json.loads(line)["labels"].get("connectionId") == connection)]
    return found[nth]


def test_deleted_disconnected_fails_complete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = good_log().lines()
    del lines[index(lines, "SSH_DISCONNECTED", "c2")]
    assert doctored(tmp_path, capsys, lines)[0] == 0  # every record is still allowed
    # c2's last record left is a keepalive, which a silent shutdown may have preceded.
    assert doctored(tmp_path, capsys, lines, "--complete") == (1, (
        "LOG: connection (c2): in state(s) established, draining at the end of the log, "
        "not in a final state (closed) with nothing due\n"))


def test_deleted_last_code_of_a_step_fails_complete(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    fs = good_log()
    fs.connect("c3")
    fs.conn_event("c3", "protocol_error")  # SSH_HANDSHAKE_FAILED, SSH_DISCONNECTED
    lines = fs.lines()
    assert codes_of(lines[-2:]) == ["SSH_HANDSHAKE_FAILED", "SSH_DISCONNECTED"]
    assert doctored(tmp_path, capsys, lines[:-1], "--complete") == (1, (
        "LOG: connection (c3): in state(s) closed (SSH_DISCONNECTED still due) at the end of the log, "
        "not in a final state (closed) with nothing due\n"))


def test_deleted_channel_close_fails_complete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = good_log().lines()
    del lines[index(lines, "SSH_CHANNEL_CLOSED", "c2")]
    assert doctored(tmp_path, capsys, lines, "--complete") == (1, (
        "LOG: session (c2/0): in state(s) exited at the end of the log, "
        "not in a final state (closed) with nothing due\n"))


def test_exit_status_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = good_log().lines()
    at = index(lines, "SSH_EXIT")
    lines.insert(at + 1, lines[at])
    assert doctored(tmp_path, capsys, lines) == (1, (
        f"LOG:{at + 2}: session (c2/0): in state(s) exited, the spec allows SSH_CHANNEL_CLOSED, "
        "SSH_CHANNEL_DATA_AFTER_EOF, SSH_CHANNEL_REQUEST, SSH_EXIT_CODE_FAILED, SSH_REPLY_SEND_FAILED, "
        "saw SSH_EXIT (event program_exited)\n"))


def test_channel_before_authentication(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = good_log().lines()
    channel = lines.pop(index(lines, "SSH_NEW_CHANNEL", "c1"))
    at = index(lines, "SSH_HANDSHAKE_SUCCESSFUL", "c1")
    lines.insert(at, channel)
    assert doctored(tmp_path, capsys, lines) == (1, (
        f"LOG:{at + 1}: connection (c1): in state(s) authenticated, the spec allows "
        "SSH_BACKEND_REJECTED_HANDSHAKE, SSH_BUFFER_EXCEEDED, SSH_HANDSHAKE_FAILED, "
        "SSH_HANDSHAKE_SUCCESSFUL, SSH_LOGIN_TIMEOUT, saw SSH_NEW_CHANNEL (event session_open)\n"))


def test_request_outcome_without_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = good_log().lines()
    at = index(lines, "SSH_CHANNEL_REQUEST_SUCCESSFUL", "c2")
    lines.insert(at + 1, lines[at])  # the outcome twice: the second has no request
    # The records name their events: the exec started, the program runs.
    assert doctored(tmp_path, capsys, lines) == (1, (
        f"LOG:{at + 2}: session (c2/0): in state(s) running, the spec allows SSH_CHANNEL_CLOSED, "
        "SSH_CHANNEL_DATA_AFTER_EOF, SSH_CHANNEL_EOF, SSH_CHANNEL_REQUEST, SSH_EXIT, SSH_EXIT_SIGNAL, "
        "SSH_REPLY_SEND_FAILED, saw SSH_CHANNEL_REQUEST_SUCCESSFUL (event request_ok)\n"))


def test_swapped_records_of_one_connection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = good_log().lines()
    auth = index(lines, "SSH_AUTH_SUCCESSFUL", "c2")
    handshake = index(lines, "SSH_HANDSHAKE_SUCCESSFUL", "c2")
    lines[auth], lines[handshake] = lines[handshake], lines[auth]
    assert doctored(tmp_path, capsys, lines) == (1, (
        f"LOG:{auth + 1}: connection (c2): in state(s) checking, the spec allows SSH_AUTH_CERT_REFUSED, "
        "SSH_AUTH_CHALLENGE, "
        "SSH_AUTH_FAILED, SSH_AUTH_SUCCESSFUL, SSH_AUTH_UNAVAILABLE, SSH_BUFFER_EXCEEDED, "
        "SSH_HANDSHAKE_FAILED, SSH_LOGIN_TIMEOUT, saw SSH_HANDSHAKE_SUCCESSFUL (event backend_accepted)\n"))


def test_session_records_of_a_channel_never_opened(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    lines = good_log().lines()
    del lines[index(lines, "SSH_NEW_CHANNEL", "c2")]
    at = index(lines, "SSH_CHANNEL_REQUEST", "c2")
    assert doctored(tmp_path, capsys, lines) == (1, (
        f"LOG:{at + 1}: session (c2/0): the channel was never opened (no SSH_NEW_CHANNEL before), "
        "saw SSH_CHANNEL_REQUEST\n"))


# --- check: corrupt input


@pytest.mark.parametrize(("line", "reason"), [
    (b"not json\n", "corrupt record: JSON is malformed"),
    (b'{"code": "SSH_CONNECTED"}\n', "corrupt record: Object missing required field `timestamp`"),
    (b'{"timestamp":"2026-11-28T10:37:26.123456Z","level":"info","code":"SSH_NOPE","message":"",'
     b'"labels":{}}\n', "corrupt record: unknown code 'SSH_NOPE' (not in the catalog)"),
    (b'{"timestamp":"2026-11-28T10:37:26.123456Z","level":"debug","code":"SSH_EXIT","message":"",'
     b'"labels":{"channelId":0}}\n',
     "corrupt record: SSH_EXIT is a session code, but the record has no connectionId"),
    (b'{"timestamp":"2026-11-28T10:37:26.123456Z","level":"debug","code":"SSH_EXIT","message":"",'
     b'"labels":{"connectionId":"c1"}}\n',
     "corrupt record: SSH_EXIT is a session code, but the record has no channelId"),
])
def test_corrupt_line_exits_2_with_its_number(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             line: bytes, reason: str) -> None:
    lines = good_log().lines()
    lines.insert(3, line)
    status, out = doctored(tmp_path, capsys, lines)
    assert status == 2
    assert out.startswith(f"LOG:4: {reason}"), out
    assert out.count("\n") == 1


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, good_log().lines())
    status, out, err = run_cli(capsys, "check", str(tmp_path / "nope.jsonl"), good)
    assert status == 2
    assert err == f"sshspec: {tmp_path / 'nope.jsonl'}: cannot read: No such file or directory\n"
    assert out.startswith(f"{good}: ok")  # the other file is still checked


# --- coverage


def small_log() -> FakeServer:
    fs = FakeServer()
    for event in ("start", "listening", "accept"):
        fs.server_event(event)
    fs.login("c1")
    session_run(fs, "c1", fs.open_channel("c1"))
    fs.conn_event("c1", "lost")
    fs.server_event("shutdown")
    fs.server_event("drained")
    return fs


# What the small log exercises: its records name their events, so exactly the
# path it took (and the silent moves on it: auth_begin, channel_closed).
EXPECTED = {
    "server": {"created --start--> starting", "starting --listening / SSH_AVAILABLE--> available",
               "available --accept [startups < maxStartups]--> available",
               # a silent counter move a surviving configuration took (fsm/replay.py), as accept's
               "available --proxy_connect [proxyHeaders < maxStartups]--> available",
               "available --shutdown / SSH_SHUTTING_DOWN--> draining",
               "draining --drained / SSH_STOPPED--> stopped"},
    "connection": {"accepted --connected / SSH_CONNECTED--> handshaking",
                   "handshaking --auth_begin / SSH_KEX_DONE--> authenticating",
                   "authenticating --password [authTries < maxAuthTries] / SSH_AUTH_ATTEMPT--> checking",
                   "checking --auth_ok / SSH_AUTH_SUCCESSFUL--> authenticated",
                   "authenticated --backend_accepted / SSH_HANDSHAKE_SUCCESSFUL--> established",
                   "established --session_open [openChannels < maxSessions] / SSH_NEW_CHANNEL--> established",
                   "established --channel_closed--> established",
                   "established --lost / SSH_DISCONNECTED--> closed"},
    "session": {"setup --pty_req / SSH_CHANNEL_REQUEST--> setup_pending",
                "setup_pending --request_ok / SSH_CHANNEL_REQUEST_SUCCESSFUL--> setup",
                "setup --exec / SSH_CHANNEL_REQUEST--> starting",
                "starting --request_ok / SSH_CHANNEL_REQUEST_SUCCESSFUL--> running",
                "running --program_exited / SSH_EXIT--> exited",
                "exited --close / SSH_CHANNEL_CLOSED--> closed"},
    "forward": set(),  # the small log forwards nothing
    "container": set(),  # the small log runs no docker backend
}
CODES_SEEN = {
    "server": {"SSH_AVAILABLE", "SSH_SHUTTING_DOWN", "SSH_STOPPED"},
    "connection": {"SSH_CONNECTED", "SSH_KEX_DONE", "SSH_AUTH_ATTEMPT", "SSH_AUTH_SUCCESSFUL",
                   "SSH_HANDSHAKE_SUCCESSFUL", "SSH_NEW_CHANNEL", "SSH_DISCONNECTED"},
    "session": {"SSH_CHANNEL_REQUEST", "SSH_CHANNEL_REQUEST_SUCCESSFUL", "SSH_EXIT", "SSH_CHANNEL_CLOSED"},
    "forward": set(),
    "container": set(),
}


def test_coverage_of_a_known_log(tmp_path: Path) -> None:
    report, status = coverage_logs([write(tmp_path, small_log().lines())])
    assert status == 0
    for spec in report:
        credited = {transition_label(t) for i, t in enumerate(spec.transitions) if i in spec.exercised}
        assert credited == EXPECTED[spec.name], spec.name
        assert spec.codes_seen == CODES_SEEN[spec.name]


def test_coverage_summary_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = write(tmp_path, small_log().lines())
    machines = automata()
    totals = {name: (len(a.transitions), len(a.codes)) for name, a in machines.items()}
    status, out, _ = run_cli(capsys, "coverage", "--summary", log)
    assert status == 0
    lines = out.splitlines()
    for line, name in zip(lines, BUNDLED, strict=False):
        n, total = len(EXPECTED[name]), totals[name][0]
        assert line == (f"{name}: {n}/{total} transitions ({100 * n / total:.1f}%), "
                        f"{len(CODES_SEEN[name])}/{totals[name][1]} codes")
    assert lines[len(BUNDLED)] == "not exercised:"
    missing = sum(t for t, _ in totals.values()) - sum(len(e) for e in EXPECTED.values())
    assert len(lines) == len(BUNDLED) + 1 + missing
    assert "  server: starting --bind_failed / SSH_START_FAILED--> failed" in lines

    status, out, _ = run_cli(capsys, "coverage", "--json", log)
    report = json.loads(out)
    assert [s["machine"] for s in report["specs"]] == list(BUNDLED)
    session = report["specs"][2]
    assert {t["label"] for t in session["exercised"]} == EXPECTED["session"]
    assert session["transitions"]["exercised"] == len(EXPECTED["session"])
    assert set(session["codes_seen"]) == CODES_SEEN["session"]

    assert run_cli(capsys, "coverage", "--fail-under", "99", log)[0] == 1
    assert run_cli(capsys, "coverage", "--fail-under", "1", log)[0] == 0


def test_a_spec_violation_fails_check_and_coverage(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A record of an impossible pair is never a warning: check and coverage both fail."""
    lines = small_log().lines()
    at = index(lines, "SSH_EXIT")
    out = io.BytesIO()
    Logger(stream=out).log("error", "SSH_SPEC_VIOLATION", "impossible", Labels(
        connection_id="c1", channel_id=0, event="program_exited",
        reason="session: event 'program_exited' in state 'exited' is impossible (impossible[7])"))
    lines.insert(at + 1, out.getvalue())
    log = write(tmp_path, lines)
    status, out_text, _ = run_cli(capsys, "check", log)
    assert status == 1
    assert f"{log}:{at + 2}: SSH_SPEC_VIOLATION: session: event 'program_exited' in state 'exited'" \
        in out_text
    status, _, err = run_cli(capsys, "coverage", "--summary", log)
    assert status == 1 and "SSH_SPEC_VIOLATION" in err


def test_coverage_warns_about_refused_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = small_log().lines()
    at = index(lines, "SSH_EXIT")
    lines.insert(at, lines[at + 1])  # SSH_CHANNEL_CLOSED before SSH_EXIT
    status, out, err = run_cli(capsys, "coverage", "--summary", write(tmp_path, lines))
    assert status == 0 and out.startswith("server: ")
    assert f":{at + 2}: session (c1/0): in state(s) closed" in err
    assert "(coverage counts this file up to here)" in err


def test_a_log_in_a_limits_folder_replays_with_those_limits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sshspec.adapters.check import limits_for
    folder = tmp_path / "maxAuthTries=3,maxSessions=2"
    folder.mkdir()
    assert limits_for(str(folder / "a.jsonl"), {"maxEnv": 5}) == {
        "maxEnv": 5, "maxAuthTries": 3, "maxSessions": 2}
    assert limits_for(str(tmp_path / "b.jsonl"), None) == {}
