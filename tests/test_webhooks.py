"""The ContainerSSH authentication and configuration webhooks, live.

A real `sshspec serve` asks a real HTTP server (tests/authconfig_server.py, aiohttp,
implementing ContainerSSH's API as its OpenAPI document has it) about real clients:
OpenSSH logs in by password (through SSH_ASKPASS, no extra package) and by key,
gets the config server's environment and shell, and is refused with
SSH_AUTH_UNAVAILABLE when the webhook is down; the misbehaving servers (slow,
failing, malformed, oversized, TLS-only) give SSH_AUTH_UNAVAILABLE or
SSH_BACKEND_REJECTED_HANDSHAKE with the reason, never a success. While a config
server decides, the connection is in `authenticated`: every way out of it is
exercised with the protocol-level client.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import paramiko
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from authconfig_server import AuthConfigServer, make_pki  # noqa: E402
from protocol_client import ProtocolClient  # noqa: E402

import conftest  # noqa: E402

WAIT = 10.0
BOB_PASSWORD = "hunter2 with spaces"


@pytest.fixture
def acs() -> Iterator[AuthConfigServer]:
    server = AuthConfigServer().start()
    yield server
    server.stop()


def hooks(acs: AuthConfigServer, *, config: bool = True, **webhook: Any) -> dict[str, Any]:
    """sshspec config pointing auth.webhook (and configserver) at `acs`."""
    out: dict[str, Any] = {"auth": {"webhook": {"url": acs.url, "timeout": "1s", "authTimeout": "2s",
                                                **webhook}}}
    if config:
        out["configserver"] = {"url": acs.url, "timeout": "1s", "configTimeout": "2s"}
    return out


def pubkey(live: conftest.LiveServer) -> str:
    """The test key in the authorized_keys form ContainerSSH sends: `type base64`."""
    return " ".join(Path(f"{live.key}.pub").read_text().split()[:2])


def ssh_password(live: conftest.LiveServer, user: str, password: str, command: str,
                 tmp: Path) -> subprocess.CompletedProcess[str]:
    """OpenSSH with a password, typed by an SSH_ASKPASS program (OpenSSH >= 8.4)."""
    askpass = tmp / "askpass.sh"
    askpass.write_text('#!/bin/sh\nprintf "%s\\n" "$TEST_PASSWORD"\n')
    askpass.chmod(0o700)
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force",
           "TEST_PASSWORD": password, "DISPLAY": ":0"}
    argv = ["ssh", "-p", str(live.port), "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "PubkeyAuthentication=no",
            "-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1",
            f"{user}@{live.host}", command]
    return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60, start_new_session=True)  # no tty: askpass it is


def ssh_key(live: conftest.LiveServer, user: str, command: str) -> subprocess.CompletedProcess[str]:
    argv = live.ssh_args("-o", "PreferredAuthentications=publickey")
    argv[-1] = f"{user}@{live.host}"
    return subprocess.run([*argv, command], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)


def connection_of(live: conftest.LiveServer, user: str) -> list[dict[str, Any]]:
    """The records of the last connection that authenticated as (or tried) ``user``."""
    records = live.records()
    cid = next(r["labels"]["connectionId"] for r in reversed(records) if r["labels"].get("username") == user)
    return [r for r in records if r["labels"].get("connectionId") == cid]


def codes(records: list[dict[str, Any]]) -> list[str]:
    return [r["code"] for r in records]


def ended(live: conftest.LiveServer, user: str) -> list[dict[str, Any]]:
    live.wait_for(lambda rs: any(r["code"] == "SSH_DISCONNECTED" and r["labels"].get("username") == user
                                 for r in rs))
    return connection_of(live, user)


# --- OpenSSH through the webhooks -------------------------------------------------------------


def test_openssh_password_through_webhook_gets_config(server_factory: Any, acs: AuthConfigServer,
                                                      tmp_path: Path) -> None:
    acs.passwords["bob"] = BOB_PASSWORD
    acs.metadata = {"team": {"value": "red"}, "token": {"value": "s3cret", "sensitive": True}}
    acs.environment = {"FROM_AUTH": {"value": "a"}}
    acs.configs["bob"] = {"config": {"backend": {"shell": "/bin/dash"}},
                          "environment": {"FROM_CONFIG": {"value": "c"}}}
    live = server_factory(hooks(acs))
    done = ssh_password(live, "bob", BOB_PASSWORD, 'echo "$FROM_AUTH $FROM_CONFIG $SHELL"', tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "a c /bin/dash\n"
    records = ended(live, "bob")
    cid = records[0]["labels"]["connectionId"]
    auth_codes = [c for c in codes(records) if c.startswith(("SSH_AUTH_ATT", "SSH_AUTH_SUCC", "SSH_HANDS"))]
    assert auth_codes == ["SSH_AUTH_ATTEMPT", "SSH_AUTH_SUCCESSFUL", "SSH_HANDSHAKE_SUCCESSFUL"]
    # The bodies ContainerSSH's API prescribes.
    [auth] = acs.of("password")
    assert auth["username"] == "bob" and auth["connectionId"] == cid
    assert base64.b64decode(auth["passwordBase64"]).decode() == BOB_PASSWORD
    assert auth["remoteAddress"] == records[0]["labels"]["remoteAddr"]
    assert auth["clientVersion"].startswith("SSH-2.0-OpenSSH_")
    [config] = acs.of("config")
    assert config["username"] == config["authenticatedUsername"] == "bob" and config["connectionId"] == cid
    assert config["metadata"] == {"team": {"value": "red"}}  # the sensitive token is not passed on
    assert config["environment"] == {"FROM_AUTH": {"value": "a"}}
    assert config["clientVersion"] == auth["clientVersion"]


def test_openssh_key_through_webhook(server_factory: Any, acs: AuthConfigServer) -> None:
    live = server_factory(hooks(acs))
    acs.keys["carol"] = [pubkey(live)]
    done = ssh_key(live, "carol", "echo key-ok")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "key-ok\n"
    records = ended(live, "carol")
    assert "SSH_HANDSHAKE_SUCCESSFUL" in codes(records)
    # OpenSSH queries the key, then signs with it: one webhook call for both.
    [request] = acs.of("pubkey")
    assert request["publicKey"] == pubkey(live) and request["username"] == "carol"
    assert request["connectionId"] == records[0]["labels"]["connectionId"]
    assert len(acs.of("config")) == 1


def test_only_the_authenticated_users_metadata_reaches_the_config_server(server_factory: Any,
                                                                         acs: AuthConfigServer) -> None:
    """A key the webhook accepts for "admin" (queried, never used) must not lend its
    metadata to the user who then logs in by password."""
    acs.passwords["guest"] = "pw"
    acs.metadata_of = {"admin": {"admin": {"value": "yes"}}, "guest": {"role": {"value": "guest"}}}
    live = server_factory(hooks(acs))
    acs.keys["admin"] = [pubkey(live)]
    c = ProtocolClient.connect(live.port)
    try:
        c.service_request()
        assert c.next_auth_reply(WAIT) == "SERVICE_ACCEPT"
        c.auth_publickey("admin", _key(live), signed=False)
        assert c.next_auth_reply(WAIT) == "USERAUTH_PK_OK"
        c.auth_password("guest", "pw")
        assert c.next_auth_reply(WAIT) == "USERAUTH_SUCCESS"
    finally:
        c.close_all()
    [config] = acs.of("config")
    assert config["username"] == "guest" and config["metadata"] == {"role": {"value": "guest"}}


def test_static_users_never_reach_the_webhook(server_factory: Any, acs: AuthConfigServer,
                                              tmp_path: Path) -> None:
    live = server_factory(hooks(acs, config=False))
    done = ssh_password(live, conftest.USERNAME, conftest.PASSWORD, "echo static", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "static\n"
    assert acs.of("password") == []


def test_openssh_refused_with_unavailable_when_webhook_is_down(server_factory: Any, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    live = server_factory({"auth": {"webhook": {"url": f"http://127.0.0.1:{port}", "timeout": "500ms",
                                                "authTimeout": "1s"}}})
    done = ssh_password(live, "bob", BOB_PASSWORD, "true", tmp_path)
    assert done.returncode == 255
    records = ended(live, "bob")
    [unavailable] = [r for r in records if r["code"] == "SSH_AUTH_UNAVAILABLE"]
    reason = unavailable["labels"]["reason"]
    assert f"auth webhook http://127.0.0.1:{port}/password" in reason and "attempts in 1s" in reason, reason
    assert "SSH_AUTH_SUCCESSFUL" not in codes(records)
    done = ssh_key(live, "bob", "true")
    assert done.returncode == 255
    live.wait_for(lambda rs: sum(r["code"] == "SSH_DISCONNECTED" for r in rs) == 2)
    records = connection_of(live, "bob")
    assert "SSH_AUTH_UNAVAILABLE" in codes(records) and "SSH_AUTH_SUCCESSFUL" not in codes(records)


# --- misbehaving servers -----------------------------------------------------------------------


async def _login(live: conftest.LiveServer, user: str, password: str, method: str = "password") -> str:
    """'ok' or the client's error, asyncssh as the client."""
    class Kbd(asyncssh.SSHClient):
        def kbdint_auth_requested(self) -> str:
            return ""

        def kbdint_challenge_received(self, name: str, instructions: str, lang: str,
                                      prompts: Any) -> list[str]:
            return [password for _ in prompts]

    try:
        async with asyncssh.connect(live.host, live.port, username=user, password=password,
                                    known_hosts=None, client_keys=None, agent_path=None, config=None,
                                    preferred_auth=method, client_factory=Kbd) as conn:
            result = await conn.run("echo in", check=True)
            return "ok" if result.stdout == "in\n" else f"output {result.stdout!r}"
    except (asyncssh.Error, OSError) as exc:
        return type(exc).__name__


def login(live: conftest.LiveServer, user: str, password: str, method: str = "password") -> str:
    return asyncio.run(asyncio.wait_for(_login(live, user, password, method), 30))


@pytest.mark.parametrize(("user", "why"), [
    ("slow-1", "no answer within 0.5s"),
    ("fail-1", "HTTP 500"),
    ("malformed-1", "malformed answer"),
    ("huge-1", "answer larger than 1048576 bytes"),
    ("nosuccess-1", "missing required field `success`"),
])
def test_misbehaving_webhook_is_unavailable_never_success(server_factory: Any, acs: AuthConfigServer,
                                                          user: str, why: str) -> None:
    live = server_factory(hooks(acs, timeout="500ms", authTimeout="1500ms", keyboardInteractive=True))
    assert login(live, user, "whatever") == "PermissionDenied"
    records = ended(live, user)
    [unavailable] = [r for r in records if r["code"] == "SSH_AUTH_UNAVAILABLE"]
    assert why in unavailable["labels"]["reason"], unavailable["labels"]["reason"]
    assert "SSH_AUTH_SUCCESSFUL" not in codes(records)


def test_webhook_verdicts_and_keyboard_interactive(server_factory: Any, acs: AuthConfigServer) -> None:
    acs.passwords.update(dave="right", kbd="typed")
    live = server_factory(hooks(acs, keyboardInteractive=True))
    assert login(live, "dave", "wrong") == "PermissionDenied"
    failed = [r["labels"]["method"] for r in ended(live, "dave") if r["code"] == "SSH_AUTH_FAILED"]
    assert failed == ["password"]
    assert login(live, "dave", "right") == "ok"
    assert login(live, "kbd", "typed", method="keyboard-interactive") == "ok"
    records = ended(live, "kbd")
    assert [r["labels"]["method"] for r in records if r["code"] == "SSH_AUTH_SUCCESSFUL"] == \
        ["keyboard-interactive"]
    assert {b["username"] for b in acs.of("config")} == {"dave", "kbd"}


@pytest.mark.parametrize(("user", "config", "why"), [
    ("cfail-1", None, "config server http://127.0.0.1:PORT/config: HTTP 500"),
    ("cslow-1", None, "no answer within 0.5s"),
    ("cmalformed-1", None, "malformed answer"),
    ("docker-1", {"config": {"backend": "docker"}}, "backend 'docker' asked for; this server runs 'local'"),
    ("dockerkey-1", {"config": {"docker": {"image": "x"}}},
     "docker settings asked for; this server runs 'local'"),
    ("security-1", {"config": {"security": {"defaultMode": "disable"}}}, "unknown field `security`"),
    ("preload-1", {"environment": {"LD_PRELOAD": {"value": "/tmp/x.so"}}}, "'LD_PRELOAD' is refused"),
    ("relative-1", {"config": {"backend": {"shell": "sh"}}}, "is not an absolute path"),
])
def test_config_server_failure_rejects_the_handshake(server_factory: Any, acs: AuthConfigServer, user: str,
                                                     config: dict[str, Any] | None, why: str) -> None:
    acs.passwords[user] = "pw"
    if config is not None:
        acs.configs[user] = config
    live = server_factory({**hooks(acs), "configserver": {"url": acs.url, "timeout": "500ms",
                                                           "configTimeout": "1500ms"}})
    assert login(live, user, "pw") in ("ConnectionLost", "DisconnectError", "PermissionDenied")
    records = ended(live, user)
    assert codes(records)[-2:] == ["SSH_BACKEND_REJECTED_HANDSHAKE", "SSH_DISCONNECTED"], codes(records)
    reason = records[-2]["labels"]["reason"]
    assert why.replace("PORT", str(acs.port)) in reason, reason


def test_tls_only_webhook(server_factory: Any, tmp_path: Path) -> None:
    """A webhook served over https only, asking for a client certificate: with the test
    CA and the client certificate sshspec logs in; without the certificate, or without
    the CA, it is SSH_AUTH_UNAVAILABLE."""
    pki = make_pki(tmp_path)
    tls = AuthConfigServer(passwords={"erin": "pw"}).start(tls=pki.server_context(client_certs=True))
    try:
        base = {"url": tls.url, "timeout": "1s", "authTimeout": "1500ms", "cacert": str(pki.ca)}
        good = server_factory({"auth": {"webhook": {**base, "cert": str(pki.client_cert),
                                                    "key": str(pki.client_key)}}})
        assert login(good, "erin", "pw") == "ok"
        assert len(tls.of("password")) == 1
        no_cert = server_factory({"auth": {"webhook": base}})
        no_ca = server_factory({"auth": {"webhook": {**base, "cacert": ""}}})
        for live, why in ((no_cert, "auth webhook"), (no_ca, "TLS")):
            assert login(live, "erin", "pw") == "PermissionDenied"
            records = ended(live, "erin")
            [unavailable] = [r for r in records if r["code"] == "SSH_AUTH_UNAVAILABLE"]
            assert why in unavailable["labels"]["reason"], unavailable["labels"]["reason"]
            assert "SSH_AUTH_SUCCESSFUL" not in codes(records)
        assert "certificate verify failed" in [r for r in connection_of(no_ca, "erin")
                                               if r["code"] == "SSH_AUTH_UNAVAILABLE"][0]["labels"]["reason"]
        assert len(tls.of("password")) == 1  # neither reached the application
    finally:
        tls.stop()


# --- while the config server decides: the `authenticated` state ------------------------------

HELD = "held-1"


def _key(live: conftest.LiveServer) -> paramiko.PKey:
    return paramiko.Ed25519Key.from_private_key_file(str(live.key))


def enter_authenticated(live: conftest.LiveServer, how: str) -> tuple[ProtocolClient, str]:
    """A connection whose credentials were valid and whose config is being fetched (held)."""
    before = {r["labels"].get("connectionId") for r in live.records()}
    c = ProtocolClient.connect(live.port)
    c.service_request()
    assert c.next_auth_reply(WAIT) == "SERVICE_ACCEPT"
    if how == "password":
        c.auth_password(HELD, "pw")
    elif how == "publickey":
        c.auth_publickey(HELD, _key(live))
    else:
        c.auth_kbdint(HELD)
        assert c.next_auth_reply(WAIT) == "USERAUTH_INFO_REQUEST"
        c.kbdint_respond("pw")
    records = live.wait_for(lambda rs: any(r["code"] == "SSH_AUTH_SUCCESSFUL"
                                           and r["labels"].get("connectionId") not in before for r in rs))
    cid = next(r["labels"]["connectionId"] for r in records
               if r["code"] == "SSH_AUTH_SUCCESSFUL" and r["labels"].get("connectionId") not in before)
    assert c.next_auth_reply(0.3) == "NOTHING"  # no USERAUTH_SUCCESS before the config server answered
    return c, cid


def tail_of(live: conftest.LiveServer, cid: str) -> list[tuple[str, str | None]]:
    live.wait_for(lambda rs: any(r["code"] == "SSH_DISCONNECTED" and r["labels"].get("connectionId") == cid
                                 for r in rs))
    return [(r["code"], r["labels"].get("event")) for r in live.records()
            if r["labels"].get("connectionId") == cid]


@pytest.fixture
def holding(server_factory: Any, acs: AuthConfigServer) -> conftest.LiveServer:
    acs.passwords[HELD] = "pw"
    live = server_factory({**hooks(acs, keyboardInteractive=True),
                           "configserver": {"url": acs.url, "timeout": "60s", "configTimeout": "60s"}})
    acs.keys[HELD] = [pubkey(live)]
    return live


TRIGGERS: dict[str, tuple[str, Any]] = {  # event: (how the connection got there, what the client sends)
    "none_auth": ("password", lambda c, live: c.auth_none(HELD)),
    "password": ("password", lambda c, live: c.auth_password(HELD, "pw")),
    "publickey_query": ("password", lambda c, live: c.auth_publickey(HELD, _key(live), signed=False)),
    "publickey": ("password", lambda c, live: c.auth_publickey(HELD, _key(live))),
    "kbdint_begin": ("password", lambda c, live: c.auth_kbdint(HELD)),
    "other_method": ("password", lambda c, live: c.userauth(HELD, "hostbased")),
    "kbdint_response": ("keyboard-interactive", lambda c, live: c.kbdint_respond("pw")),
    "protocol_error": ("publickey", lambda c, live: c.open_channel("session")),
    "lost": ("publickey", lambda c, live: c.drop()),
}


@pytest.mark.parametrize("event", list(TRIGGERS))
def test_what_ends_a_connection_while_the_config_server_decides(holding: conftest.LiveServer,
                                                                event: str) -> None:
    how, trigger = TRIGGERS[event]
    c, cid = enter_authenticated(holding, how)
    try:
        trigger(c, holding)
        records = tail_of(holding, cid)
        assert records[-3:] == [("SSH_AUTH_SUCCESSFUL", "auth_ok"), ("SSH_HANDSHAKE_FAILED", event),
                                ("SSH_DISCONNECTED", event)], records
        if event != "lost":
            assert c.wait_ended(WAIT)
            assert c.disconnect is not None and c.disconnect[0] == 2, c.transcript()
            assert "USERAUTH_SUCCESS" not in c.all_auth_replies
    finally:
        c.close_all()


def test_login_timeout_and_shutdown_while_the_config_server_decides(server_factory: Any,
                                                                     acs: AuthConfigServer) -> None:
    acs.passwords[HELD] = "pw"
    for how in ("login_timeout", "shutdown"):
        live = server_factory({**hooks(acs), "configserver": {"url": acs.url, "timeout": "60s",
                                                               "configTimeout": "60s"},
                               "limits": {"loginTimeout": "2s" if how == "login_timeout" else "60s"}})
        c, cid = enter_authenticated(live, "password")
        try:
            if how == "shutdown":
                assert live.stop() == 0
            tail = [("SSH_HANDSHAKE_FAILED", how), ("SSH_DISCONNECTED", how)]
            if how == "login_timeout":
                tail.insert(0, ("SSH_LOGIN_TIMEOUT", how))
            records = tail_of(live, cid)
            assert records[-len(tail) - 1:] == [("SSH_AUTH_SUCCESSFUL", "auth_ok"), *tail], records
        finally:
            c.close_all()


def test_success_waits_for_the_config_server(server_factory: Any, acs: AuthConfigServer) -> None:
    """Released, the held config answer lets the user in: USERAUTH_SUCCESS follows it,
    by password (the check waits) and by key (asyncssh's answer waits)."""
    acs.passwords[HELD] = "pw"
    live = server_factory({**hooks(acs), "configserver": {"url": acs.url, "timeout": "60s",
                                                           "configTimeout": "60s"}})
    acs.keys[HELD] = [pubkey(live)]
    held = [enter_authenticated(live, how) for how in ("password", "publickey")]
    try:
        acs.release()
        for c, cid in held:
            assert c.next_auth_reply(WAIT) == "USERAUTH_SUCCESS"
            live.wait_for(lambda rs, cid=cid: any(r["code"] == "SSH_HANDSHAKE_SUCCESSFUL"
                                                  and r["labels"].get("connectionId") == cid for r in rs))
    finally:
        for c, _ in held:
            c.close_all()


def test_a_client_that_asks_without_reading_while_the_config_server_decides(server_factory: Any,
                                                                             acs: AuthConfigServer) -> None:
    """Held in authenticated, the client stops reading and keeps sending SERVICE_REQUESTs
    (each answered): past limits.maxBufferedPerConnection the connection is dropped."""
    acs.passwords[HELD] = "pw"
    live = server_factory({**hooks(acs),
                           "configserver": {"url": acs.url, "timeout": "60s", "configTimeout": "60s"},
                           "limits": {"maxBufferedPerConnection": "64KiB"}})
    c, cid = enter_authenticated(live, "password")
    try:
        c.stop_reading()
        sent = c.flood(5, b"\x00\x00\x00\x0cssh-userauth")  # SERVICE_REQUEST
        records = tail_of(live, cid)
        assert records[-4:] == [("SSH_AUTH_SUCCESSFUL", "auth_ok"),
                                ("SSH_BUFFER_EXCEEDED", "buffer_exceeded"),
                                ("SSH_HANDSHAKE_FAILED", "buffer_exceeded"),
                                ("SSH_DISCONNECTED", "buffer_exceeded")], (sent, records)
    finally:
        c.close_all()
