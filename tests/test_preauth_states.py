"""Every way a connection can leave each state of authentication, live.

The connection spec has three states in which an attempt is under way:
`checking` (credentials being verified), `querying` (may this key sign?) and
`kbdint_round` (a challenge is out). Anything can arrive there: a channel or
global request before authentication, a protocol violation, the client going
away, the login timeout, a shutdown. The server (`--handler apps:Holding`)
keeps the checks for user "held" pending for ever, so each state is held
until the event under test ends it; the log's entry code (SSH_AUTH_ATTEMPT,
SSH_AUTH_QUERY, SSH_AUTH_CHALLENGE) says the state was reached before the
event is sent. Each case asserts the records the spec prescribes, with the
event that logged them, and the DISCONNECT the client got.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol_client import ProtocolClient  # noqa: E402

import conftest  # noqa: E402

WAIT = 5.0
HANDLER = "apps:Holding"
ENTRY = {"checking": "SSH_AUTH_ATTEMPT", "querying": "SSH_AUTH_QUERY", "kbdint_round": "SSH_AUTH_CHALLENGE",
         "authenticated": "SSH_AUTH_SUCCESSFUL"}
MSG_NEWKEYS = 21


def _key(live: conftest.LiveServer) -> paramiko.PKey:
    return paramiko.Ed25519Key.from_private_key_file(str(live.key))


def enter(live: conftest.LiveServer, state: str, *, user: str = "held") -> tuple[ProtocolClient, str]:
    """A connection (its id) whose machine is in ``state``: the entry code is logged."""
    before = {r["labels"].get("connectionId") for r in live.records()}
    c = ProtocolClient.connect(live.port)
    c.service_request()
    assert c.next_auth_reply(WAIT) == "SERVICE_ACCEPT"
    if state == "checking":
        c.auth_password(user, "anything")
    elif state == "querying":
        c.auth_publickey(user, _key(live), signed=False)
    elif state == "kbdint_round":
        c.auth_kbdint(user)
        assert c.next_auth_reply(WAIT) == "USERAUTH_INFO_REQUEST"
    elif state == "authenticated":  # good credentials; the backend's verdict never comes
        c.auth_password("admit", "anything")
    elif state != "authenticating":
        raise ValueError(state)
    if state == "authenticating":
        records = live.wait_for(lambda rs: any(
            r["code"] == "SSH_KEX_DONE" and r["labels"].get("connectionId") not in before for r in rs))
    else:
        records = live.wait_for(lambda rs: any(
            r["code"] == ENTRY[state] and r["labels"].get("connectionId") not in before for r in rs))
    cid = next(r["labels"]["connectionId"] for r in reversed(records)
               if r["code"] == ENTRY.get(state, "SSH_KEX_DONE")
               and r["labels"].get("connectionId") not in before)
    return c, cid


def of(records: list[dict[str, Any]], cid: str) -> list[tuple[str, str | None]]:
    """The (code, event) of one connection's records."""
    return [(r["code"], r["labels"].get("event")) for r in records if r["labels"].get("connectionId") == cid]


def conn_records(live: conftest.LiveServer, cid: str) -> list[tuple[str, str | None]]:
    return of(live.records(), cid)


def ended(live: conftest.LiveServer, cid: str) -> list[tuple[str, str | None]]:
    live.wait_for(lambda rs: any(r["code"] == "SSH_DISCONNECTED" and r["labels"].get("connectionId") == cid
                                 for r in rs))
    return conn_records(live, cid)


# What ends a connection before authentication, from the client: asyncssh stops
# every connection-layer message before authentication by itself (no hook sees
# it), so the adapter fires protocol_error for each; the client gets DISCONNECT(2).
TRIGGERS: dict[str, Callable[[ProtocolClient], Any]] = {
    "global_request": lambda c: c.global_request("tcpip-forward", True),
    "global_request_malformed": lambda c: c.global_request(b"\xff\xfe", True),
    "session_open": lambda c: c.open_channel("session"),
    "channel_open_unsupported": lambda c: c.open_channel("direct-tcpip"),
    "channel_open_malformed": lambda c: c.open_channel("session", max_packet=0),
    "protocol_error": lambda c: c.raw(MSG_NEWKEYS),  # NEWKEYS with no key exchange under way
    "lost": lambda c: c.drop(),
}


@pytest.fixture(scope="module")
def holding(tmp_path_factory: pytest.TempPathFactory) -> Iterator[conftest.LiveServer]:
    live = conftest.start_server(tmp_path_factory.mktemp("holding"), "preauth-holding", handler=HANDLER)
    yield live
    live.stop()


@pytest.mark.parametrize("state", ["checking", "querying", "kbdint_round", "authenticated"])
@pytest.mark.parametrize("event", list(TRIGGERS))
def test_an_event_ends_the_attempt(holding: conftest.LiveServer, state: str, event: str) -> None:
    c, cid = enter(holding, state)
    try:
        TRIGGERS[event](c)
        records = ended(holding, cid)
        fired = "lost" if event == "lost" else "protocol_error"
        assert records[-2:] == [("SSH_HANDSHAKE_FAILED", fired), ("SSH_DISCONNECTED", fired)], records
        assert (ENTRY[state], records[-3][1]) == records[-3], records  # nothing in between
        if event != "lost":
            assert c.wait_ended(WAIT)
            assert c.disconnect is not None and c.disconnect[0] == 2, c.transcript()
    finally:
        c.close_all()


def test_login_timeout_and_shutdown_in_every_state(server_factory: Any) -> None:
    """One server, a connection held in each state; the login timeout ends them all,
    then (on a second server) a shutdown does."""
    states = ["authenticating", "checking", "querying", "kbdint_round", "authenticated"]
    for how in ("login_timeout", "shutdown"):
        live = server_factory({"limits": {"loginTimeout": "2s" if how == "login_timeout" else "60s"}},
                              handler=HANDLER)
        held = [enter(live, state) for state in states]
        try:
            if how == "shutdown":
                assert live.stop() == 0
            for state, (c, cid) in zip(states, held, strict=True):
                records = ended(live, cid)
                tail = [("SSH_HANDSHAKE_FAILED", how), ("SSH_DISCONNECTED", how)]
                if how == "login_timeout":
                    tail.insert(0, ("SSH_LOGIN_TIMEOUT", how))
                assert records[-len(tail):] == tail, (state, records)
                before = records[-len(tail) - 1]
                assert before[0] == ENTRY.get(state, "SSH_KEX_DONE"), (state, records)
                assert c.wait_ended(WAIT)
                # A shutdown says goodbye (11: by application); the login timeout just closes.
                expected = (11,) if how == "shutdown" else None
                assert (c.disconnect[:1] if c.disconnect else None) == expected, (state, c.transcript())
        finally:
            for c, _ in held:
                c.close_all()


def plain_packet(payload: bytes) -> bytes:
    """An SSH binary packet before any key exchange: no cipher, no MAC."""
    padding = 8 - (len(payload) + 5) % 8
    padding += 8 if padding < 4 else 0
    return struct.pack(">IB", len(payload) + padding + 1, padding) + payload + bytes(padding)


def handshaking(live: conftest.LiveServer) -> tuple[socket.socket, str]:
    """A connection in `handshaking`: its version is sent, its key exchange not begun."""
    before = {r["labels"].get("connectionId") for r in live.records()}
    sock = socket.create_connection((live.host, live.port))
    sock.sendall(b"SSH-2.0-Stalling\r\n")
    records = live.wait_for(lambda rs: any(
        r["code"] == "SSH_CONNECTED" and r["labels"]["connectionId"] not in before for r in rs))
    return sock, next(r["labels"]["connectionId"] for r in records
                      if r["code"] == "SSH_CONNECTED" and r["labels"]["connectionId"] not in before)


def test_a_protocol_error_during_the_key_exchange(holding: conftest.LiveServer) -> None:
    """A SERVICE_REQUEST before the key exchange finished: protocol_error in handshaking."""
    sock, cid = handshaking(holding)
    with sock:
        sock.sendall(plain_packet(bytes([5]) + struct.pack(">I", 12) + b"ssh-userauth"))
        records = ended(holding, cid)
    assert records == [("SSH_CONNECTED", "connected"), ("SSH_HANDSHAKE_FAILED", "protocol_error"),
                       ("SSH_DISCONNECTED", "protocol_error")], records


def test_a_shutdown_during_the_key_exchange(server_factory: Any) -> None:
    live = server_factory()
    sock, cid = handshaking(live)
    with sock:
        assert live.stop() == 0
        records = ended(live, cid)
    assert records == [("SSH_CONNECTED", "connected"), ("SSH_HANDSHAKE_FAILED", "shutdown"),
                       ("SSH_DISCONNECTED", "shutdown")], records


# What the client may do while a keyboard-interactive challenge is out (RFC 4256:
# any new request abandons it), and the records that follow the challenge.
IN_A_ROUND: dict[str, tuple[Callable[[ProtocolClient, paramiko.PKey], Any], list[tuple[str, str]]]] = {
    "password": (lambda c, k: c.auth_password("nobody", "wrong"),
                 [("SSH_AUTH_ATTEMPT", "password"), ("SSH_AUTH_FAILED", "auth_bad")]),
    "publickey": (lambda c, k: c.auth_publickey("nobody", k),
                  [("SSH_AUTH_ATTEMPT", "publickey"), ("SSH_AUTH_FAILED", "auth_bad")]),
    "kbdint_begin": (lambda c, k: c.auth_kbdint("nobody"),
                     [("SSH_AUTH_ATTEMPT", "kbdint_begin"), ("SSH_AUTH_CHALLENGE", "challenge")]),
    "kbdint_response": (lambda c, k: c.kbdint_respond("wrong"),
                        [("SSH_AUTH_ATTEMPT", "kbdint_response"), ("SSH_AUTH_FAILED", "auth_bad")]),
    "none_auth": (lambda c, k: c.auth_none("nobody"), [("SSH_AUTH_NONE", "none_auth")]),
    "other_method": (lambda c, k: c.userauth("nobody", "hostbased"),
                     [("SSH_AUTH_UNAVAILABLE", "other_method")]),
    "publickey_query": (lambda c, k: c.auth_publickey("nobody", k, signed=False),
                        [("SSH_AUTH_QUERY", "publickey_query"), ("SSH_AUTH_FAILED", "auth_bad")]),
}


@pytest.mark.parametrize("event", list(IN_A_ROUND))
def test_what_leaves_a_keyboard_interactive_round(holding: conftest.LiveServer, event: str) -> None:
    c, cid = enter(holding, "kbdint_round", user="nobody")
    try:
        send, expected = IN_A_ROUND[event]
        send(c, _key(holding))
        holding.wait_for(lambda rs: of(rs, cid)[-len(expected):] == expected)
        reply = c.next_auth_reply(WAIT)
        assert reply == ("USERAUTH_INFO_REQUEST" if event == "kbdint_begin" else "USERAUTH_FAILURE"), reply
        # The connection goes on: another attempt is answered.
        c.auth_none("nobody")
        assert c.next_auth_reply(WAIT) == "USERAUTH_FAILURE"
    finally:
        c.close_all()


@pytest.mark.parametrize(("state", "user", "expected", "reply"), [
    ("checking", "unavail", ("SSH_AUTH_UNAVAILABLE", "auth_unavailable"), "USERAUTH_FAILURE"),
    ("querying", "unavail", ("SSH_AUTH_UNAVAILABLE", "auth_unavailable"), "USERAUTH_FAILURE"),
    ("querying", "demo", ("SSH_AUTH_PK_OK", "auth_ok"), "USERAUTH_PK_OK"),
])
def test_verdicts_of_an_attempt_and_a_query(holding: conftest.LiveServer, state: str, user: str,
                                            expected: tuple[str, str], reply: str) -> None:
    c, cid = enter(holding, state, user=user)
    try:
        holding.wait_for(lambda rs: of(rs, cid)[-1:] == [expected])
        assert c.next_auth_reply(WAIT) == reply
    finally:
        c.close_all()


@pytest.fixture(scope="module")
def holding_small_buffer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[conftest.LiveServer]:
    live = conftest.start_server(tmp_path_factory.mktemp("holding-buffer"), "preauth-holding-buffer",
                                 handler=HANDLER, config={"limits": {"maxBufferedPerConnection": "64KiB"}})
    yield live
    live.stop()


MSG_SERVICE_REQUEST = 5


@pytest.mark.parametrize("state", ["checking", "querying", "kbdint_round"])
def test_a_client_that_asks_without_reading_ends_the_attempt(holding_small_buffer: conftest.LiveServer,
                                                              state: str) -> None:
    """In each state of an attempt a client stops reading and keeps sending
    SERVICE_REQUESTs, each answered: past limits.maxBufferedPerConnection the
    connection is dropped (buffer_exceeded), the check still pending."""
    live = holding_small_buffer
    c, cid = enter(live, state)
    try:
        c.stop_reading()
        sent = c.flood(MSG_SERVICE_REQUEST, b"\x00\x00\x00\x0cssh-userauth")
        records = ended(live, cid)
        tail = [("SSH_BUFFER_EXCEEDED", "buffer_exceeded"), ("SSH_HANDSHAKE_FAILED", "buffer_exceeded"),
                ("SSH_DISCONNECTED", "buffer_exceeded")]
        assert records[-3:] == tail, (sent, records)
        assert (ENTRY[state], records[-4][1]) == records[-4], records  # nothing in between
    finally:
        c.close_all()


# While the backend decides on an authenticated user (the docker backend starting its
# container), USERAUTH_SUCCESS waits. A client that sends another auth request
# meanwhile did not wait for the answer: the connection ends as a protocol error
# (asyncssh would cancel the attempt being admitted).
WHILE_ADMITTED: dict[str, Callable[[ProtocolClient, paramiko.PKey], Any]] = {
    "none_auth": lambda c, k: c.auth_none("admit"),
    "password": lambda c, k: c.auth_password("admit", "again"),
    "publickey_query": lambda c, k: c.auth_publickey("admit", k, signed=False),
    "publickey": lambda c, k: c.auth_publickey("admit", k),
    "kbdint_begin": lambda c, k: c.auth_kbdint("admit"),
    "other_method": lambda c, k: c.userauth("admit", "hostbased"),
    "kbdint_response": lambda c, k: c.kbdint_respond("again"),
}


@pytest.mark.parametrize("event", list(WHILE_ADMITTED))
def test_an_auth_request_while_the_backend_admits(holding: conftest.LiveServer, event: str) -> None:
    if event == "kbdint_response":
        # Authenticated through keyboard-interactive: its auth is still the one in progress.
        before = {r["labels"].get("connectionId") for r in holding.records()}
        c = ProtocolClient.connect(holding.port)
        c.service_request()
        assert c.next_auth_reply(WAIT) == "SERVICE_ACCEPT"
        c.auth_kbdint("admit")
        assert c.next_auth_reply(WAIT) == "USERAUTH_INFO_REQUEST"
        c.kbdint_respond("anything")
        records = holding.wait_for(lambda rs: any(
            r["code"] == "SSH_AUTH_SUCCESSFUL" and r["labels"].get("connectionId") not in before for r in rs))
        cid = next(r["labels"]["connectionId"] for r in records
                   if r["code"] == "SSH_AUTH_SUCCESSFUL" and r["labels"].get("connectionId") not in before)
    else:
        c, cid = enter(holding, "authenticated")
    try:
        WHILE_ADMITTED[event](c, _key(holding))
        records = ended(holding, cid)
        assert records[-3:] == [("SSH_AUTH_SUCCESSFUL", "auth_ok"), ("SSH_HANDSHAKE_FAILED", event),
                                ("SSH_DISCONNECTED", event)], records
        assert c.wait_ended(WAIT)
        assert c.disconnect is not None and c.disconnect[0] == 2, c.transcript()
        assert "USERAUTH_SUCCESS" not in " ".join(c.transcript())
    finally:
        c.close_all()
