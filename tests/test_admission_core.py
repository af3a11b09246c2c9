"""Per-source admission in the sans-I/O core, driven deterministically: the times
and the random early drop's draws are handed in, as the adapter hands them.

What is modelled on OpenSSH 9.8 (sshd.c's should_drop_connection, srclimit.c)
is checked against the same arithmetic written out here; the live side is
tests/test_admission.py.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sshspec.fsm import core

P = core.Penalty


@dataclass
class ServerLog:
    records: list[tuple[str, str, str | None, str | None]] = field(default_factory=list)

    def __call__(self, codes: tuple[str, ...], event: str, reason: str | None,
                 remote_addr: str | None) -> None:
        for code in codes:
            self.records.append((code, str(event), reason, remote_addr))

    def codes(self) -> list[str]:
        return [code for code, *_ in self.records]


@functools.cache
def machines(full: int | None = None) -> core.Machines:
    return core.Machines.load({"maxStartups": full} if full is not None else {})


def server(limits: dict[str, int] | None = None, **policy: Any) -> tuple[core.ServerCore, ServerLog]:
    log = ServerLog()
    srv = core.ServerCore(machines((limits or {}).get("maxStartups")), log, core.AdmissionPolicy(**policy))
    srv.handle(core.ServerEvent.start)
    srv.handle(core.ServerEvent.listening)
    log.records.clear()  # SSH_AVAILABLE
    return srv, log


def arrive(srv: core.ServerCore, host: str | None, now: float = 0.0, draw: float = 0.99) -> core.Admission:
    return srv.admit(core.Arrival(host, now, draw, f"{host}:1234"))


PENALTIES = {P.authfail: 5.0, P.noauth: 1.0, P.grace_exceeded: 10.0, P.protocol_error: 5.0}


# --- random early drop: OpenSSH's MaxStartups start:rate:full -----------------------------------


def openssh_drops(startups: int, start: int, rate: int, full: int, r: int) -> bool:
    """sshd.c's should_drop_connection, its integer arithmetic, r = arc4random_uniform(100)."""
    if startups < start:
        return False
    if startups >= full:
        return True
    if rate == 100:
        return True
    p = 100 - rate
    p *= startups - start
    p //= full - start
    p += rate
    return r < p


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(start=st.integers(0, 12), rate=st.integers(1, 100), extra=st.integers(0, 12), r=st.integers(0, 99),
       startups=st.integers(0, 30))
def test_random_early_drop_is_openssh_arithmetic(start: int, rate: int, extra: int, r: int,
                                                 startups: int) -> None:
    full = start + extra
    if full < 1:
        return
    srv, log = server({"maxStartups": full}, early_drop_start=start, early_drop_rate=rate)
    srv.instance.startups = min(startups, full)  # what earlier admissions left (the spec caps it at full)
    n = srv.instance.startups
    # A draw in the middle of OpenSSH's r-th hundredth, away from the float/integer boundary.
    reply = arrive(srv, "192.0.2.1", draw=(r + 0.5) / 100).reply
    expected = openssh_drops(n, start, rate, full, r)
    p_exact = (rate + (100 - rate) * (n - start) / (full - start)) if start <= n < full else None
    if p_exact is not None and int(p_exact) != p_exact and r == int(p_exact):
        return  # OpenSSH rounds p down to a whole percent; the core keeps the fraction
    assert (reply is core.ServerReply.refuse_connection) == expected
    if expected:
        assert log.codes() == ["SSH_STARTUPS_EXCEEDED" if n >= full else "SSH_STARTUPS_EARLY_DROP"]
    else:
        assert reply is core.ServerReply.admit and log.codes() == []


def test_early_drop_probability_rises_from_rate_at_start_to_all_at_full() -> None:
    srv, log = server({"maxStartups": 10}, early_drop_start=4, early_drop_rate=50)
    for _ in range(4):  # below start: every draw admits
        assert arrive(srv, "192.0.2.1", draw=0.0).reply is core.ServerReply.admit
    assert arrive(srv, "192.0.2.1", draw=0.49).reply is core.ServerReply.refuse_connection  # p = 50%
    assert arrive(srv, "192.0.2.1", draw=0.5).reply is core.ServerReply.admit
    assert srv.instance.startups == 5
    assert arrive(srv, "192.0.2.1", draw=0.58).reply is core.ServerReply.refuse_connection  # p = 58.3%
    assert arrive(srv, "192.0.2.1", draw=0.59).reply is core.ServerReply.admit
    for _ in range(4):
        arrive(srv, "192.0.2.1", draw=0.999)
    assert srv.instance.startups == 10
    assert arrive(srv, "192.0.2.1", draw=0.999).reply is core.ServerReply.refuse_connection  # full
    code, event, reason, addr = log.records[0]
    assert (code, event, addr) == ("SSH_STARTUPS_EARLY_DROP", "early_drop", "192.0.2.1:1234")
    assert reason == "4 unauthenticated connections (maxStartups 4:50:10): dropped with probability 50%"
    assert log.codes() == ["SSH_STARTUPS_EARLY_DROP"] * 2 + ["SSH_STARTUPS_EXCEEDED"]
    srv.startup_done(None)  # one authenticated: below full again
    assert arrive(srv, "192.0.2.1", draw=0.999).reply is core.ServerReply.admit


def test_without_early_drop_the_hard_limit_alone() -> None:
    srv, log = server({"maxStartups": 3})
    assert [arrive(srv, None, draw=0.0).reply for _ in range(4)] == [core.ServerReply.admit] * 3 + [
        core.ServerReply.refuse_connection]
    assert log.codes() == ["SSH_STARTUPS_EXCEEDED"]


def test_refusals_while_starting_or_draining_log_nothing() -> None:
    log = ServerLog()
    srv = core.ServerCore(machines(), log, core.AdmissionPolicy(early_drop_start=0, early_drop_rate=100))
    srv.handle(core.ServerEvent.start)
    assert arrive(srv, "192.0.2.1", draw=0.0).reply is core.ServerReply.refuse_connection  # starting
    srv.handle(core.ServerEvent.listening)
    srv.handle(core.ServerEvent.shutdown)
    assert arrive(srv, "192.0.2.1", draw=0.0).reply is core.ServerReply.refuse_connection  # draining
    assert log.codes() == ["SSH_AVAILABLE", "SSH_SHUTTING_DOWN"]


# --- sources: network blocks, per-source startups ------------------------------------------------


def test_sources_are_ipv4_32_and_ipv6_64_blocks_by_default() -> None:
    table = core.SourceTable(core.AdmissionPolicy(per_source=1))
    key = lambda host: (lambda s: (s.family, s.block) if s else None)(table.source(host))  # noqa: E731
    assert key("192.0.2.1") != key("192.0.2.2")
    assert key("2001:db8::1") == key("2001:db8::ffff:1") == key("2001:db8:0:0:ffff::1")
    assert key("2001:db8::1") != key("2001:db8:0:1::1")
    assert key("::ffff:192.0.2.1") == key("192.0.2.1")  # a dual-stack socket's IPv4 peer
    assert key("fe80::1%eth0") == key("fe80::2")
    assert key("not an address") is None and key(None) is None
    source = table.source("2001:db8::1")
    assert source is not None and table.label(source) == "2001:db8::/64"
    wide = core.SourceTable(core.AdmissionPolicy(per_source=1, ipv4_bits=24, ipv6_bits=48))
    s1, s2 = wide.source("192.0.2.1"), wide.source("192.0.2.200")
    assert s1 is not None and s2 is not None and (s1.family, s1.block) == (s2.family, s2.block)
    assert wide.label(s1) == "192.0.2.0/24"
    # Nothing per source configured: no address is even parsed.
    assert core.SourceTable(core.AdmissionPolicy()).source("192.0.2.1") is None


def test_per_source_startups_refuse_only_that_source() -> None:
    srv, log = server(per_source=2, ipv4_bits=24)
    a1, a2 = arrive(srv, "192.0.2.1"), arrive(srv, "192.0.2.2")
    assert a1.reply is a2.reply is core.ServerReply.admit and a1.source is not None
    refused = arrive(srv, "192.0.2.3")
    assert refused.reply is core.ServerReply.refuse_connection and refused.source is None
    assert arrive(srv, "198.51.100.1").reply is core.ServerReply.admit  # another block
    assert log.records == [("SSH_SOURCE_STARTUPS_EXCEEDED", "source_full",
                            "192.0.2.0/24: 2 unauthenticated connections (perSourceMaxStartups 2)",
                            "192.0.2.3:1234")]
    srv.startup_done(a1.source)  # authenticated (or gone): the slot is the source's again
    assert arrive(srv, "192.0.2.4").reply is core.ServerReply.admit
    assert srv.sources.startups == {(4, 0xC0000200): 2, (4, 0xC6336400): 1}
    for source in (a2.source, srv.sources.source("192.0.2.4"), srv.sources.source("198.51.100.1")):
        srv.startup_done(source)
    assert srv.sources.startups == {} and srv.instance.startups == 0  # nothing left behind


def test_the_hard_limit_comes_before_the_source_limit() -> None:
    # OpenSSH's order: the global drop decides first, then the source's own limit.
    srv, log = server({"maxStartups": 2}, per_source=1)
    arrive(srv, "192.0.2.1")
    arrive(srv, "192.0.2.2")
    assert arrive(srv, "192.0.2.1").reply is core.ServerReply.refuse_connection
    assert log.codes() == ["SSH_STARTUPS_EXCEEDED"]


# --- penalties: OpenSSH's PerSourcePenalties ----------------------------------------------------


def test_penalties_add_up_and_refuse_past_min_until_they_expire() -> None:
    srv, log = server(penalties=PENALTIES, penalty_min=15.0, penalty_max=600.0)
    source = arrive(srv, "192.0.2.9").source
    assert source is not None
    for t in (0.0, 0.0, 0.0):  # 15 s: not past min
        srv.penalise(source, P.authfail, t)
    assert srv.penalised(source, 0.0) is None
    assert arrive(srv, "192.0.2.9", now=0.0).reply is core.ServerReply.admit
    srv.penalise(source, P.authfail, 1.0)  # 19 s left: past min, refused
    assert srv.penalised(source, 1.0) == "192.0.2.9/32 penalised for authfail (19s left)"
    assert arrive(srv, "192.0.2.9", now=19.9).reply is core.ServerReply.refuse_connection
    assert arrive(srv, "192.0.2.10", now=19.9).reply is core.ServerReply.admit  # another source
    assert arrive(srv, "192.0.2.9", now=20.1).reply is core.ServerReply.admit  # expired
    assert srv.sources.penalties[4] == {}
    assert [(c, e) for c, e, _, _ in log.records] == [
        ("SSH_PENALTY", "penalty")] * 3 + [("SSH_PENALTY_ACTIVE", "penalty_active"),
                                           ("SSH_SOURCE_PENALISED", "source_penalised")]
    assert log.records[2][2] == "192.0.2.9/32 authfail +5s: 15s, refused past 15s"
    assert log.records[3][2:] == ("192.0.2.9/32 authfail +5s: 19s, refused", "192.0.2.9:1234")


def test_a_penalty_above_min_refuses_at_once_and_they_add_up_to_max() -> None:
    srv, log = server(penalties={P.grace_exceeded: 20.0}, penalty_min=15.0, penalty_max=60.0)
    source = srv.sources.source("2001:db8::1")
    assert source is not None
    srv.penalise(source, P.grace_exceeded, 100.0)
    assert log.codes() == ["SSH_PENALTY_ACTIVE"]
    for _ in range(10):
        srv.penalise(source, P.grace_exceeded, 100.0)
    assert srv.sources.penalties[6][source.block].expiry == 160.0  # capped at max ahead
    assert log.codes() == ["SSH_PENALTY_ACTIVE"] + ["SSH_PENALTY"] * 10
    other = srv.sources.source("2001:db8::ffff")  # the same /64
    assert other is not None and srv.penalised(other, 159.0) is not None
    assert srv.penalised(other, 160.5) is None


def test_decay_lets_a_slow_guesser_stay_below_min() -> None:
    # One failure every 5 s adds 5 s as 5 s pass: never past 15 s.
    srv, _ = server(penalties=PENALTIES)
    source = srv.sources.source("192.0.2.9")
    assert source is not None
    for i in range(50):
        srv.penalise(source, P.authfail, 5.0 * i)
        assert srv.penalised(source, 5.0 * i) is None
    # One every 2 s adds 3 s a time: the fifth in a row is past min (5 + 3 * 4 = 17).
    fast = srv.sources.source("192.0.2.10")
    assert fast is not None
    refused = []
    for i in range(6):
        srv.penalise(fast, P.authfail, 2.0 * i)
        refused.append(srv.penalised(fast, 2.0 * i) is not None)
    assert refused == [False, False, False, False, True, True]


def test_exempt_networks_are_never_penalised_nor_refused() -> None:
    srv, log = server(penalties=PENALTIES, exempt=("192.0.2.0/28", "2001:db8::/32"), ipv4_bits=24)
    exempt, near = srv.sources.source("192.0.2.1"), srv.sources.source("192.0.2.200")
    assert exempt is not None and exempt.exempt and near is not None and not near.exempt
    for _ in range(10):
        srv.penalise(exempt, P.authfail, 0.0)
    assert log.codes() == [] and srv.sources.penalties[4] == {}
    for _ in range(4):
        srv.penalise(near, P.authfail, 0.0)  # the same /24 as the exempt address
    assert arrive(srv, "192.0.2.200").reply is core.ServerReply.refuse_connection
    assert arrive(srv, "192.0.2.1").reply is core.ServerReply.admit  # exempt, though in the block


def test_penalties_off_refuse_nobody() -> None:
    srv, log = server()
    assert srv.sources.source("192.0.2.1") is None  # not tracked at all


def test_a_full_table_forgets_the_penalty_closest_to_expiry_when_permissive() -> None:
    srv, log = server(penalties={P.authfail: 20.0, P.noauth: 1.0}, max_sources=2)
    a, b, c = (srv.sources.source(h) for h in ("192.0.2.1", "192.0.2.2", "192.0.2.3"))
    assert a is not None and b is not None and c is not None
    srv.penalise(a, P.noauth, 0.0)  # expires first
    srv.penalise(b, P.authfail, 0.0)
    srv.penalise(c, P.authfail, 0.0)
    assert set(srv.sources.penalties[4]) == {b.block, c.block}
    assert log.records[2][:3] == ("SSH_PENALTY_TABLE_FULL", "penalty_overflow",
                                  "2 IPv4 sources penalised (maxSources 2): forgot 192.0.2.1/32 (1s left) "
                                  "for 192.0.2.3/32")
    assert arrive(srv, "192.0.2.4").reply is core.ServerReply.admit  # permissive: nobody else is refused
    # The IPv6 table is another one, with its own cap.
    v6 = srv.sources.source("2001:db8::1")
    assert v6 is not None
    srv.penalise(v6, P.authfail, 0.0)
    assert len(srv.sources.penalties[4]) == 2 and len(srv.sources.penalties[6]) == 1


def test_a_full_table_refuses_everyone_not_exempt_when_deny_all() -> None:
    srv, log = server(penalties={P.noauth: 1.0, P.authfail: 5.0}, max_sources=1, deny_all_on_overflow=True,
                      exempt=("198.51.100.0/24",))
    a, b = srv.sources.source("192.0.2.1"), srv.sources.source("192.0.2.2")
    assert a is not None and b is not None
    srv.penalise(a, P.noauth, 0.0)  # 1 s: not refused, but it fills the table
    srv.penalise(b, P.authfail, 0.0)
    assert srv.sources.penalties[4].keys() == {a.block}
    assert arrive(srv, "192.0.2.3", now=0.5).reply is core.ServerReply.refuse_connection
    assert arrive(srv, "198.51.100.7", now=0.5).reply is core.ServerReply.admit  # exempt
    assert arrive(srv, "2001:db8::1", now=0.5).reply is core.ServerReply.admit  # the IPv6 table has room
    assert arrive(srv, "192.0.2.3", now=1.5).reply is core.ServerReply.admit  # the entry expired
    assert [(c, e) for c, e, _, _ in log.records] == [
        ("SSH_PENALTY", "penalty"), ("SSH_PENALTY_TABLE_FULL", "penalty_overflow"),
        ("SSH_PENALTY_TABLE_FULL", "penalty_table_full")]
    assert log.records[1][2] == ("1 IPv4 sources penalised (maxSources 1): 192.0.2.2/32 authfail not "
                                 "recorded (deny-all)")


def test_the_expiry_heap_stays_bounded_by_the_table() -> None:
    srv, _ = server(penalties=PENALTIES, penalty_max=10**9)
    source = srv.sources.source("192.0.2.9")
    assert source is not None
    for i in range(10_000):
        srv.penalise(source, P.authfail, i * 0.001)
    assert len(srv.sources.penalties[4]) == 1 and len(srv.sources.heaps[4]) <= 2 * 1 + 65


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@example([("192.0.2.3", P.protocol_error, 0.0), ("192.0.2.1", P.protocol_error, 0.0),
          ("192.0.2.2", P.authfail, 0.0)], 2)  # a full table, two entries expiring together
@given(st.lists(st.tuples(st.sampled_from(["192.0.2.1", "192.0.2.2", "192.0.2.3", "2001:db8::1"]),
                          st.sampled_from(list(P)), st.floats(0, 5)), max_size=60),
       st.integers(1, 3))
def test_penalties_match_a_plain_model(steps: list[tuple[str, core.Penalty, float]], cap: int) -> None:
    """The table (a heap, lazy expiry, eviction) against a plain dict scanned every time."""
    policy = dict(penalties={P.authfail: 5.0, P.noauth: 1.0, P.grace_exceeded: 10.0, P.protocol_error: 20.0},
                  penalty_min=15.0, penalty_max=40.0, max_sources=cap)
    srv, _ = server(**policy)
    model: dict[str, list[Any]] = {}  # host -> [expiry, active]
    now = 0.0
    for host, kind, dt in steps:
        now += dt
        source = srv.sources.source(host)
        assert source is not None
        for h in [h for h, (expiry, _) in model.items() if expiry < now]:
            del model[h]
        family = [h for h in model if (":" in h) == (":" in host)]
        seconds = policy["penalties"][kind]  # type: ignore[index]
        if host not in model:
            if len(family) >= cap:
                # (ties broken by address, as OpenSSH's penalty_expiry_cmp does)
                soonest = min(family, key=lambda h: (model[h][0], int(ipaddress.ip_address(h))))
                del model[soonest]
            model[host] = [now, False]
        entry = model[host]
        entry[0] = min(entry[0] + seconds, now + 40.0)
        entry[1] = entry[1] or entry[0] - now > 15.0
        srv.penalise(source, kind, now)
        for h in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "2001:db8::1"):
            s = srv.sources.source(h)
            assert s is not None
            expected = h in model and model[h][0] >= now and model[h][1]
            assert (srv.penalised(s, now) is not None) == expected, (h, now, model)


# --- the connection: failures feed the penalty, a penalised source's attempt ends it --------------

MACHINES = core.Machines.load({"maxAuthTries": 6})


def connection(srv: core.ServerCore, host: str, now: float = 0.0,
               failure_delay: float = 2.0) -> tuple[core.ConnectionCore, list[str]]:
    codes: list[str] = []

    def log(c: tuple[str, ...], event: str, **labels: Any) -> None:
        codes.extend(c)

    admission = arrive(srv, host, now=now)
    assert admission.reply is core.ServerReply.admit
    conn = core.ConnectionCore(srv_machines(srv), srv, log, failure_delay=failure_delay)
    conn.handle(core.Connected(admission.source))
    conn.handle(core.KexDone(1))
    return conn, codes


def srv_machines(srv: core.ServerCore) -> core.Machines:
    return MACHINES


def fail_password(conn: core.ConnectionCore, now: float) -> list[core.Action]:
    conn.handle(core.AuthRequested("password", now=now))
    return conn.handle(core.Credentials("bad", "password", now=now))


def penalised_server(**policy: Any) -> tuple[core.ServerCore, ServerLog]:
    log = ServerLog()
    srv = core.ServerCore(MACHINES, log, core.AdmissionPolicy(**{"penalties": PENALTIES, **policy}))
    srv.handle(core.ServerEvent.start)
    srv.handle(core.ServerEvent.listening)
    log.records.clear()  # SSH_AVAILABLE
    return srv, log


def test_a_failed_attempt_is_answered_after_the_delay_and_penalised() -> None:
    srv, log = penalised_server()
    conn, codes = connection(srv, "192.0.2.4")
    assert fail_password(conn, 0.0) == [core.AuthAnswer(core.ConnectionReply.auth_failure, 2.0)]
    assert log.codes() == ["SSH_PENALTY"]
    # What does not count is answered at once, and earns nothing.
    assert conn.handle(core.AuthRequested("none", now=0.1)) == [
        core.AuthAnswer(core.ConnectionReply.auth_failure, 0.0)]
    conn.handle(core.AuthRequested("publickey", signed=False, now=0.2))
    assert conn.handle(core.KeyChecked("bad")) == [core.AuthAnswer(core.ConnectionReply.auth_failure, 0.0)]
    # A signed key the handler refuses fails the attempt: the SSH layer's answer waits too.
    conn.handle(core.AuthRequested("publickey", signed=True, now=0.3))
    assert conn.handle(core.KeyChecked("bad")) == [core.KeyAcceptable(False, 2.0)]
    conn.handle(core.AuthAnswered("failure", "publickey", now=0.3))
    assert log.codes() == ["SSH_PENALTY"] * 2
    assert codes.count("SSH_AUTH_FAILED") == 3  # the query's failure does not count
    assert conn.instance.authTries == 2


def test_the_attempt_after_its_source_is_penalised_ends_the_connection() -> None:
    srv, log = penalised_server(per_source=10)
    guesser, guessed = connection(srv, "192.0.2.4")
    other, _ = connection(srv, "192.0.2.4")
    for t in (0.0, 0.1, 0.2, 0.3):  # 20 s: past min
        fail_password(guesser, t)
    assert log.codes()[-1] == "SSH_PENALTY_ACTIVE"
    # Its next attempt, and the other connection's, end before any check.
    assert guesser.handle(core.AuthRequested("password", now=0.4)) == [
        core.Disconnect(core.DISCONNECT_NO_MORE_AUTH_METHODS, "Too many authentication failures"),
        core.ConnectionEnded()]
    assert guessed[-3:] == ["SSH_AUTH_PENALISED", "SSH_HANDSHAKE_FAILED", "SSH_DISCONNECTED"]
    assert guesser.state == "closed"
    # What is not an attempt is still answered; the attempt then ends it.
    assert other.handle(core.AuthRequested("none", now=0.4)) == [
        core.AuthAnswer(core.ConnectionReply.auth_failure)]
    actions = other.handle(core.AuthRequested("publickey", signed=True, now=0.5))
    assert isinstance(actions[0], core.Disconnect) and other.state == "closed"
    # No new connection from the source meanwhile; others come in.
    assert arrive(srv, "192.0.2.4", now=0.6).reply is core.ServerReply.refuse_connection
    assert arrive(srv, "192.0.2.5", now=0.6).reply is core.ServerReply.admit
    # Closed connections earn nothing more (no noauth for a connection the server ended).
    guesser.handle(core.ConnectionLost(core.Lost.lost, "closed", now=0.7))
    assert log.codes().count("SSH_PENALTY") == 3 and srv.sources.startups_of(
        srv.sources.source("192.0.2.4")) == 0  # type: ignore[arg-type]


def test_a_keyboard_interactive_answer_from_a_penalised_source_ends_the_connection() -> None:
    srv, log = penalised_server()
    conn, codes = connection(srv, "192.0.2.6")
    conn.handle(core.AuthRequested("keyboard-interactive", now=0.0))
    conn.handle(core.KbdintChallenge(True))
    assert conn.state == "kbdint_round"
    srv.penalise(srv.sources.source("192.0.2.6"), P.grace_exceeded, 0.5)  # type: ignore[arg-type]
    srv.penalise(srv.sources.source("192.0.2.6"), P.grace_exceeded, 0.5)  # type: ignore[arg-type]
    actions = conn.handle(core.KbdintResponse(now=1.0))
    assert isinstance(actions[0], core.Disconnect) and conn.state == "closed"
    assert codes[-3:] == ["SSH_AUTH_PENALISED", "SSH_HANDSHAKE_FAILED", "SSH_DISCONNECTED"]


def test_too_many_tries_comes_before_the_penalty() -> None:
    # At maxAuthTries the attempt is not one the spec would check: too many tries, as always.
    srv, log = penalised_server(penalties={P.authfail: 1.0}, penalty_min=5.5)
    conn, codes = connection(srv, "192.0.2.7")
    for _ in range(6):
        fail_password(conn, 0.0)
    assert srv.penalised(srv.sources.source("192.0.2.7"), 0.0) is not None  # type: ignore[arg-type]
    conn.handle(core.AuthRequested("password", now=0.0))
    assert codes[-3] == "SSH_AUTH_TOO_MANY_TRIES"


@pytest.mark.parametrize(("how", "state", "expected"), [
    (core.Lost.login_timeout, "handshake", (P.grace_exceeded, 10.0)),
    (core.Lost.login_timeout, "authenticating", (P.grace_exceeded, 10.0)),
    (core.Lost.protocol_error, "handshake", (P.protocol_error, 5.0)),
    (core.Lost.lost, "handshake", (P.noauth, 1.0)),
    (core.Lost.lost, "authenticating", (P.noauth, 1.0)),
    (core.Lost.lost, "failed", None),  # its failure was penalised as it failed
    (core.Lost.lost, "established", None),
    (core.Lost.protocol_error, "established", None),
    (core.Lost.lost, "handler error", None),  # the server ended it: the client earns nothing
])
def test_how_a_connection_ends_before_login_penalises_its_source(
        how: core.Lost, state: str, expected: tuple[core.Penalty, float] | None) -> None:
    srv, log = penalised_server()
    log_in = state == "established"
    conn, _ = connection(srv, "192.0.2.8")
    if state == "handshake":
        conn = core.ConnectionCore(MACHINES, srv, lambda *a, **k: None)
        conn.handle(core.Connected(arrive(srv, "192.0.2.8").source))
    elif state == "failed":
        fail_password(conn, 0.0)
    elif log_in:
        conn.handle(core.AuthRequested("password", now=0.0))
        conn.handle(core.Credentials("ok", "password", now=0.0))
        conn.handle(core.UserVerdict(True, "password"))
        conn.handle(core.AuthCompleted(0.0))
    before = len(log.records)
    conn.handle(core.ConnectionLost(how, "gone", now=1.0, by_server=state == "handler error"))
    assert conn.state == "closed"
    added = log.records[before:]
    if expected is None:
        assert added == []
    else:
        kind, seconds = expected
        assert [r[0] for r in added] == ["SSH_PENALTY"]
        assert added[0][2] == f"192.0.2.8/32 {kind} +{seconds:g}s: {seconds:.0f}s, refused past 15s"
