"""The sans-I/O core in-process, in the world the live server lives in: no network,
thousands of sequences.

The same rule-based model as tests/test_fuzz_live.py: protocol_client.Oracle hands
the server's own core (fsm/core.py) the events the adapter would, and answers its
actions the way the world does (the backend's verdicts, asyncssh's rules before
any hook, a client that drops). Where the live server decides timing, here the
rules do: a start's verdict, a close's effect, a program's end, keepalives, the
login timeout, a shutdown come as separate steps in any order. (The compiled
tables against the `transitions` reference: tests/test_core.py.)

Spec-level properties, checked after every step (tests/test_core.py checks some
on single machines with random event lists; these are the composed versions):
exactly one SSH_DISCONNECTED per SSH_CONNECTED, and only once closed; nothing
about channels or global requests before the handshake succeeded; a program
starts at most once per channel; its exit status (or signal) at most once and
never after the channel closed; every SSH_CHANNEL_REQUEST gets exactly one
outcome, and every want-reply request exactly one reply (or a logged
SSH_REPLY_SEND_FAILED) once it is answered; the connection's openChannels is
the number of live session machines, never above maxSessions; and no pair the
specs call impossible is ever reached (no SSH_SPEC_VIOLATION).

Profiles (env SSHSPEC_FUZZ_PROFILE): ci (default, derandomized) and long.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from protocol_client import (  # noqa: E402
    AUTHS,
    FUZZ_LIMITS,
    REQUESTS,
    Auth,
    CompiledDriver,
    Oracle,
    Req,
    SessionModel,
    request_groups,
)

ROOT = Path(__file__).resolve().parent.parent
PROFILE = os.environ.get("SSHSPEC_FUZZ_PROFILE", "ci")

settings.register_profile(
    "sshspec-engine-ci", max_examples=2000, stateful_step_count=40, derandomize=True, database=None,
    deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile(
    "sshspec-engine-long", max_examples=30000, stateful_step_count=80, deadline=None,
    database=DirectoryBasedExampleDatabase(str(ROOT / ".hypothesis" / "examples")),
    suppress_health_check=list(HealthCheck))
ENGINE_SETTINGS = settings.get_profile(f"sshspec-engine-{PROFILE}")

COMPILED = CompiledDriver(FUZZ_LIMITS)
ANY_REQUEST = st.sampled_from(request_groups(REQUESTS)).flatmap(st.sampled_from)
PREAUTH_OK = ("SSH_CONNECTED", "SSH_AUTH_FAILED", "SSH_AUTH_UNAVAILABLE", "SSH_AUTH_SUCCESSFUL",
              "SSH_AUTH_TOO_MANY_TRIES", "SSH_HANDSHAKE_FAILED", "SSH_LOGIN_TIMEOUT", "SSH_DISCONNECTED",
              "SSH_BACKEND_REJECTED_HANDSHAKE", "SSH_AUTH_ATTEMPT", "SSH_AUTH_QUERY", "SSH_AUTH_PK_OK",
              "SSH_AUTH_CHALLENGE", "SSH_AUTH_NONE", "SSH_KEX_DONE")
EXITS = ("SSH_EXIT", "SSH_EXIT_SIGNAL")
OUTCOMES = ("SSH_CHANNEL_REQUEST_SUCCESSFUL", "SSH_CHANNEL_REQUEST_FAILED")
SETTLED = ("setup", "running", "exited", "closed")


class EngineFuzz(RuleBasedStateMachine):
    """One connection, driven through the core."""

    def __init__(self) -> None:
        super().__init__()
        self.compiled = self.oracle()
        self.chans: list[int] = []  # the client's channel numbers, as opened
        self.want_replies: dict[int, int] = {}  # want-reply requests sent, per channel
        self.stats = type(self).stats
        self.steps = 0  # in this connection

    # -- plumbing

    @staticmethod
    def oracle() -> Oracle:
        compiled = Oracle(COMPILED)
        # The client's answer to a server's CLOSE is a step of its own (close_takes_effect),
        # so a session stays `exited` for a while.
        compiled.answer_close = False
        return compiled

    def both(self, action: Any) -> None:
        """Do one client action / server event (the name is from when a reference ran beside it)."""
        action(self.compiled)

    def session(self, i: int, *, usable: bool = True) -> int | None:
        """A channel the server confirmed: an open one, or (``usable=False``) any."""
        confirmed = list(self.compiled.sessions)
        open_ = [k for k in confirmed if not self.compiled.sessions[k].client_close]
        pool = open_ if (usable and open_) else confirmed
        return pool[i % len(pool)] if pool else None

    def alive(self) -> bool:
        return not self.compiled.transport_gone

    def has_session(self) -> bool:
        return self.alive() and bool(self.compiled.sessions)

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1
        self.steps += 1

    def settled_in(self) -> bool:
        """Rules that end the connection wait a few steps, or nothing else gets a chance."""
        return self.alive() and self.steps >= 8

    # -- client actions (as in the live fuzzer)

    @initialize(how=st.sampled_from(["password", "publickey", "none"]), sessions=st.integers(0, 2))
    def connect(self, how: str, sessions: int) -> None:
        self.steps = 0
        self.both(lambda o: (o.connected(), o.service_request()))
        if how != "none":
            a = next(a for a in AUTHS if a.method == how and a.verdict == "ok")
            self.both(lambda o: o.auth(a))
            for _ in range(sessions):
                self.open_channel("session")

    @precondition(lambda self: self.alive())
    @rule(a=st.sampled_from(AUTHS))
    def auth(self, a: Auth) -> None:
        self.count(f"auth {a.method}")
        self.both(lambda o: o.auth(a))

    @precondition(lambda self: self.alive())
    @rule()
    def service_request(self) -> None:
        self.both(lambda o: o.service_request())

    @precondition(lambda self: self.alive())
    @rule(malformed=st.booleans(), want_reply=st.booleans())
    def global_request(self, malformed: bool, want_reply: bool) -> None:
        self.count("global request")
        self.both(lambda o: o.global_request(malformed=malformed, want_reply=want_reply))

    @precondition(lambda self: self.alive() and len(self.chans) < 8)
    @rule(kind=st.sampled_from(["session", "session", "other", "malformed"]))
    def open_channel(self, kind: str) -> None:
        chan = len(self.chans)
        self.chans.append(chan)
        self.count(f"open {kind}")
        self.both(lambda o: o.open_channel(chan, session=kind == "session", malformed=kind == "malformed"))

    @precondition(lambda self: self.has_session())
    @rule(i=st.integers(0, 7), req=ANY_REQUEST, want_reply=st.booleans(), settle=st.booleans())
    def request(self, i: int, req: Req, want_reply: bool, settle: bool) -> None:
        """A request arrives; a start's verdict comes now (settle) or in a later step."""
        chan = self.session(i, usable=i < 7)
        assert chan is not None
        req = req.replying(want_reply)
        self.count(f"request {req.event}")
        if want_reply and not self.compiled.sessions[chan].client_close:
            self.want_replies[chan] = self.want_replies.get(chan, 0) + 1
        self.both(lambda o: o.request(chan, req) if settle else o.request_arrives(chan, req))

    request_2 = request
    request_3 = request

    @precondition(lambda self: any(s.pending_start is not None for s in self.compiled.sessions.values()))
    @rule(i=st.integers(0, 7))
    def start_verdict(self, i: int) -> None:
        """The backend decided a pending start; the core answers it and moves on."""
        pending = [k for k, s in self.compiled.sessions.items() if s.pending_start is not None]
        chan = pending[i % len(pending)]
        self.count("start verdict")
        self.both(lambda o: o.resolve_start(o.sessions[chan]))

    @precondition(lambda self: self.has_session())
    @rule(i=st.integers(0, 7))
    def eof(self, i: int) -> None:
        chan = self.session(i, usable=i < 7)
        self.count("eof")
        self.both(lambda o: o.eof(chan))

    @precondition(lambda self: self.has_session())
    @rule(i=st.integers(0, 7))
    def data(self, i: int) -> None:
        chan = self.session(i, usable=i < 7)
        self.both(lambda o: o.data(chan))

    @precondition(lambda self: self.has_session())
    @rule(i=st.integers(0, 7), now=st.booleans())
    def close(self, i: int, now: bool) -> None:
        """The client closes: the server answers at once, the session closes now or later
        (close_takes_effect: asyncssh cleans the channel up on a later loop turn)."""
        chan = self.session(i, usable=i < 7)
        assert chan is not None
        self.count("close")
        if now:
            self.both(lambda o: o.close(chan))
        else:
            def arrives(o: Oracle) -> None:
                s = o._channel(chan)
                if s is not None:
                    o.close_arrives(s)
            self.both(arrives)

    @precondition(lambda self: any(s.server_closed and not s.closed and not self.compiled.lost
                                   for s in self.compiled.sessions.values()))
    @rule(i=st.integers(0, 7))
    def close_takes_effect(self, i: int) -> None:
        """asyncssh cleans the closed channel up: the session machine gets its close."""
        due = [k for k, s in self.compiled.sessions.items() if s.server_closed and not s.closed]
        chan = due[i % len(due)]
        self.count("close effect")

        def effect(o: Oracle) -> None:
            s = o.sessions[chan]
            s.client_close = True  # the client answered (or sent) CLOSE
            o._session_close(s)
        self.both(effect)

    @precondition(lambda self: self.settled_in())
    @rule(how=st.sampled_from(["drop", "protocol_error"]))
    def disconnect(self, how: str) -> None:
        self.count(how)
        self.both(lambda o: o.drop() if how == "drop" else o.protocol_error())

    @precondition(lambda self: self.compiled.lost)
    @rule()
    def reconnect(self) -> None:
        """The connection is over; a new one (its own machines) starts."""
        self.finish()
        self.count("reconnect")
        self.compiled = self.oracle()
        self.chans, self.want_replies = [], {}
        self.connect("password", 1)

    # -- what happens by itself

    @precondition(lambda self: any(s.program is not None and not s.ended and not s.closed
                                   for s in self.compiled.sessions.values()))
    @rule(i=st.integers(0, 7), end=st.sampled_from([("exit", 0), ("exit", 3), ("signal", "KILL")]))
    def program_ends(self, i: int, end: tuple[str, Any]) -> None:
        """A program ends, whenever (due or not: programs crash)."""
        running = [k for k, s in self.compiled.sessions.items()
                   if s.program is not None and not s.ended and not s.closed]
        chan = running[i % len(running)]
        self.count("program end")
        self.both(lambda o: o.program_end(chan, *end))

    @precondition(lambda self: self.settled_in())
    @rule(answered=st.booleans())
    def keepalive(self, answered: bool) -> None:
        self.count("keepalive")
        self.both(lambda o: o.keepalive(answered))

    @precondition(lambda self: self.settled_in())
    @rule()
    def login_timeout(self) -> None:
        self.both(lambda o: o.login_timeout())

    @precondition(lambda self: self.alive())
    @rule()
    def global_reply_fails(self) -> None:
        self.both(lambda o: o.global_reply_failed())

    @precondition(lambda self: self.settled_in())
    @rule()
    def shutdown(self) -> None:
        self.count("shutdown")
        self.both(lambda o: o.shutdown())

    # -- the properties

    @invariant()
    def no_spec_violation(self) -> None:
        for key, codes in self.compiled.log.items():
            assert "SSH_SPEC_VIOLATION" not in codes, (key, codes, self.compiled.trace[-6:])

    @invariant()
    def one_disconnected_per_connected(self) -> None:
        log = self.compiled.log["conn"]
        assert log.count("SSH_CONNECTED") == 1
        assert log.count("SSH_DISCONNECTED") <= 1
        assert (log.count("SSH_DISCONNECTED") == 1) == (self.compiled.state == "closed"), log
        if "SSH_DISCONNECTED" in log:
            assert log[-1] == "SSH_DISCONNECTED", log

    @invariant()
    def nothing_about_channels_before_auth(self) -> None:
        log = self.compiled.log["conn"]
        done = log.index("SSH_HANDSHAKE_SUCCESSFUL") if "SSH_HANDSHAKE_SUCCESSFUL" in log else len(log)
        assert set(log[:done]) <= set(PREAUTH_OK), log
        if done == len(log):
            assert not self.compiled.sessions

    @invariant()
    def open_channels_are_the_live_sessions(self) -> None:
        o = self.compiled
        if o.state in ("established", "draining"):
            live = len(o.open_sessions())
            assert o.conn.counters()["openChannels"] == live, o.trace[-6:]
            assert live <= FUZZ_LIMITS["maxSessions"]

    @invariant()
    def each_session_keeps_its_promises(self) -> None:
        for chan, s in self.compiled.sessions.items():
            self.check_session(chan, s, self.compiled.log[("session", s.server_id)])

    def check_session(self, chan: int, s: SessionModel, log: list[str]) -> None:
        assert s.starts <= 1, f"the program started {s.starts} times"
        exits = [i for i, code in enumerate(log) if code in EXITS]
        assert len(exits) <= 1, f"{len(exits)} exit statuses: {log}"
        if "SSH_CHANNEL_CLOSED" in log:
            assert log.count("SSH_CHANNEL_CLOSED") == 1
            assert not exits or exits[0] < log.index("SSH_CHANNEL_CLOSED"), log
        if exits:
            assert s.starts, "an exit status without a program"
        # Every SSH_CHANNEL_REQUEST gets exactly one outcome: at most one is pending.
        pending = log.count("SSH_CHANNEL_REQUEST") - sum(log.count(c) for c in OUTCOMES)
        assert pending in (0, 1), log
        if s.inst.state in SETTLED:
            assert pending == 0, (s.inst.state, log)
        # Every want-reply request gets one reply (or a logged failure to send it) once answered.
        answered = len(self.compiled.wire.get(("chan", chan), [])) + log.count("SSH_REPLY_SEND_FAILED")
        sent = self.want_replies.get(chan, 0)
        assert answered <= sent, (answered, sent, log)
        if not s.queue and s.session.replying is None and s.pending_start is None \
                and not self.compiled.transport_gone:
            assert answered == sent, (answered, sent, log)

    def finish(self) -> None:
        """End the connection (the client goes away) and check how it ended."""
        if not self.compiled.lost:
            self.both(lambda o: o.drop())
        self.one_disconnected_per_connected()
        self.no_spec_violation()
        for s in self.compiled.sessions.values():
            assert s.closed and s.inst.state == "closed"

    def teardown(self) -> None:
        self.finish()


@pytest.mark.timeout(600 if PROFILE == "ci" else 0)
def test_the_core_keeps_the_spec_properties_in_its_world() -> None:
    stats: dict[str, int] = {}
    machine = type("EngineFuzzRun", (EngineFuzz,), {"stats": stats})
    run_state_machine_as_test(machine, settings=ENGINE_SETTINGS)
    print(f"\nengine fuzz ({PROFILE}): {sum(stats.values())} steps: "
          + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
    for what in ("open session", "request exec", "start verdict", "program end", "close effect", "shutdown",
                 "keepalive", "request env", "auth password"):
        assert stats.get(what, 0) > 0, what
