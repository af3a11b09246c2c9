"""Per-source admission and the failure delay, live: a real `sshspec serve`, real
sockets from several loopback addresses (all of 127/8 is loopback on Linux), so
127.0.0.2, .3, ... play attackers and legitimate hosts side by side.

The fixtures' base config (conftest) exempts 127.0.0.1 and relaxes the startup
limits for the rest of the suite; these tests put the defaults back
(`DEFAULTS`) and set only what each needs. The core's arithmetic is tested
deterministically in tests/test_admission_core.py; the figures under attack are
bench/hostile_admission.py's.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import asyncssh
import pytest
from protocol_client import ProtocolClient

from conftest import USERNAME, LiveServer
from test_faults import HOST, asyncssh_options, check_log, limited, wait_until

# What conftest relaxes for the rest of the suite, back to the defaults.
DEFAULTS: dict[str, Any] = {"limits": {"maxStartups": "10:30:100", "perSourceMaxStartups": 5}}
WAIT = 10.0


def config(**limits: Any) -> dict[str, Any]:
    """DEFAULTS with these limits (and `auth` for failureDelay) on top."""
    auth = limits.pop("auth", None)
    out: dict[str, Any] = {"limits": {**DEFAULTS["limits"], **limits}}
    if auth is not None:
        out["auth"] = auth
    return out


def knock(port: int, source: str, *, version: bool = True) -> tuple[socket.socket, bytes | None]:
    """A TCP connection from `source` that (optionally) sends a version line and then
    nothing: the server's first bytes, or None when it closed the connection at once."""
    sock = socket.create_connection((HOST, port), timeout=WAIT, source_address=(source, 0))
    if version:
        sock.sendall(b"SSH-2.0-stalled\r\n")
    try:
        data = sock.recv(256)
    except ConnectionResetError:
        data = b""
    return sock, data or None


def local(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def login(live: LiveServer, source: str, command: str = "echo in") -> str:
    """A password login from `source` running `command`; its output."""
    async def main() -> str:
        async with asyncssh.connect(HOST, live.port, local_addr=(source, 0),
                                    **asyncssh_options(login_timeout=WAIT)) as conn:
            return str((await conn.run(command, check=True)).stdout)
    return asyncio.run(main())


def records_of(live: LiveServer, code: str) -> list[dict[str, Any]]:
    return [r for r in live.records() if r["code"] == code]


def only(live: LiveServer, code: str) -> dict[str, Any]:
    """The one record of `code`, once it is there."""
    live.wait_for_code(code)
    [record] = records_of(live, code)
    return record


def client(live: LiveServer, source: str) -> ProtocolClient:
    c = ProtocolClient.connect(live.port, source=source, wait=WAIT)
    c.service_request()
    assert c.next_auth_reply() == "SERVICE_ACCEPT"
    return c


# --------------------------------------------------------------------------- maxStartups start:rate:full


def test_random_early_drop_refuses_past_start(server_factory) -> None:  # type: ignore[no-untyped-def]
    # rate 100: past `start` every new connection is dropped (OpenSSH: the same), so the test is exact.
    live = limited(server_factory, config(maxStartups="2:100:10", perSourceMaxStartups=0),
                   {"maxStartups": 10})
    held = [knock(live.port, "127.0.0.2") for _ in range(2)]
    assert all(first is not None and first.startswith(b"SSH-2.0-sshspec") for _, first in held)
    sock, first = knock(live.port, "127.0.0.3")
    assert first is None  # closed before the version exchange
    drop = only(live, "SSH_STARTUPS_EARLY_DROP")
    assert drop["labels"]["remoteAddr"] == local(sock)
    assert drop["labels"]["reason"] == ("2 unauthenticated connections (maxStartups 2:100:10): "
                                        "dropped with probability 100%")
    assert drop["labels"]["event"] == "early_drop"
    sock.close()
    for s, _ in held:
        s.close()
    live.wait_for_code("SSH_DISCONNECTED", 2)
    assert login(live, "127.0.0.3") == "in\n"  # below start again
    check_log(live)


# --------------------------------------------------------------------------- perSourceMaxStartups


def test_one_source_fills_only_its_own_startups(server_factory) -> None:  # type: ignore[no-untyped-def]
    live = server_factory(config())
    held = [knock(live.port, "127.0.0.2") for _ in range(5)]
    assert all(first is not None for _, first in held)
    sock, first = knock(live.port, "127.0.0.2")
    assert first is None
    full = only(live, "SSH_SOURCE_STARTUPS_EXCEEDED")
    assert (full["labels"]["remoteAddr"], full["labels"]["event"]) == (local(sock), "source_full")
    assert full["labels"]["reason"] == "127.0.0.2/32: 5 unauthenticated connections (perSourceMaxStartups 5)"
    sock.close()
    # Another host is not affected (5 startups in all: below maxStartups' start, no early drop).
    assert login(live, "127.0.0.3") == "in\n"
    # Leaving without authenticating costs the source 1 s each (noauth): not refused.
    for s, _ in held:
        s.close()
    live.wait_for_code("SSH_PENALTY", 5)
    penalties = records_of(live, "SSH_PENALTY")
    noauth = [r for r in penalties if r["labels"]["reason"].startswith("127.0.0.2/32 noauth +1s")]
    assert len(noauth) == 5 and all(r["labels"]["event"] == "penalty" for r in noauth)
    assert login(live, "127.0.0.2") == "in\n"
    check_log(live)


# --------------------------------------------------------------------------- penalties


def test_failed_passwords_penalise_the_source(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Defaults (authfail 5 s, refused past 15 s): the fourth failure in a row
    refuses the source; its connection ends at its next attempt, new ones are
    refused, other hosts log in."""
    live = server_factory(config(auth={"failureDelay": "300ms"}))
    guesser = client(live, "127.0.0.4")
    try:
        for i in range(4):
            sent = time.monotonic()
            guesser.auth_password(USERNAME, f"wrong {i}")
            assert guesser.next_auth_reply().startswith("USERAUTH_FAILURE")
            assert time.monotonic() - sent >= 0.3  # the failure delay
        records = live.wait_for(lambda rs: any(r["code"] == "SSH_PENALTY_ACTIVE" for r in rs))
        penalties = [r for r in records if r["code"] in ("SSH_PENALTY", "SSH_PENALTY_ACTIVE")]
        assert [r["code"] for r in penalties] == ["SSH_PENALTY"] * 3 + ["SSH_PENALTY_ACTIVE"]
        assert all(r["labels"]["reason"].startswith("127.0.0.4/32 authfail +5s") for r in penalties)
        # The guesser's next attempt ends its connection before any check.
        guesser.auth_password(USERNAME, "wrong 4")
        assert guesser.next_auth_reply() == "DISCONNECT(14)"
        assert guesser.disconnect == (14, "Too many authentication failures")
    finally:
        guesser.close_all()
    penalised = only(live, "SSH_AUTH_PENALISED")
    assert penalised["labels"]["event"] == "attempt_penalised"
    assert penalised["labels"]["reason"].startswith("127.0.0.4/32 penalised for authfail (")
    cid = penalised["labels"]["connectionId"]
    attempts = [r["labels"]["connectionId"] for r in records_of(live, "SSH_AUTH_ATTEMPT")]
    assert attempts == [cid] * 4  # the 5th was not checked
    # New connections from the source are refused; another host logs in.
    sock, first = knock(live.port, "127.0.0.4")
    assert first is None
    refused = only(live, "SSH_SOURCE_PENALISED")
    assert refused["labels"]["remoteAddr"] == local(sock) and refused["labels"]["event"] == "source_penalised"
    sock.close()
    assert login(live, "127.0.0.5") == "in\n"
    check_log(live)


def test_a_penalty_expires(server_factory) -> None:  # type: ignore[no-untyped-def]
    live = server_factory(config(auth={"failureDelay": 0},
                                 perSourcePenalties={"authfail": "2s", "min": "1s", "max": "3s"}))
    guesser = client(live, "127.0.0.4")
    try:
        failed_at = time.monotonic()
        guesser.auth_password(USERNAME, "wrong")
        assert guesser.next_auth_reply().startswith("USERAUTH_FAILURE")
    finally:
        guesser.close_all()
    live.wait_for_code("SSH_PENALTY_ACTIVE")
    sock, first = knock(live.port, "127.0.0.4")
    sock.close()
    assert first is None

    def admitted() -> bool:
        s, data = knock(live.port, "127.0.0.4", version=False)
        s.close()
        return data is not None
    wait_until(admitted, timeout=10, what="the penalty to expire", interval=0.1)
    # The server's loop clock is CLOCK_MONOTONIC too: 2 s from the failure, not sooner.
    assert 2.0 <= time.monotonic() - failed_at < 6.0
    check_log(live)


def test_a_keyboard_interactive_answer_after_the_penalty_ends_the_connection(server_factory) -> None:  # type: ignore[no-untyped-def]
    """A challenge is out when another connection from the same host gets it
    penalised: the answer ends the connection, unchecked."""
    live = server_factory(config(auth={"failureDelay": 0}, perSourcePenalties={"authfail": "10s"}))
    waiting = client(live, "127.0.0.6")
    try:
        waiting.auth_kbdint(USERNAME)
        assert waiting.next_auth_reply() == "USERAUTH_INFO_REQUEST"
        guesser = client(live, "127.0.0.6")
        try:
            for _ in range(2):  # 20 s: past 15
                guesser.auth_password(USERNAME, "wrong")
                assert guesser.next_auth_reply().startswith("USERAUTH_FAILURE")
        finally:
            guesser.close_all()
        live.wait_for_code("SSH_PENALTY_ACTIVE")
        waiting.kbdint_respond("correct horse")  # right or wrong: it is not checked
        assert waiting.next_auth_reply() == "DISCONNECT(14)"
    finally:
        waiting.close_all()
    penalised = only(live, "SSH_AUTH_PENALISED")
    assert penalised["labels"]["method"] == "keyboard-interactive"
    assert not records_of(live, "SSH_AUTH_SUCCESSFUL")
    check_log(live)


def test_login_timeouts_and_protocol_errors_penalise(server_factory) -> None:  # type: ignore[no-untyped-def]
    live = server_factory(config(loginTimeout="1s"))
    held = [knock(live.port, "127.0.0.7") for _ in range(2)]
    assert all(first is not None for _, first in held)
    live.wait_for_code("SSH_LOGIN_TIMEOUT", 2)
    records = live.wait_for(lambda rs: any(r["code"] == "SSH_PENALTY_ACTIVE" for r in rs))
    reasons = [r["labels"]["reason"] for r in records if r["code"] in ("SSH_PENALTY", "SSH_PENALTY_ACTIVE")]
    assert reasons[0].startswith("127.0.0.7/32 grace-exceeded +10s: 10s")
    assert reasons[1].startswith("127.0.0.7/32 grace-exceeded +10s: 20s, refused")
    for s, _ in held:
        s.close()
    sock, first = knock(live.port, "127.0.0.7")
    sock.close()
    assert first is None
    live.wait_for_code("SSH_SOURCE_PENALISED")
    # A protocol violation before login (NEWKEYS with no key exchange under way).
    bad = client(live, "127.0.0.8")
    try:
        bad.raw(21)
        assert bad.wait_ended()
    finally:
        bad.close_all()
    def protocol_errors(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rs if r["code"] == "SSH_PENALTY" and "protocol-error" in r["labels"]["reason"]]
    [penalty] = protocol_errors(live.wait_for(protocol_errors))
    assert penalty["labels"]["reason"] == "127.0.0.8/32 protocol-error +5s: 5s, refused past 15s"
    check_log(live)


def test_the_penalty_table_is_bounded(server_factory) -> None:  # type: ignore[no-untyped-def]
    """maxSources penalised sources per address family: permissive, the one closest
    to expiry is forgotten; deny-all, every source not exempt is refused."""
    permissive = server_factory(config(perSourcePenalties={"maxSources": 1, "noauth": "30s"}))
    for source in ("127.0.0.9", "127.0.0.10"):
        sock, first = knock(permissive.port, source)
        assert first is not None
        sock.close()
    full = only(permissive, "SSH_PENALTY_TABLE_FULL")
    assert full["labels"]["event"] == "penalty_overflow"
    assert full["labels"]["reason"].startswith(
        "1 IPv4 sources penalised (maxSources 1): forgot 127.0.0.9/32 (")
    assert login(permissive, "127.0.0.9") == "in\n"  # forgotten
    sock, first = knock(permissive.port, "127.0.0.10")  # remembered
    sock.close()
    assert first is None
    check_log(permissive)

    deny = server_factory(config(perSourcePenalties={"maxSources": 1, "noauth": "30s", "overflow": "deny-all",
                                                     "exempt": ["127.0.0.12"]}))
    sock, first = knock(deny.port, "127.0.0.11")
    assert first is not None
    sock.close()
    deny.wait_for_code("SSH_PENALTY_ACTIVE")
    sock, first = knock(deny.port, "127.0.0.13")  # never penalised, refused all the same
    assert first is None
    full = only(deny, "SSH_PENALTY_TABLE_FULL")
    assert (full["labels"]["event"], full["labels"]["remoteAddr"]) == ("penalty_table_full", local(sock))
    sock.close()
    assert login(deny, "127.0.0.12") == "in\n"  # exempt
    check_log(deny)


# --------------------------------------------------------------------------- the failure delay


def test_a_failure_waits_without_holding_anyone_else(server_factory) -> None:  # type: ignore[no-untyped-def]
    """A wrong password is answered `failureDelay` after it arrived; meanwhile the
    event loop serves other connections at full speed."""
    live = server_factory(config(auth={"failureDelay": "4s"}))
    guesser = client(live, "127.0.0.14")
    answered: list[float] = []

    def guess() -> None:
        sent = time.monotonic()
        guesser.auth_password(USERNAME, "wrong")
        assert guesser.next_auth_reply(WAIT).startswith("USERAUTH_FAILURE")
        answered.append(time.monotonic() - sent)
    try:
        thread = threading.Thread(target=guess)
        thread.start()
        live.wait_for(lambda rs: any(r["code"] == "SSH_AUTH_FAILED" for r in rs))  # in its delay now
        assert login(live, "127.0.0.15") == "in\n"
        assert not answered  # a whole login and a command while the failure waited
        thread.join(WAIT)
        assert answered and answered[0] >= 4.0
    finally:
        guesser.close_all()
    check_log(live)


def test_pipelined_attempts_do_not_skip_the_delay(server_factory) -> None:  # type: ignore[no-untyped-def]
    """An attempt sent while the previous failure waits supersedes it (no answer
    for that one), and is not checked before that failure's time: two guesses
    take two delays, however they are sent."""
    live = server_factory(config(auth={"failureDelay": "1s"}))
    guesser = client(live, "127.0.0.16")
    try:
        sent = time.monotonic()
        guesser.auth_password(USERNAME, "wrong 1")
        live.wait_for(lambda rs: any(r["code"] == "SSH_AUTH_FAILED" for r in rs))  # checked, answer waiting
        guesser.auth_password(USERNAME, "wrong 2")
        assert guesser.next_auth_reply().startswith("USERAUTH_FAILURE")
        assert time.monotonic() - sent >= 2.0
        assert not guesser.auth_replies  # one answer for two attempts
    finally:
        guesser.close_all()
    failed = records_of(live, "SSH_AUTH_FAILED")
    assert len(failed) == 2
    check_log(live)


@pytest.mark.parametrize("delay", ["0", "300ms"])
def test_a_right_password_is_never_delayed(server_factory, delay: str) -> None:  # type: ignore[no-untyped-def]
    live = server_factory(config(auth={"failureDelay": delay}))
    started = time.monotonic()
    assert login(live, "127.0.0.17") == "in\n"
    assert time.monotonic() - started < 5.0
    check_log(live)
