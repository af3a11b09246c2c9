"""The sans-I/O core (fsm/core.py) driven in-process: no sockets, no asyncio.

These tests hand `ConnectionCore` events as the asyncssh adapter would and look
at the actions and log records it gives back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshspec.fsm import core
from sshspec.fsm.certificates import Certificate, CertificatePolicy
from sshspec.fsm.spec import SpecError, load_spec

MACHINES = core.Machines.load({"maxAuthTries": 3, "maxSessions": 2}, max_queued_requests=3)


@dataclass
class Log:
    records: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def __call__(self, codes: tuple[str, ...], event: str, **labels: Any) -> None:
        for code in codes:
            self.records.append((code, str(event), labels))

    def server(self, codes: tuple[str, ...], event: str, reason: str | None, remote_addr: str | None) -> None:
        self(codes, event, reason=reason)

    def codes(self) -> list[str]:
        return [code for code, _, _ in self.records]


def new_core(machines: core.Machines = MACHINES) -> tuple[core.ConnectionCore, Log]:
    log = Log()
    server = core.ServerCore(machines, log.server)
    server.handle(core.ServerEvent.start)
    server.handle(core.ServerEvent.listening)
    assert server.handle(core.ServerEvent.accept) is core.ServerReply.admit
    conn = core.ConnectionCore(machines, server, log)
    conn.handle(core.Connected())
    conn.handle(core.KexDone(1))
    return conn, log


def logged_in() -> tuple[core.ConnectionCore, Log]:
    conn, log = new_core()
    conn.handle(core.AuthRequested("password"))
    actions = conn.handle(core.Credentials("ok", "password"))
    assert actions == [core.AdmitUser("password")]
    assert conn.handle(core.UserVerdict(True, "password")) == [
        core.AuthAnswer(core.ConnectionReply.accept_user)
    ]
    conn.handle(core.AuthCompleted(0.0))
    assert conn.state == "established"
    return conn, log


def open_session(conn: core.ConnectionCore) -> int:
    [action] = conn.handle(core.ChannelOpen("session"))
    assert isinstance(action, core.OpenSession)
    return action.channel


# --- the typed seam ------------------------------------------------------------------------


def test_a_spec_whose_replies_the_core_cannot_carry_out_does_not_load() -> None:
    from sshspec.fsm.spec import bundled_path

    source = (
        bundled_path("session")
        .read_text()
        .replace(
            "  close: Close the channel and end the program if it still runs.\n",
            "  close: Close the channel and end the program if it still runs.\n"
            "  teleport: Beam the program up.\n",
        )
    )
    source = source.replace("reply: close_stdin,", "reply: teleport,")
    spec = load_spec("session.yaml", text=source.encode())
    with pytest.raises(core.SeamError, match="reply 'teleport': the core has no reply of that name"):
        core.Machines.load(specs={"session": spec})


def test_a_spec_with_an_event_the_core_never_fires_does_not_load() -> None:
    from sshspec.fsm.spec import bundled_path

    source = (
        bundled_path("server")
        .read_text()
        .replace(
            "  deadline: limits.shutdownTimeout",
            "  teleport: Beam the server up.\n  deadline: limits.shutdownTimeout",
        )
    )
    source += '  - {in: "*", event: teleport, doc: nobody fires it}\n'
    spec = load_spec("server.yaml", text=source.encode())
    with pytest.raises(core.SeamError, match="event 'teleport': the core has no event of that name"):
        core.Machines.load(specs={"server": spec})


def test_every_action_of_the_core_has_one_executor_in_the_adapter() -> None:
    from typing import get_args

    from sshspec.adapters import server

    assert set(server._EXECUTORS) == set(get_args(core.Action))


# --- totality -------------------------------------------------------------------------------

SMALL = b"""
machine: demo
doc: demo
initial: a
final: [b]
states: {a: A, b: B}
events: {go: Go, poke: Poke}
transitions:
  - {from: a, event: go, to: b}
"""


def test_a_rule_for_every_state_and_every_event_does_not_load() -> None:
    with pytest.raises(SpecError, match=r'ignore\[0\]: "\*" for both states and events'):
        load_spec("demo.yaml", text=SMALL + b'ignore:\n  - {in: "*", event: "*"}\n')


def test_one_wildcard_side_at_a_time_still_loads() -> None:
    loaded = load_spec(
        "demo.yaml",
        text=SMALL + b'ignore:\n  - {in: "*", event: poke}\n'
        b"impossible:\n  - {in: b, event: go, doc: b is final}\n",
    )
    assert loaded.table[("b", "go")][0].kind == "impossible"
    assert loaded.table[("b", "go")][0].codes == ("SSH_SPEC_VIOLATION",)


def test_an_impossible_rule_must_say_why() -> None:
    with pytest.raises(SpecError, match=r"impossible\[0\].doc: say why"):
        load_spec(
            "demo.yaml",
            text=SMALL + b'ignore:\n  - {in: "*", event: poke}\n'
            b'impossible:\n  - {in: b, event: go, doc: " "}\n',
        )


def test_the_bundled_specs_classify_every_pair_without_a_double_wildcard() -> None:
    for name in ("server", "connection", "session"):
        loaded = load_spec(name)
        states, events = loaded.spec.states, loaded.spec.events
        assert {pair for pair in loaded.table} == {(s, e) for s in states for e in events}
        for rule in [*loaded.spec.ignore, *loaded.spec.refuse, *loaded.spec.impossible]:
            assert not (rule.in_ == "*" and rule.event == "*")
        for rule in loaded.spec.impossible:
            assert rule.doc.strip()


def test_an_impossible_pair_fails_closed_with_a_spec_violation() -> None:
    conn, log = new_core()
    # The backend's verdict on a user that never authenticated: the adapter never
    # fires it in authenticating.
    actions = conn.handle(core.UserVerdict(True, "password"))
    assert conn.state == "closed"
    assert core.Disconnect(core.DISCONNECT_PROTOCOL_ERROR, "spec violation: backend_accepted") in actions
    [violation] = [labels for code, _, labels in log.records if code == "SSH_SPEC_VIOLATION"]
    assert violation["reason"].startswith("connection: event 'backend_accepted' in state 'authenticating'")
    assert log.codes()[-1] == "SSH_DISCONNECTED"


def test_a_channel_spec_violation_closes_the_channel() -> None:
    conn, log = logged_in()
    channel = open_session(conn)
    actions = conn.handle(core.ClientEof(channel))  # asyncssh holds EOF until a program starts
    assert actions == [core.CloseChannel(channel)]
    assert "SSH_SPEC_VIOLATION" in log.codes() and conn.state == "established"


# --- verdicts are checked where they enter -----------------------------------------------


@pytest.mark.parametrize("verdict", [True, None, "OK", 1])
def test_a_wrong_credential_verdict_is_a_handler_error_and_the_connection_goes_on(verdict: object) -> None:
    conn, log = new_core()
    conn.handle(core.AuthRequested("password"))
    actions = conn.handle(core.Credentials(verdict, "password"))
    assert actions == [core.AuthAnswer(core.ConnectionReply.auth_failure)]
    assert conn.state == "authenticating"
    code, _, labels = log.records[-1]
    assert code == "SSH_AUTH_UNAVAILABLE" and "handler error: check_password returned" in labels["reason"]


def test_a_wrong_accept_user_verdict_rejects_the_user() -> None:
    conn, log = new_core()
    conn.handle(core.AuthRequested("password"))
    conn.handle(core.Credentials("ok", "password"))
    actions = conn.handle(core.UserVerdict("yes", "password"))
    assert conn.state == "closed" and any(isinstance(a, core.Disconnect) for a in actions)
    assert "SSH_BACKEND_REJECTED_HANDSHAKE" in log.codes()


# --- the request queue --------------------------------------------------------------------


def test_requests_wait_for_the_pending_one_and_overflow_is_answered_in_turn() -> None:
    conn, log = logged_in()
    channel = open_session(conn)
    exec_ = core.ChannelRequest(channel, "exec", True, object())
    assert conn.handle(exec_) == [core.StartProgram(channel, exec_)]
    queued = [core.ChannelRequest(channel, "env", True, None, None) for _ in range(2)]
    for req in queued:
        assert conn.handle(req) == []  # held: the start is pending (3 held now)
    overflow = conn.handle(core.ChannelRequest(channel, "env", True))
    assert overflow == [] and log.records[-1][0] == "SSH_CHANNEL_REQUEST_FAILED"
    actions = conn.handle(core.RequestDone(channel, True))
    assert actions == [core.ChannelReply(channel, True, "exec")]
    assert conn.handle(core.ChannelReplied(channel, None)) == [core.ProgramStarted(channel)]
    # What the SSH layer held for the program comes first, then the next request.
    assert conn.handle(core.ClientEof(channel)) == [core.CloseStdin(channel)]
    [reply] = conn.handle(core.IoStarted(channel))
    assert isinstance(reply, core.ChannelReply) and reply.ok is False  # env after start: refused


@dataclass
class Model:
    """What the client sees: one reply per want-reply request, in arrival order."""

    sent: list[bool] = field(default_factory=list)  # want_reply per request, in order
    replies: int = 0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "env",
                    "pty-req",
                    "exec",
                    "shell",
                    "signal",
                    "x11-req",
                    "bogus",
                    "window-change",
                    "eof",
                    "done-ok",
                    "done-fail",
                    "end",
                    "close",
                ]
            ),
            st.booleans(),
        ),
        max_size=40,
    )
)
def test_every_want_reply_request_gets_one_reply_in_order(script: list[tuple[str, bool]]) -> None:
    """Random requests, backend answers, EOFs, program ends and a close, in any order the
    adapter can deliver them: the replies come one per want-reply request, in order, the
    queue never holds more than maxQueuedRequests, and no spec violation is logged."""
    conn, log = logged_in()
    channel = open_session(conn)
    model = Model()
    pending: list[core.Action] = []
    started = False
    ended = False
    closed = False

    def run(actions: list[core.Action]) -> None:
        nonlocal started
        for action in actions:
            if isinstance(action, core.ChannelReply):
                model.replies += 1
                run(conn.handle(core.ChannelReplied(channel, "channel closed" if closed else None)))
            elif isinstance(action, core.AskBackend):
                run(conn.handle(core.RequestDone(channel, action.request.name != "signal")))
            elif isinstance(action, core.StartProgram):
                pending.append(action)  # decided later: done-ok / done-fail
            elif isinstance(action, core.ProgramStarted):
                started = True
                run(conn.handle(core.IoStarted(channel)))

    for step, flag in script:
        if closed and step not in ("done-ok", "done-fail", "end"):
            continue
        if step in ("eof",):
            if started:
                run(conn.handle(core.ClientEof(channel)))
        elif step in ("done-ok", "done-fail"):
            if pending:
                pending.pop()
                run(conn.handle(core.RequestDone(channel, step == "done-ok")))
        elif step == "end":
            if started and not ended:  # the adapter waits for its program once
                ended = True
                run(conn.handle(core.ProgramEnded(channel, 0)))
        elif step == "close":
            closed = True
            run(conn.handle(core.ChannelClosed(channel)))
        else:
            model.sent.append(flag)
            run(conn.handle(core.ChannelRequest(channel, step, flag, None)))
        session = conn.channels.get(channel)
        assert session is None or session.held <= MACHINES.max_queued_requests
    while pending:
        pending.pop()
        run(conn.handle(core.RequestDone(channel, True)))
    assert model.replies == sum(model.sent)
    assert "SSH_SPEC_VIOLATION" not in log.codes()


def test_a_draining_connection_disconnects_when_its_last_channel_closes() -> None:
    conn, log = logged_in()
    channel = open_session(conn)
    assert conn.handle(core.Shutdown()) == [core.CloseChannel(channel)]
    actions = conn.handle(core.ChannelClosed(channel))
    assert core.Disconnect(core.DISCONNECT_BY_APPLICATION, "server shutdown") in actions
    assert actions[-1] == core.ConnectionEnded() and conn.state == "closed"
    assert log.codes()[-1] == "SSH_DISCONNECTED"


def test_keepalive_timer() -> None:
    log = Log()
    server = core.ServerCore(MACHINES, log.server)
    conn = core.ConnectionCore(MACHINES, server, log, keepalive_interval=5.0)
    conn.handle(core.Connected())
    conn.handle(core.KexDone(1))
    conn.handle(core.AuthRequested("password"))
    conn.handle(core.Credentials("ok", "password"))
    conn.handle(core.UserVerdict(True, "password"))
    assert conn.get_timer() is None
    conn.handle(core.AuthCompleted(100.0))
    assert conn.get_timer() == 105.0
    assert conn.handle_timer(104.0) == []
    assert conn.handle_timer(105.0) == [core.SendKeepalive(5.0)] and conn.get_timer() is None
    conn.handle(core.KeepaliveResult(True, 106.0))
    assert conn.get_timer() == 111.0
    for now in (111.0, 117.0, 123.0):  # clientAliveCountMax (3) unanswered
        assert conn.handle_timer(now) == [core.SendKeepalive(5.0)]
        conn.handle(core.KeepaliveResult(False, now + 1))
    actions = conn.handle_timer(129.0)
    assert conn.state == "closed" and actions[-1] == core.ConnectionEnded()
    assert "SSH_KEEPALIVE_NORESP" in log.codes()


def test_a_backend_answer_that_is_not_a_bool_fails_the_request() -> None:
    conn, log = logged_in()
    channel = open_session(conn)
    env = core.ChannelRequest(channel, "env", True, object())
    assert conn.handle(env) == [core.AskBackend(channel, env)]
    assert conn.handle(core.RequestDone(channel, "yes")) == [core.ChannelReply(channel, False, "env")]
    code, _, labels = log.records[-1]
    assert code == "SSH_CHANNEL_REQUEST_FAILED"
    assert labels["reason"] == "handler error: the backend returned 'yes', not a bool"



# --- ssh.proxyProtocol: the header's verdicts ----------------------------------------------


def test_a_trusted_peers_header_is_awaited_at_most_max_startups_times() -> None:
    log = Log()
    server = core.ServerCore(core.Machines.load({"maxStartups": 2}), log.server)
    assert server.handle(core.ServerEvent.proxy_connect) is None  # nothing listens yet: impossible
    assert log.codes() == ["SSH_SPEC_VIOLATION"]
    log.records.clear()
    server = core.ServerCore(core.Machines.load({"maxStartups": 2}), log.server)
    server.handle(core.ServerEvent.start)
    assert server.handle(core.ServerEvent.proxy_connect) is core.ServerReply.refuse_connection  # starting
    server.handle(core.ServerEvent.listening)
    read = core.ServerReply.read_proxy_header
    assert [server.handle(core.ServerEvent.proxy_connect) for _ in range(3)] == [
        read, read, core.ServerReply.refuse_connection]
    assert server.handle(core.ServerEvent.proxy_header, remote_addr="198.51.100.7:1") is None
    assert server.handle(core.ServerEvent.proxy_connect) is read  # the header freed its slot
    refused = server.handle(core.ServerEvent.proxy_header_invalid, reason="bad")
    assert refused is core.ServerReply.refuse_connection
    assert server.handle(core.ServerEvent.proxy_connect) is read
    assert server.handle(core.ServerEvent.accept) is core.ServerReply.admit  # headers are not startups
    assert log.codes() == ["SSH_AVAILABLE", "SSH_STARTUPS_EXCEEDED", "SSH_PROXY_HEADER",
                           "SSH_PROXY_HEADER_INVALID"]
    assert server.handle(core.ServerEvent.shutdown) is core.ServerReply.stop_listening
    assert server.handle(core.ServerEvent.proxy_connect) is core.ServerReply.refuse_connection


def _connected() -> tuple[core.ConnectionCore, Log]:
    log = Log()
    server = core.ServerCore(MACHINES, log.server)
    server.handle(core.ServerEvent.start)
    server.handle(core.ServerEvent.listening)
    server.handle(core.ServerEvent.accept)
    conn = core.ConnectionCore(MACHINES, server, log)
    conn.handle(core.Connected())
    return conn, log


def test_an_untrusted_peers_header_ends_the_connection_before_ssh() -> None:
    conn, log = _connected()
    why = "PROXY v1 header from 127.0.0.2:4000, which is not in ssh.proxyProtocol.trustedNetworks"
    assert conn.handle(core.UntrustedProxyHeader(why)) == [
        core.Disconnect(core.DISCONNECT_PROTOCOL_ERROR, why), core.ConnectionEnded()]
    assert log.codes() == ["SSH_AVAILABLE", "SSH_CONNECTED", "SSH_PROXY_HEADER_REFUSED",
                           "SSH_HANDSHAKE_FAILED", "SSH_DISCONNECTED"]
    assert conn.handle(core.UntrustedProxyHeader(why)) == []  # closed: ignored
    assert conn.handle(core.ConnectionLost(core.Lost.lost, "closed")) == []
    assert log.codes()[-1] == "SSH_DISCONNECTED"


def test_a_header_after_the_key_exchange_is_a_spec_violation() -> None:
    conn, log = new_core()  # authenticating: only a connection's first bytes are checked
    actions = conn.handle(core.UntrustedProxyHeader("late"))
    assert log.codes()[-3:] == ["SSH_SPEC_VIOLATION", "SSH_HANDSHAKE_FAILED", "SSH_DISCONNECTED"]
    assert isinstance(actions[0], core.Disconnect) and conn.state == "closed"


# --- user certificates (fsm/certificates.py through the core) ------------------------------

CA = b"ca-blob"


def _cert(**fields: Any) -> Certificate:
    base: dict[str, Any] = dict(ca=CA, signature_algorithm="ssh-ed25519", key_id="id", serial=1,
                                principals=("alice",), valid_after=0, valid_before=2**64 - 1)
    return Certificate(**{**base, **fields})


def cert_core() -> tuple[core.ConnectionCore, Log]:
    log = Log()
    server = core.ServerCore(MACHINES, log.server)
    server.handle(core.ServerEvent.start)
    server.handle(core.ServerEvent.listening)
    server.handle(core.ServerEvent.accept)
    conn = core.ConnectionCore(MACHINES, server, log, failure_delay=2.0,
                               certificates=CertificatePolicy(trusted=frozenset({CA})))
    conn.handle(core.Connected())
    conn.handle(core.KexDone(1))
    return conn, log


def test_a_refused_certificate_at_the_query_step_is_logged_and_not_counted() -> None:
    conn, log = cert_core()
    for _ in range(3 + 1):  # the query never counts
        conn.handle(core.AuthRequested("publickey", signed=False))
        actions = conn.handle(core.CertificateChecked(_cert(valid_before=100), "alice", "127.0.0.1", 200.0))
        assert actions == [core.AuthAnswer(core.ConnectionReply.auth_failure, 0.0)]
        assert conn.state == "authenticating"
    code, event, labels = log.records[-1]
    assert (code, event) == ("SSH_AUTH_CERT_REFUSED", "certificate_refused")
    assert labels["reason"] == "expired: certificate 'id' serial 1 was valid until 1970-01-01T00:01:40Z"


def test_a_refused_signed_certificate_fails_the_attempt_like_a_bad_key() -> None:
    conn, log = cert_core()
    for _ in range(3):
        conn.handle(core.AuthRequested("publickey", signed=True))
        actions = conn.handle(core.CertificateChecked(_cert(principals=("bob",)), "alice", None, 1.0))
        assert actions == [core.KeyAcceptable(False, 2.0)]  # delayed: it fails, and counts
        assert conn.handle(core.AuthAnswered("failure", "publickey")) == [
            core.AuthAnswer(core.ConnectionReply.auth_failure, 2.0)]
        assert log.records[-1][2]["reason"].startswith("wrong principal: ")
    conn.handle(core.AuthRequested("publickey", signed=True))
    assert conn.state == "closed" and "SSH_AUTH_TOO_MANY_TRIES" in log.codes()


def test_a_certificate_s_force_command_replaces_every_program() -> None:
    conn, log = cert_core()
    conn.handle(core.AuthRequested("publickey", signed=False))  # the query: no force yet
    conn.handle(core.CertificateChecked(_cert(force_command="echo forced"), "alice", None, 1.0))
    conn.handle(core.AuthRequested("publickey", signed=True))
    assert conn.handle(core.CertificateChecked(_cert(force_command="echo forced"), "alice", None, 1.0)) == [
        core.KeyAcceptable(True, 0.0)]
    assert conn.handle(core.AuthAnswered("success", "publickey")) == [core.AdmitUser("publickey")]
    conn.handle(core.UserVerdict(True, "publickey"))
    channel = open_session(conn)
    shell = core.ChannelRequest(channel, "shell", True, object())
    assert conn.handle(shell) == [core.StartProgram(channel, shell, "echo forced")]


def test_a_forced_command_of_a_certificate_that_did_not_log_in_binds_nothing() -> None:
    conn, log = cert_core()
    conn.handle(core.AuthRequested("publickey", signed=True))
    conn.handle(core.CertificateChecked(_cert(force_command="echo forced"), "alice", None, 1.0))
    conn.handle(core.AuthAnswered("failure", "publickey"))  # its signature did not verify
    assert log.records[-1][2]["reason"] == "bad signature"
    conn.handle(core.AuthRequested("password"))
    conn.handle(core.Credentials("ok", "password"))
    conn.handle(core.UserVerdict(True, "password"))
    channel = open_session(conn)
    exec_ = core.ChannelRequest(channel, "exec", True, object())
    assert conn.handle(exec_) == [core.StartProgram(channel, exec_, None)]


def test_a_certificate_without_permit_pty_fails_the_pty_request_itself() -> None:
    conn, log = cert_core()
    conn.handle(core.AuthRequested("publickey", signed=True))
    conn.handle(core.CertificateChecked(_cert(permit_pty=False), "alice", None, 1.0))
    conn.handle(core.AuthAnswered("success", "publickey"))
    conn.handle(core.UserVerdict(True, "publickey"))
    channel = open_session(conn)
    pty = core.ChannelRequest(channel, "pty-req", True, object())
    assert conn.handle(pty) == [core.ChannelReply(channel, False, "pty-req")]  # the backend is not asked
    code, _, labels = log.records[-1]
    assert (code, labels["reason"]) == ("SSH_CHANNEL_REQUEST_FAILED",
                                        "the certificate does not permit a pty (no permit-pty)")
    shell = core.ChannelRequest(channel, "shell", True, object())
    conn.handle(core.ChannelReplied(channel, None))
    assert conn.handle(shell) == [core.StartProgram(channel, shell, None)]  # the session goes on
