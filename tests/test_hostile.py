"""Hostile input against a live `sshspec serve`.

* After authentication: hypothesis-generated channel requests, global requests
  and channel opens, well-formed or broken in every field (truncated, trailing
  bytes, wrong types, bad encodings, lengths that lie, oversized), sent through a
  protocol-level client (paramiko's transport with hand-built packets). Each one
  is answered, SSH_DECODE_FAILED is logged exactly where the specs say (a payload
  the request's decoder refuses, a name that is not ASCII), the connection
  survives, and other connections are unaffected.
* Before authentication: channel opens, channel requests, channel data and
  global requests end the connection and open nothing (CVE-2025-32433);
  "none" never succeeds; usernames and passwords of any bytes and lengths are
  handled; password checks take the same path and time for unknown users.

The sessions are served by an in-process handler (`InertApp`) whose programs
never run anything: a generated `exec` must not reach a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import paramiko
import pytest
from asyncssh.saslprep import SASLPrepError, saslprep
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PASSWORD, USERNAME, LiveServer
from sshspec.adapters import handlers, passwords
from sshspec.adapters.handlers import ConnectionInfo, SessionHandler, SessionIO
from test_faults import (
    HOST,
    MSG_CHANNEL_OPEN,
    MSG_CHANNEL_OPEN_CONFIRMATION,
    MSG_CHANNEL_OPEN_FAILURE,
    LogTail,
    RawClient,
    _Password,
    asyncssh_options,
    by_connection,
    check_all_disconnected,
    check_log,
    codes_of,
    connection_of,
    paramiko_transport,
    ssh_string,
    stderr_problems,
    wait_until,
)

HYPOTHESIS = {"deadline": None, "derandomize": True, "database": None,
              "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}


class InertSession(SessionHandler):
    """A program that runs nothing: it waits for the client's EOF."""

    async def run(self, io: SessionIO) -> int:
        await io.stdin.read()
        return 0


class InertApp(_Password):
    def session(self, conn: ConnectionInfo) -> SessionHandler:
        return InertSession()


@pytest.fixture
def inert(server_factory) -> Iterator[LiveServer]:  # type: ignore[no-untyped-def]
    # No forwarding: the fuzzed tcpip-forward and direct-tcpip requests that decode are denied by
    # policy rather than binding and connecting wherever hypothesis points them.
    yield server_factory({"forwarding": {"tcp": "none", "agent": False}}, handler="test_hostile:InertApp")


def local_addr(sock: Any) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def good_login_works(live: LiveServer) -> None:
    async def main() -> None:
        async with asyncssh.connect(HOST, live.port, **asyncssh_options()) as conn:
            proc = await conn.create_process("true")  # InertApp: waits for EOF; bash: true
            proc.stdin.write_eof()
            await proc.wait_closed()
            assert proc.exit_status == 0
    asyncio.run(main())


# --------------------------------------------------------------------------- payload strategies

u32 = st.integers(0, 2**32 - 1)
utf8 = st.text(max_size=40).map(lambda s: s.encode())
ascii_ = st.text(st.characters(max_codepoint=127), max_size=20).map(lambda s: s.encode())
not_utf8 = st.sampled_from([b"\xff", b"\xc3(", b"a\xed\xa0\x80b", b"\x80abc"])
not_ascii = st.sampled_from([b"\xe9t\xe9", b"\xff", "π".encode()])


@st.composite
def modes(draw: Any) -> bytes:
    ops = draw(st.lists(st.tuples(st.integers(1, 159), u32), max_size=5))
    blob = b"".join(bytes([op]) + struct.pack(">I", v) for op, v in ops)
    return blob + (b"\x00" if draw(st.booleans()) else b"")


# Field kinds per request type (the decoders in asyncssh_internals must accept
# exactly these). "utf8"/"ascii" are strings whose bytes must decode so.
SCHEMAS: dict[str, list[str]] = {
    "env": ["utf8", "utf8"],
    "pty-req": ["ascii", "u32", "u32", "u32", "u32", "modes"],
    "shell": [],
    "exec": ["utf8"],
    "subsystem": ["utf8"],
    "window-change": ["u32", "u32", "u32", "u32"],
    "signal": ["ascii"],
    "break": ["u32"],
    "x11-req": ["bool", "ascii", "ascii", "u32"],
    "auth-agent-req@openssh.com": [],
    "keepalive@openssh.com": [],
}
FIELD: dict[str, Any] = {
    "u32": u32.map(lambda v: struct.pack(">I", v)),
    "bool": st.sampled_from([b"\x00", b"\x01", b"\x07"]),
    "utf8": utf8.map(ssh_string),
    "ascii": ascii_.map(ssh_string),
    "modes": modes().map(ssh_string),
}
ANY_FIELD = st.one_of(*FIELD.values(), st.binary(max_size=12))


@st.composite
def channel_request(draw: Any) -> tuple[bytes, bytes, bool | None, str]:
    """(name, payload, decode_failed expected, what). `decode_failed` is None when
    the specs leave it open (a field of the wrong type may happen to decode)."""
    kind = draw(st.sampled_from(["valid", "truncated", "trailing", "bad-encoding", "lying-length",
                                 "oversized", "wrong-type", "unknown", "not-ascii-name", "random"]))
    if kind == "unknown":
        name = draw(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30))
        if name in SCHEMAS:
            name += "@x"
        return name.encode(), draw(st.binary(max_size=64)), False, kind
    if kind == "not-ascii-name":
        return draw(not_ascii), draw(st.binary(max_size=16)), True, kind
    if kind == "random":
        return draw(st.sampled_from(sorted(SCHEMAS))).encode(), draw(st.binary(max_size=64)), None, kind
    name = draw(st.sampled_from(sorted(SCHEMAS)))
    fields = [draw(FIELD[f]) for f in SCHEMAS[name]]
    valid = b"".join(fields)
    if kind == "valid":
        return name.encode(), valid, False, kind
    if kind == "truncated":
        if not valid:
            return name.encode(), b"\x00", True, "trailing"
        return name.encode(), valid[:draw(st.integers(0, len(valid) - 1))], True, kind
    if kind == "trailing":
        return name.encode(), valid + draw(st.binary(min_size=1, max_size=8)), True, kind
    texts = [i for i, f in enumerate(SCHEMAS[name]) if f in ("utf8", "ascii")]
    strings = [i for i, f in enumerate(SCHEMAS[name]) if f in ("utf8", "ascii", "modes")]
    if kind == "bad-encoding" and texts:
        i = draw(st.sampled_from(texts))
        fields[i] = ssh_string(draw(not_utf8 if SCHEMAS[name][i] == "utf8" else not_ascii))
        return name.encode(), b"".join(fields), True, kind
    if kind == "lying-length" and strings:
        i = draw(st.sampled_from(strings))
        fields[i] = struct.pack(">I", draw(st.sampled_from([2**32 - 1, 2**31, 65536]))) + fields[i][4:]
        return name.encode(), b"".join(fields), True, kind
    if kind == "oversized" and strings:
        i = draw(st.sampled_from(strings))
        size = draw(st.sampled_from([4096, 16000]))
        fields[i] = ssh_string((b"A" if SCHEMAS[name][i] != "modes" else b"\x00") * size)
        return name.encode(), b"".join(fields), False, kind
    if SCHEMAS[name]:  # wrong-type, or a kind this request has no field for
        i = draw(st.integers(0, len(fields) - 1))
        fields[i] = draw(ANY_FIELD)
        return name.encode(), b"".join(fields), None, "wrong-type"
    return name.encode(), draw(st.binary(min_size=1, max_size=8)), True, "trailing"


def _request_records(records: list[dict[str, Any]], cid: str, channel_id: int) -> list[str]:
    return [r["code"] for r in records
            if r["labels"].get("connectionId") == cid and r["labels"].get("channelId") == channel_id]


def test_malformed_channel_requests_after_auth(inert: LiveServer) -> None:
    live = inert
    client = RawClient.login(live.port)
    chan = client.open_session()
    tail = LogTail(live)
    tail.wait(lambda rs: any(r["code"] == "SSH_NEW_CHANNEL" for r in rs), 10, "the channel")
    cid = connection_of(tail.records, local_addr(client.transport.sock))
    assert cid is not None
    server_channel = next(r["labels"]["channelId"] for r in tail.records if r["code"] == "SSH_NEW_CHANNEL")
    other = RawClient.login(live.port)  # a bystander on another connection
    other_chan = other.open_session()
    stats: dict[str, int] = {}

    @settings(max_examples=300, **HYPOTHESIS)
    @given(channel_request())
    def one(request: tuple[bytes, bytes, bool | None, str]) -> None:
        name, payload, decode_failed, kind = request
        stats[kind] = stats.get(kind, 0) + 1
        before = len(client.channel_replies)
        mark = len(tail.records)
        client.channel_request(chan, name, payload)
        client.wait_replies(channel=before + 1, timeout=10)
        ok = client.channel_replies[-1][1]
        tail.poll()
        codes = _request_records(tail.records[mark:], cid, server_channel)
        assert codes[0] == "SSH_CHANNEL_REQUEST", codes
        assert codes[-1] == ("SSH_CHANNEL_REQUEST_SUCCESSFUL" if ok else "SSH_CHANNEL_REQUEST_FAILED"), codes
        if decode_failed is not None:
            assert ("SSH_DECODE_FAILED" in codes) == decode_failed, (kind, name, payload, codes)
        if "SSH_DECODE_FAILED" in codes:
            assert not ok
        assert client.transport.is_active()

    one()
    # The channel still works, and so does the other connection.
    before = len(client.channel_replies)  # counted before sending: both replies may be in at once
    client.channel_request(chan, "window-change", struct.pack(">IIII", 80, 24, 0, 0))
    client.channel_request(chan, "env", ssh_string("A") + ssh_string("b"))
    client.wait_replies(channel=before + 2)
    other.channel_request(other_chan, "env", ssh_string("A") + ssh_string("b"))
    other.wait_replies(channel=1)
    assert other.channel_replies == [(other_chan.get_id(), True)]
    sent = sum(stats.values())
    decode_failed = sum(r["code"] == "SSH_DECODE_FAILED" for r in tail.records)
    print(f"malformed channel requests: {sent} sent {dict(sorted(stats.items()))}, "
          f"{decode_failed} SSH_DECODE_FAILED, server alive")
    client.close()
    other.close()
    good_login_works(live)
    live.wait_for(lambda rs: sum(r["code"] == "SSH_DISCONNECTED" for r in rs) == 3)
    assert not stderr_problems(live), live.stderr_lines
    check_log(live)


@st.composite
def global_request(draw: Any) -> tuple[bytes, bytes, bool]:
    """(name, payload, name decodes)."""
    name = draw(st.one_of(
        st.sampled_from([b"tcpip-forward", b"cancel-tcpip-forward", b"keepalive@openssh.com",
                         b"no-more-sessions@openssh.com", b"hostkeys-prove-00@openssh.com",
                         b"streamlocal-forward@openssh.com"]),
        st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30)
        .map(str.encode),
        not_ascii))
    payload = draw(st.one_of(
        st.just(b""),
        st.binary(max_size=64),
        st.tuples(ascii_, u32).map(lambda t: ssh_string(t[0]) + struct.pack(">I", t[1])),
        st.tuples(ascii_, u32).map(lambda t: (ssh_string(t[0]) + struct.pack(">I", t[1]))[:-2]),
        st.just(struct.pack(">I", 2**32 - 1) + b"x")))
    try:
        name.decode("ascii")
    except UnicodeDecodeError:
        return name, payload, False
    return name, payload, True


def expected_global_code(name: bytes, payload: bytes, decodes: bool) -> str:
    """What the inert server (forwarding.tcp none) logs for a global request."""
    from sshspec.adapters.asyncssh_internals import GlobalRequest, RequestDecodeError, decode_tcpip_forward
    if not decodes:
        return "SSH_DECODE_FAILED"
    if name not in (b"tcpip-forward", b"cancel-tcpip-forward"):
        return "SSH_UNSUPPORTED_GLOBAL_REQUEST"
    try:
        decode_tcpip_forward(GlobalRequest(0, name.decode(), name, True, payload))
    except RequestDecodeError:
        return "SSH_DECODE_FAILED"
    return "SSH_REMOTE_FORWARD_DENIED" if name == b"tcpip-forward" else "SSH_REMOTE_FORWARD_NOT_FOUND"


def test_malformed_global_requests_after_auth(inert: LiveServer) -> None:
    live = inert
    client = RawClient.login(live.port)
    tail = LogTail(live)
    tail.wait(lambda rs: "SSH_HANDSHAKE_SUCCESSFUL" in [r["code"] for r in rs])
    count = [0]

    @settings(max_examples=150, **HYPOTHESIS)
    @given(global_request())
    def one(request: tuple[bytes, bytes, bool]) -> None:
        name, payload, decodes = request
        count[0] += 1
        before = len(client.global_replies)
        mark = len(tail.records)
        client.global_request(name, payload)
        client.wait_replies(glob=before + 1, timeout=10)
        assert client.global_replies[-1] is False  # nothing global is served here
        tail.poll()
        codes = [r["code"] for r in tail.records[mark:]]
        assert codes == [expected_global_code(name, payload, decodes)], codes
        assert client.transport.is_active()

    one()
    # Truncated headers (no want_reply byte, or not even a name): no reply is owed.
    tail.poll()
    mark = len(tail.records)
    client.send(bytes([80]) + ssh_string("keepalive@openssh.com"))
    client.send(bytes([80]) + b"\x00\x00")
    client.global_request("keepalive@openssh.com")
    client.wait_replies(glob=count[0] + 1)
    tail.wait(lambda rs: len(rs) >= mark + 3)
    assert [r["code"] for r in tail.records[mark:mark + 3]] == ["SSH_DECODE_FAILED", "SSH_DECODE_FAILED",
                                                                "SSH_UNSUPPORTED_GLOBAL_REQUEST"]
    print(f"malformed global requests: {count[0] + 3} sent, server alive")
    client.close()
    good_login_works(live)
    live.wait_for(lambda rs: sum(r["code"] == "SSH_DISCONNECTED" for r in rs) == 2)
    check_log(live)


class _OpenRecorder:
    """Records CHANNEL_OPEN_CONFIRMATION / FAILURE for raw channel opens."""

    def __init__(self, client: RawClient) -> None:
        self.replies: list[tuple[int, int]] = []  # (message type, our sender channel)
        self.cond = threading.Condition()
        self.transport = client.transport
        table = client.transport._handler_table
        for kind in (MSG_CHANNEL_OPEN_CONFIRMATION, MSG_CHANNEL_OPEN_FAILURE):
            table[kind] = lambda m, kind=kind, orig=table[kind]: self._record(kind, m, orig)

    def _record(self, kind: int, m: paramiko.Message, orig: Any) -> None:
        chanid = m.get_int()
        if chanid in self.transport.channel_events:  # one of paramiko's own opens
            m.rewind()
            orig(m)
            return
        with self.cond:
            self.replies.append((kind, chanid))
            self.cond.notify_all()

    def wait(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.replies) >= n, 10), self.replies


@st.composite
def channel_open(draw: Any) -> tuple[bytes, bytes]:
    """A CHANNEL_OPEN of a type the server refuses, its fields intact or broken.
    "session" is left out: a malformed session open is confirmed (a known bug,
    pinned by test_malformed_session_open_is_refused)."""
    name = draw(st.one_of(
        st.sampled_from([b"direct-tcpip", b"forwarded-tcpip", b"x11", b"auth-agent@openssh.com",
                         b"direct-streamlocal@openssh.com"]),
        st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20)
        .map(str.encode).filter(lambda n: n != b"session"),
        not_ascii))
    sender = struct.pack(">I", draw(st.integers(1000, 2000)))
    tail = draw(st.one_of(
        st.just(b""),  # window and packet size missing
        u32.map(lambda v: struct.pack(">I", v)),  # packet size missing
        st.tuples(u32, st.just(0)).map(lambda t: struct.pack(">II", *t)),  # packet size 0
        st.tuples(u32, st.integers(1, 2**32 - 1), st.binary(max_size=32))
        .map(lambda t: struct.pack(">II", t[0], t[1]) + t[2])))
    return name, ssh_string(name) + sender + tail


def test_malformed_channel_opens_after_auth(inert: LiveServer) -> None:
    live = inert
    client = RawClient.login(live.port)
    opens = _OpenRecorder(client)
    sent = [0]

    @settings(max_examples=100, **HYPOTHESIS)
    @given(channel_open())
    def one(request: tuple[bytes, bytes]) -> None:
        name, body = request
        sent[0] += 1
        client.send(bytes([MSG_CHANNEL_OPEN]) + body)
        opens.wait(sent[0])
        kind, sender = opens.replies[-1]
        assert kind == MSG_CHANNEL_OPEN_FAILURE
        assert sender == struct.unpack(">I", body[4 + len(name):8 + len(name)])[0]
        assert client.transport.is_active()

    one()
    records = live.records()
    assert "SSH_NEW_CHANNEL" not in [r["code"] for r in records]
    chan = client.transport.open_session(timeout=10)  # a proper one still works
    chan.exec_command("x")
    chan.shutdown_write()
    assert chan.recv_exit_status() == 0
    print(f"malformed channel opens: {sent[0]} sent, all refused, server alive")
    client.close()
    live.wait_for_code("SSH_DISCONNECTED")
    check_log(live)


@pytest.mark.parametrize("tail", [b"", struct.pack(">I", 2**21), struct.pack(">II", 2**21, 0)],
                         ids=["no-window", "no-packet-size", "packet-size-0"])
def test_malformed_session_open_is_refused(inert: LiveServer, tail: bytes) -> None:
    """A "session" CHANNEL_OPEN without its window / maximum packet size, or with
    a maximum packet size of 0, must be refused like any malformed open (the
    server can never send on such a channel: its program's output stalls for
    ever). It is refused with SSH_DECODE_FAILED (connection spec: channel_open_malformed)."""
    client = RawClient.login(inert.port)
    opens = _OpenRecorder(client)
    client.send(bytes([MSG_CHANNEL_OPEN]) + ssh_string("session") + struct.pack(">I", 1000) + tail)
    opens.wait(1)
    try:
        assert opens.replies == [(MSG_CHANNEL_OPEN_FAILURE, 1000)]
        codes = inert.wait_for_code("SSH_DECODE_FAILED")
        assert "SSH_NEW_CHANNEL" not in [r["code"] for r in codes]
    finally:
        client.close()


def test_truncated_channel_header_is_a_protocol_error(inert: LiveServer) -> None:
    """A CHANNEL_REQUEST too short to name its channel: asyncssh's rule (HACKS.md
    section 3), a DISCONNECT; the server goes on."""
    live = inert
    client = RawClient.login(live.port)
    addr = local_addr(client.transport.sock)
    client.send(bytes([98, 0, 0]))
    wait_until(lambda: not client.transport.is_active(), 10, "the disconnect")
    records = live.wait_for_code("SSH_DISCONNECTED")
    cid = connection_of(records, addr)
    assert cid is not None and codes_of(records, cid)[-1] == "SSH_DISCONNECTED"
    good_login_works(live)
    check_log(live)


def test_a_window_adjust_past_2_32_is_a_protocol_error(inert: LiveServer) -> None:
    """RFC 4254 5.2 caps a window at 2^32 - 1 bytes: an adjust within it is taken, one
    past it ends the connection as a protocol error (as OpenSSH does); the server goes on."""
    live = inert
    client = RawClient.login(live.port)
    addr = local_addr(client.transport.sock)
    chan = client.open_session()
    recipient = struct.pack(">I", chan.remote_chanid)
    client.send(bytes([93]) + recipient + struct.pack(">I", 1 << 20))  # 2 MiB in all: fine
    client.channel_request(chan, "env", ssh_string("A") + ssh_string("b"))
    client.wait_replies(channel=1)
    assert client.transport.is_active()
    client.send(bytes([93]) + recipient + struct.pack(">I", 0xFFFFFFFF))
    wait_until(lambda: not client.transport.is_active(), 10, "the disconnect")
    records = live.wait_for_code("SSH_DISCONNECTED")
    cid = connection_of(records, addr)
    mine = [r for r in records if r["labels"].get("connectionId") == cid]
    assert mine[-1]["code"] == "SSH_DISCONNECTED", mine
    assert mine[-1]["labels"]["event"] == "protocol_error"
    assert "Window adjust overflows" in mine[-1]["labels"]["reason"]
    good_login_works(live)
    check_log(live)


def test_oversized_packets(inert: LiveServer) -> None:
    """A 200 KiB channel request is decoded and answered (the inert handler takes
    any env); a packet over asyncssh's 256 KiB limit is a protocol error that
    ends only its own connection."""
    live = inert
    bystander = RawClient.login(live.port)
    client = RawClient.login(live.port)
    addr = local_addr(client.transport.sock)
    chan = client.open_session()
    client.channel_request(chan, "env", ssh_string("BIG") + ssh_string(b"x" * 200 * 1024))
    client.wait_replies(channel=1)
    assert client.channel_replies == [(chan.get_id(), True)]
    client.channel_request(chan, "env", ssh_string("HUGE") + ssh_string(b"x" * 300 * 1024))
    wait_until(lambda: not client.transport.is_active(), 10, "the disconnect")
    records = live.wait_for_code("SSH_DISCONNECTED")
    cid = connection_of(records, addr)
    assert cid is not None
    assert codes_of(records, cid)[-2:] == ["SSH_CHANNEL_CLOSED", "SSH_DISCONNECTED"]
    assert bystander.transport.is_active()
    bystander.global_request("keepalive@openssh.com")
    bystander.wait_replies(glob=1)
    bystander.close()
    good_login_works(live)
    assert not stderr_problems(live), live.stderr_lines
    check_log(live)


def _eof(client: RawClient, chan: paramiko.Channel) -> None:
    client.send(bytes([96]) + struct.pack(">I", chan.remote_chanid))


def _data(client: RawClient, chan: paramiko.Channel, data: bytes) -> None:
    client.send(bytes([94]) + struct.pack(">I", chan.remote_chanid) + ssh_string(data))


def test_data_after_eof_is_dropped_and_the_connection_goes_on(server: LiveServer) -> None:
    """RFC 4254 5.3: no data after EOF. asyncssh ended the whole connection (protocol
    error); OpenSSH drops it. So does sshspec, with a debug record: while the program
    runs (it never sees the data), and before any program started (the EOF is held
    until it does); a malformed one is still a protocol error."""
    live = server
    client = RawClient.login(live.port)
    addr = local_addr(client.transport.sock)
    running = client.open_session()
    client.channel_request(running, "exec", ssh_string("cat; echo eof; exec sleep 60"))
    client.wait_replies(channel=1)
    _data(client, running, b"one\n")
    _eof(client, running)
    _data(client, running, b"two\n")
    records = live.wait_for_code("SSH_CHANNEL_DATA_AFTER_EOF")
    dropped = next(r for r in records if r["code"] == "SSH_CHANNEL_DATA_AFTER_EOF")
    assert dropped["level"] == "debug" and dropped["labels"]["reason"] == "4 bytes dropped"
    assert dropped["labels"]["command"] == "cat; echo eof; exec sleep 60"
    output = b""
    while not output.endswith(b"eof\n"):
        output += running.recv(100)
    assert output == b"one\neof\n"

    before = client.open_session()  # no program yet: asyncssh holds the EOF, and drops this
    _eof(client, before)
    _data(client, before, b"held")
    live.wait_for_code("SSH_CHANNEL_DATA_AFTER_EOF", count=2)
    client.channel_request(before, "exec", ssh_string("wc -c"))
    client.wait_replies(channel=2)
    assert client.channel_replies == [(running.get_id(), True), (before.get_id(), True)]
    assert before.recv(100).strip() == b"0"  # the program got the EOF, not the data
    assert client.transport.is_active()

    client.send(bytes([94]) + struct.pack(">I", running.remote_chanid) + b"\0\0")  # truncated
    wait_until(lambda: not client.transport.is_active(), 10, "the disconnect")
    records = live.wait_for_code("SSH_DISCONNECTED")
    cid = connection_of(records, addr)
    mine = [r for r in records if r["labels"].get("connectionId") == cid]
    assert mine[-1]["labels"]["event"] == "protocol_error"
    before_codes = [r["code"] for r in mine if r["labels"].get("channelId") == 1]
    assert before_codes.index("SSH_CHANNEL_DATA_AFTER_EOF") < before_codes.index("SSH_CHANNEL_EOF")
    check_log(live)


# --------------------------------------------------------------------------- before authentication

PREAUTH_MESSAGES = {
    "channel-open": bytes([MSG_CHANNEL_OPEN]) + ssh_string("session") + struct.pack(">III", 0, 2**21, 32768),
    "channel-open-then-exec": bytes([MSG_CHANNEL_OPEN]) + ssh_string("session")
    + struct.pack(">III", 0, 2**21, 32768),
    "global-request": bytes([80]) + ssh_string("tcpip-forward") + b"\x01" + ssh_string("127.0.0.1")
    + struct.pack(">I", 0),
    "channel-request": bytes([98]) + struct.pack(">I", 0) + ssh_string("exec") + b"\x01",
    "channel-data": bytes([94]) + struct.pack(">I", 0) + ssh_string("hello"),
}


@pytest.mark.parametrize("after_failure", [False, True], ids=["fresh", "after-a-failed-password"])
@pytest.mark.parametrize("what", sorted(PREAUTH_MESSAGES))
def test_nothing_before_authentication(server_factory, tmp_path: Path, what: str,  # type: ignore[no-untyped-def]
                                       after_failure: bool) -> None:
    """CVE-2025-32433: connection-protocol messages before USERAUTH_SUCCESS end the
    connection and open nothing; a command smuggled in never runs."""
    live: LiveServer = server_factory()
    marker = tmp_path / "pwned"
    transport = paramiko_transport(live.port)
    addr = local_addr(transport.sock)
    if after_failure:
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_password(USERNAME, "wrong")
    client = RawClient(transport)
    client.send(PREAUTH_MESSAGES[what])
    if what == "channel-open-then-exec":  # right behind it, before any answer
        # (the server may have ended the connection at the open already: then the exec
        # cannot even be sent, paramiko says EOFError, and nothing can run)
        with contextlib.suppress(EOFError):
            client.send(bytes([98]) + struct.pack(">I", 0) + ssh_string("exec") + b"\x01"
                        + ssh_string(f"touch {marker}"))
    wait_until(lambda: not transport.is_active(), 10, "the disconnect")
    records = live.wait_for_code("SSH_DISCONNECTED")
    cid = connection_of(records, addr)
    assert cid is not None
    codes = codes_of(records, cid)
    assert "SSH_NEW_CHANNEL" not in codes and "SSH_AUTH_SUCCESSFUL" not in codes, codes
    assert codes[-2:] == ["SSH_HANDSHAKE_FAILED", "SSH_DISCONNECTED"], codes
    assert not marker.exists()
    transport.close()
    good_login_works(live)
    check_log(live)


def test_none_auth_never_succeeds(server: LiveServer) -> None:
    for user in (USERNAME, "root", "nobody-here", ""):
        transport = paramiko_transport(server.port)
        for _ in range(3):  # "none" is not an attempt: it never counts, never succeeds
            with pytest.raises(paramiko.BadAuthenticationType) as info:
                transport.auth_none(user)
            assert "none" not in info.value.allowed_types
            assert {"password", "publickey"} <= set(info.value.allowed_types)
        assert not transport.is_authenticated()
        transport.close()
    records = server.wait_for_code("SSH_DISCONNECTED", 4)
    assert "SSH_AUTH_SUCCESSFUL" not in [r["code"] for r in records]
    check_log(server)


# --------------------------------------------------------------------------- raw credentials

MSG_SERVICE_REQUEST, MSG_SERVICE_ACCEPT = 5, 6
MSG_USERAUTH_REQUEST, MSG_USERAUTH_FAILURE, MSG_USERAUTH_SUCCESS = 50, 51, 52


class RawAuth:
    """USERAUTH_REQUESTs of any bytes through paramiko's transport; answers recorded."""

    def __init__(self, port: int) -> None:
        self.transport = paramiko_transport(port)
        self.addr = local_addr(self.transport.sock)
        self.cond = threading.Condition()
        self.answers: list[int] = []
        table = self.transport._handler_table
        for kind in (MSG_SERVICE_ACCEPT, MSG_USERAUTH_FAILURE, MSG_USERAUTH_SUCCESS, 53, 60):
            table[kind] = lambda m, kind=kind: self._record(kind)
        self.client = RawClient(self.transport)
        self.client.send(bytes([MSG_SERVICE_REQUEST]) + ssh_string("ssh-userauth"))
        assert self.wait_answer(0) == MSG_SERVICE_ACCEPT

    def _record(self, kind: int) -> None:
        with self.cond:
            if kind != 53:  # banners are not answers
                self.answers.append(kind)
            self.cond.notify_all()

    def wait_answer(self, before: int, timeout: float = 10.0) -> int | None:
        """The answer after `before` answers, or None if the connection ended."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.answers) <= before:
                if not self.transport.is_active():
                    return None
                left = deadline - time.monotonic()
                assert left > 0, "no answer and no disconnect"
                self.cond.wait(min(left, 0.1))
            return self.answers[before]

    def password(self, user: bytes, password: bytes) -> int | None:
        before = len(self.answers)
        try:
            self.client.send(bytes([MSG_USERAUTH_REQUEST]) + ssh_string(user) + ssh_string("ssh-connection")
                             + ssh_string("password") + b"\x00" + ssh_string(password))
        except (EOFError, OSError, paramiko.SSHException):
            return None
        return self.wait_answer(before)

    def close(self) -> None:
        self.transport.close()


printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=64).map(str.encode)


def test_usernames_and_passwords_of_any_bytes(server: LiveServer) -> None:
    live = server
    state: dict[str, Any] = {"auth": RawAuth(live.port), "answers": {}, "disconnects": 0}

    @settings(max_examples=60, **HYPOTHESIS)
    @given(st.one_of(st.binary(max_size=64), st.text(max_size=40).map(str.encode), printable,
                     st.sampled_from([b"", b"\x00", b"a" * 1023, b"a" * 1024, b"x" * 20000,
                                      USERNAME.encode(), "żółw".encode()])),
           st.one_of(st.binary(max_size=64), st.text(max_size=40).map(str.encode), printable,
                     st.sampled_from([b"", b"\x00" * 3, b"p" * 20000, b"\xff\xfe", "pässwörd".encode()])))
    def one(user: bytes, password: bytes) -> None:
        if password == PASSWORD.encode():
            password += b"!"
        auth: RawAuth = state["auth"]
        if not auth.transport.is_active():
            auth.close()
            auth = state["auth"] = RawAuth(live.port)
        answer = auth.password(user, password)
        assert answer != MSG_USERAUTH_SUCCESS
        state["answers"][answer] = state["answers"].get(answer, 0) + 1
        if answer is None:
            state["disconnects"] += 1
        try:  # asyncssh's rules: UTF-8, SASLprep (RFC 4013), usernames under 1024 bytes
            saslprep(user.decode("utf-8"))
            saslprep(password.decode("utf-8"))
            well_formed = len(user) < 1024
        except (UnicodeDecodeError, SASLPrepError):
            well_formed = False
        if well_formed and answer is None:
            # Only the attempt limit may end a connection on well-formed credentials;
            # anything else is asyncssh's protocol error (a DISCONNECT), logged.
            records = live.wait_for_code("SSH_DISCONNECTED", state["disconnects"])
            cid = connection_of(records, auth.addr)
            assert cid is not None and "SSH_AUTH_TOO_MANY_TRIES" in codes_of(records, cid)

    one()
    state["auth"].close()
    good_login_works(live)
    records = live.wait_for(lambda rs: (sum(r["code"] == "SSH_CONNECTED" for r in rs)
                                        == sum(r["code"] == "SSH_DISCONNECTED" for r in rs)))
    check_all_disconnected(records)
    last = list(by_connection(records))[-1]  # the last to connect: good_login_works'
    assert "SSH_AUTH_SUCCESSFUL" in codes_of(records, last)
    print(f"raw credentials: answers {state['answers']} (51 = failure, None = disconnected), "
          f"{len(by_connection(records))} connections")
    assert not stderr_problems(live), live.stderr_lines
    check_log(live)


@pytest.mark.parametrize("password", ["pa\u00adss", "\ufb01sh", "a\u00a0b"],
                         ids=["soft-hyphen", "ligature", "no-break-space"])
def test_passwords_that_saslprep_changes_still_log_in(server_factory, password: str) -> None:  # type: ignore[no-untyped-def]
    """Any password a user was given must work when typed as is (paramiko sends
    the bytes unchanged)."""
    live: LiveServer = server_factory({"auth": {"users": [
        {"username": "carol", "passwordHash": passwords.hash_password(password)}]}})
    transport = paramiko_transport(live.port)
    try:
        transport.auth_password("carol", password)
        assert transport.is_authenticated()
    finally:
        transport.close()


# --------------------------------------------------------------------------- constant time


def test_password_checks_are_constant_time_by_construction() -> None:
    """The comparison is hmac.compare_digest, and unknown users are checked
    against a dummy hash with the same parameters as real ones."""
    verify = inspect.getsource(passwords.verify_password)
    assert "hmac.compare_digest" in verify and "==" not in verify.replace("!=", "")
    assert passwords.hmac is hmac
    check = inspect.getsource(handlers.ConfiguredHandler.check_password)
    assert "DUMMY_HASH" in check
    dummy = passwords.parse_hash(passwords.DUMMY_HASH)
    real = passwords.parse_hash(passwords.hash_password("x"))
    assert (dummy.ln, dummy.r, dummy.p, len(dummy.key)) == (real.ln, real.r, real.p, len(real.key))


def _time_wrong_passwords(live: LiveServer, rounds: int, timings: dict[str, list[float]]) -> None:
    auth = RawAuth(live.port)
    for i in range(2 * rounds):
        who = "known" if i % 2 == 0 else "unknown"
        if i and i % 6 == 0:  # stay under maxAuthTries (6)
            auth.close()
            auth = RawAuth(live.port)
        user = USERNAME if who == "known" else f"ghost{i}"
        started = time.perf_counter()
        answer = auth.password(user.encode(), b"not the password")
        timings[who].append(time.perf_counter() - started)
        assert answer == MSG_USERAUTH_FAILURE
    auth.close()


def test_unknown_and_known_users_take_the_same_time(server: LiveServer) -> None:
    """Wrong passwords for a known and an unknown user, interleaved, 20 each: the
    same codes in the log, and medians within 30% of each other. The scrypt
    check (tens of ms) dominates the round trip, so the bound is robust; one
    more round of 20 each is allowed if a loaded machine blurs the first."""
    live = server
    timings: dict[str, list[float]] = {"known": [], "unknown": []}
    attempts = 0
    for _ in range(2):
        _time_wrong_passwords(live, 20, timings)
        attempts += 40
        known, unknown = statistics.median(timings["known"]), statistics.median(timings["unknown"])
        if 0.7 < unknown / known < 1.3:
            break
    print(f"password check round trip: known user {known * 1000:.1f} ms, unknown {unknown * 1000:.1f} ms "
          f"(medians of {len(timings['known'])})")
    assert 0.7 < unknown / known < 1.3, (known, unknown)
    records = live.wait_for(lambda rs: sum(r["code"] == "SSH_AUTH_FAILED" for r in rs) == attempts)
    failed = [r for r in records if r["code"] == "SSH_AUTH_FAILED"]
    # The same path: both are a failed password attempt (not "unavailable").
    assert {r["labels"]["method"] for r in failed} == {"password"}
    assert {r["labels"]["username"] for r in failed} >= {USERNAME, "ghost1"}
    assert "SSH_AUTH_UNAVAILABLE" not in [r["code"] for r in records]
    check_log(live)


NON_READING_CLIENT = """
import os, signal, sys
import paramiko
t = paramiko.Transport(("127.0.0.1", int(sys.argv[1])))
t.connect(username=sys.argv[2], password=sys.argv[3])
chan = t.open_session(window_size=2**31, max_packet_size=32768)  # a window it will never honour
chan.exec_command("yes")
chan.recv(1)  # the program runs
print("reading stops", flush=True)
print("%s:%d" % t.sock.getsockname()[:2], flush=True)  # read once the client is stopped
os.kill(os.getpid(), signal.SIGSTOP)  # nothing reads the socket from now on
"""


def rss_growth_while_a_client_stops_reading(live: LiveServer, tmp_path: Path, seconds: float, *,
                                            during: Callable[[], None] | None = None,
                                            client_addr: list[str] | None = None) -> int:
    """KiB the server's RSS grows over `seconds` while NON_READING_CLIENT (a 2 GiB
    window, `yes`, then SIGSTOP) does not read; the client is killed after.
    `during` runs inside the window (others served meanwhile: part of the window,
    so its memory counts too); `client_addr` gets the client's address."""
    import signal as signals
    import subprocess
    import sys

    from test_faults import rss_kib
    script = tmp_path / "client.py"
    script.write_text(NON_READING_CLIENT)
    client = subprocess.Popen([sys.executable, str(script), str(live.port), USERNAME, PASSWORD],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline() == "reading stops\n"
        wait_until(lambda: Path(f"/proc/{client.pid}/stat").read_text().split()[2] == "T", 10,
                   "the client to stop")
        if client_addr is not None:
            client_addr.append(client.stdout.readline().strip())
        before = rss_kib(live.process.pid)
        started = time.monotonic()
        if during is not None:
            during()
        # A measuring window, not a synchronisation: unbounded, `yes` fills ~100 MB/s.
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        return rss_kib(live.process.pid) - before
    finally:
        client.send_signal(signals.SIGKILL)
        client.wait(10)


def test_a_client_that_stops_reading_cannot_grow_the_server(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A client grants a 2 GiB window, runs `yes` and stops reading its socket: the
    server stops reading the program once its socket buffer is full (asyncssh left
    that to the window alone), so its memory stays put; after the client is gone
    the server serves others and its log replays."""
    live = server_factory()
    grown = rss_growth_while_a_client_stops_reading(live, tmp_path, 3)
    assert grown < 16 * 1024, f"server RSS grew {grown} KiB in 3 s with a non-reading client"
    live.wait_for_code("SSH_DISCONNECTED")
    good_login_works(live)
    check_log(live)


FLOODING_CLIENT = """
import sys, threading
import paramiko
from paramiko.common import cMSG_GLOBAL_REQUEST, cMSG_SERVICE_REQUEST
from paramiko.message import Message
port, user, password, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
t = paramiko.Transport(("127.0.0.1", port))
if mode == "preauth":
    t.start_client()
else:
    t.connect(username=user, password=password)
read_message = t.packetizer.read_message
never = threading.Event()
def stop_reading():
    never.wait()  # paramiko's reader thread stops here: nothing reads the socket any more
    return read_message()
t.packetizer.read_message = stop_reading
print("reading stops", flush=True)
sent = 0
try:
    while sent < 2_000_000:
        m = Message()
        if mode == "preauth":  # re-accepted before authentication, as OpenSSH does: SERVICE_ACCEPT
            m.add_byte(cMSG_SERVICE_REQUEST)
            m.add_string("ssh-userauth")
        else:  # refused: REQUEST_FAILURE
            m.add_byte(cMSG_GLOBAL_REQUEST)
            m.add_string("flood@example.com")
            m.add_boolean(True)
        t._send_user_message(m)
        sent += 1
except Exception as exc:
    print(f"cut after {sent}: {type(exc).__name__}", flush=True)
else:
    print(f"never cut: {sent}", flush=True)
"""


@pytest.mark.parametrize("mode", ["preauth", "established"])
def test_a_client_that_asks_without_reading_is_cut_at_the_buffer_bound(server_factory, tmp_path: Path,
                                                                        mode: str) -> None:
    """A client keeps sending requests that each get an answer (SERVICE_REQUEST before
    authentication, a global request after) and never reads: the answers pile up in
    the server's socket buffer until limits.maxBufferedPerConnection, then the
    connection is dropped with SSH_BUFFER_EXCEEDED; others are served throughout.

    Memory: a flood may cost the process a one-time step (up to ~17 MB here:
    asyncssh slices its input buffer once per packet, and the allocator keeps the
    heap those copies grew, at the first flood or a later one); three floods must
    not cost more than one such step."""
    import subprocess
    import sys

    from test_faults import rss_kib
    live = server_factory({"limits": {"maxBufferedPerConnection": "256KiB"}})
    script = tmp_path / "client.py"
    script.write_text(FLOODING_CLIENT)
    rss = []
    for _ in range(3):
        client = subprocess.Popen([sys.executable, str(script), str(live.port), USERNAME, PASSWORD, mode],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout is not None and client.stdout.readline() == "reading stops\n"
            good_login_works(live)  # while the flood goes on
            outcome = client.stdout.readline()
            assert outcome.startswith("cut after "), outcome
            client.wait(30)
        finally:
            client.kill()
            client.wait(10)
        rss.append(rss_kib(live.process.pid))
    records = live.wait_for_code("SSH_BUFFER_EXCEEDED", 3)
    exceeded = [r for r in records if r["code"] == "SSH_BUFFER_EXCEEDED"]
    assert len(exceeded) == 3
    for record in exceeded:
        assert "limits.maxBufferedPerConnection 262144" in record["labels"]["reason"], record
        cid = record["labels"]["connectionId"]
        codes = [r["code"] for r in records if r["labels"].get("connectionId") == cid]
        expected = ["SSH_BUFFER_EXCEEDED", "SSH_HANDSHAKE_FAILED", "SSH_DISCONNECTED"] if mode == "preauth" \
            else ["SSH_BUFFER_EXCEEDED", "SSH_DISCONNECTED"]
        assert codes[-len(expected):] == expected, codes
    assert rss[2] - rss[0] < 20 * 1024, f"the second and third floods grew the server's RSS: {rss} KiB"
    good_login_works(live)
    check_log(live)


def test_a_draining_client_that_asks_without_reading_is_cut(server_factory) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM while a session runs: the connection drains. Its client stops reading
    and keeps sending global requests (each refused, REQUEST_FAILURE): past
    limits.maxBufferedPerConnection it is dropped, and the server then stops."""
    import signal as signals

    from protocol_client import ProtocolClient, exec_payload
    from test_codes_live import log_in_and_open
    live = server_factory({"limits": {"maxBufferedPerConnection": "64KiB", "shutdownTimeout": "60s"}})
    c = ProtocolClient.connect(live.port)
    try:
        ch = log_in_and_open(c, USERNAME, PASSWORD)
        c.request(ch, "exec", exec_payload("trap '' TERM; sleep 60"))  # it outlives the SIGTERM
        live.wait_for_code("SSH_CHANNEL_REQUEST_SUCCESSFUL")
        live.process.send_signal(signals.SIGTERM)
        live.wait_for_code("SSH_SHUTTING_DOWN")
        c.stop_reading()
        sent = c.flood(80, b"\x00\x00\x00\x11flood@example.com\x01")  # GLOBAL_REQUEST, want reply
        assert sent > 1000, sent  # the flood, not the shutdown, ended it
        assert live.process.wait(30) == 0, sent
    finally:
        c.close_all()
    records = live.records()
    cid = next(r["labels"]["connectionId"] for r in records if r["code"] == "SSH_BUFFER_EXCEEDED")
    codes = [r["code"] for r in records if r["labels"].get("connectionId") == cid]
    assert codes[-3:] == ["SSH_BUFFER_EXCEEDED", "SSH_CHANNEL_CLOSED", "SSH_DISCONNECTED"] \
        or codes[-2:] == ["SSH_BUFFER_EXCEEDED", "SSH_DISCONNECTED"], codes
    assert [r["code"] for r in records][-1] == "SSH_STOPPED"
    check_log(live)
