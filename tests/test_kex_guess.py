"""A guessed first key-exchange packet (RFC 4253 7.1), from a raw client.

The client speaks the version line, KEXINIT and the curve25519 exchange by hand over
a socket, so it can send exactly what Dropbear sends: KEXINIT with
first_kex_packet_follows set, and at once a KEX_ECDH_INIT for its own first choice.
The guess is wrong when the client's and the server's first key-exchange algorithm
(or host-key algorithm) differ: the server must then ignore the guessed packet and
wait for the real one. asyncssh alone ignored it only when the negotiated algorithm
was not the client's first choice (adapters/asyncssh_internals._on_kexinit, HACKS.md
row 34). Each test's server log replays against the specs (check_log).
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from conftest import LiveServer
from sshspec.adapters.asyncssh_internals import guess_is_wrong
from test_faults import check_log

MSG_DISCONNECT, MSG_KEXINIT, MSG_NEWKEYS, MSG_KEX_ECDH_INIT, MSG_KEX_ECDH_REPLY = 1, 20, 21, 30, 31


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _kexinit(kex: list[str], host_keys: list[str], *, follows: bool,
             mac: str = "hmac-sha2-256-etm@openssh.com") -> bytes:
    """A KEXINIT payload (after the message type)."""
    lists = [",".join(kex), ",".join(host_keys)]
    lists += ["aes128-ctr"] * 2 + [mac] * 2 + ["none"] * 2 + [""] * 2
    return os.urandom(16) + b"".join(_string(n.encode()) for n in lists) + bytes([follows]) + b"\0" * 4


class RawClient:
    """Unencrypted SSH packets over a socket: enough for a key exchange up to NEWKEYS."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(b"SSH-2.0-rawguess_1.0\r\n")
        self.buf = b""
        while b"\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\n")
        assert line.startswith(b"SSH-2.0-"), line

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("server closed the connection")
        self.buf += chunk

    def packet(self, msg_type: int, payload: bytes = b"") -> bytes:
        body = bytes([msg_type]) + payload
        pad = 8 - (len(body) + 5) % 8
        pad += 8 if pad < 4 else 0
        return struct.pack(">IB", len(body) + pad + 1, pad) + body + os.urandom(pad)

    def send(self, *packets: bytes) -> None:
        self.sock.sendall(b"".join(packets))  # one write: the server reads them together

    def receive(self) -> tuple[int, bytes]:
        while len(self.buf) < 4:
            self._fill()
        (length,) = struct.unpack(">I", self.buf[:4])
        while len(self.buf) < 4 + length:
            self._fill()
        pad = self.buf[4]
        body = self.buf[5:4 + length - pad]
        self.buf = self.buf[4 + length:]
        return body[0], body[1:]

    def close(self) -> None:
        self.sock.close()


def _ecdh_init() -> bytes:
    public = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return _string(public)


def _handshake(live: LiveServer, kex: list[str], guess: bytes) -> list[int]:
    """KEXINIT + a guessed ECDH_INIT in one write; then, if the server's first answer is
    not the ECDH_REPLY (it ignored the guess), the real ECDH_INIT; then NEWKEYS. Returns
    the types of the server's packets after its KEXINIT."""
    client = RawClient(live.port)
    try:
        kind, _ = client.receive()
        assert kind == MSG_KEXINIT
        client.send(client.packet(MSG_KEXINIT, _kexinit(kex, ["ssh-ed25519"], follows=True)),
                    client.packet(MSG_KEX_ECDH_INIT, guess))
        seen: list[int] = []
        kind, _ = client.receive()
        seen.append(kind)
        if kind == MSG_DISCONNECT:
            return seen
        kind, _ = client.receive()
        seen.append(kind)
        if seen == [MSG_KEX_ECDH_REPLY, MSG_NEWKEYS]:
            client.send(client.packet(MSG_NEWKEYS))
            live.wait_for_code("SSH_KEX_DONE")
        return seen
    finally:
        client.close()


BROKEN_GUESS = _string(b"\x01" * 5)  # not a curve25519 key: fatal if the server reads it


def test_a_wrong_guess_is_ignored_and_the_handshake_completes(server: LiveServer) -> None:
    """Dropbear's case: its first choice (curve25519) is on the server's list but is not
    the server's first (mlkem768x25519): the guess is wrong and must be skipped. The
    guessed packet here is not even a valid key, so had the server read it, it would
    have disconnected; instead it waits, and the real init completes the exchange."""
    client = RawClient(server.port)
    try:
        kind, _ = client.receive()
        assert kind == MSG_KEXINIT
        client.send(client.packet(MSG_KEXINIT, _kexinit(["curve25519-sha256", "mlkem768x25519-sha256"],
                                                        ["ssh-ed25519"], follows=True)),
                    client.packet(MSG_KEX_ECDH_INIT, BROKEN_GUESS),
                    client.packet(MSG_KEX_ECDH_INIT, _ecdh_init()))
        assert client.receive()[0] == MSG_KEX_ECDH_REPLY
        assert client.receive()[0] == MSG_NEWKEYS
        client.send(client.packet(MSG_NEWKEYS))
        server.wait_for_code("SSH_KEX_DONE")
    finally:
        client.close()
    records = server.wait_for_code("SSH_DISCONNECTED")
    assert "SSH_SPEC_VIOLATION" not in [r["code"] for r in records]
    check_log(server)


def test_a_wrong_host_key_guess_is_ignored(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Same first key exchange on both sides, but the client's first host-key algorithm
    is one the server does not have first: still a wrong guess (RFC 4253 7.1)."""
    live = server_factory({"ssh": {"kex": ["curve25519-sha256"]}})
    client = RawClient(live.port)
    try:
        client.receive()
        kexinit = _kexinit(["curve25519-sha256"], ["rsa-sha2-256", "ssh-ed25519"], follows=True)
        client.send(client.packet(MSG_KEXINIT, kexinit), client.packet(MSG_KEX_ECDH_INIT, BROKEN_GUESS),
                    client.packet(MSG_KEX_ECDH_INIT, _ecdh_init()))
        assert client.receive()[0] == MSG_KEX_ECDH_REPLY
        assert client.receive()[0] == MSG_NEWKEYS
        client.send(client.packet(MSG_NEWKEYS))
        live.wait_for_code("SSH_KEX_DONE")
    finally:
        client.close()
    live.wait_for_code("SSH_DISCONNECTED")
    check_log(live)


def test_a_right_guess_is_used(server_factory) -> None:  # type: ignore[no-untyped-def]
    """When both first choices match, the guessed packet is the real one: the server
    answers it with no second init (and a broken guess is then a protocol error)."""
    live = server_factory({"ssh": {"kex": ["curve25519-sha256"]}})
    assert _handshake(live, ["curve25519-sha256"], _ecdh_init()) == [MSG_KEX_ECDH_REPLY, MSG_NEWKEYS]
    live.wait_for_code("SSH_DISCONNECTED")
    assert _handshake(live, ["curve25519-sha256"], BROKEN_GUESS) == [MSG_DISCONNECT]
    live.wait_for_code("SSH_DISCONNECTED", 2)
    check_log(live)


@pytest.mark.parametrize(("client_kex", "client_host", "follows", "wrong"), [
    (["a", "b"], ["k"], True, False),
    (["b", "a"], ["k"], True, True),   # first kex differs, though "b" may be negotiated
    (["a"], ["j", "k"], True, True),   # first host-key algorithm differs
    (["b", "a"], ["j"], False, False),  # no guess sent: nothing to ignore
])
def test_guess_is_wrong(client_kex: list[str], client_host: list[str], follows: bool, wrong: bool) -> None:
    server = _kexinit(["a", "b"], ["k", "j"], follows=False)
    assert guess_is_wrong(_kexinit(client_kex, client_host, follows=follows), server) is wrong
