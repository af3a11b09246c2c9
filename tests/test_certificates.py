"""OpenSSH user certificates (#14 item 2): auth.trustedUserCAKeys, `cert-authority`
lines, authorizedPrincipals, validity, principals, source-address, force-command and
SHA-1 signed certificates, against a live server, with certificates that
`ssh-keygen -s` makes in the test and the real OpenSSH client (its query step: the
`querying` state) and paramiko (signs at once: the `checking` state).

ssh-keygen 9.2 still signs with SHA-1 when asked (`-t ssh-rsa` with an RSA CA; its
-L prints "using ssh-rsa"), so the SHA-1 certificate is made by ssh-keygen too (and
by asyncssh, `sig_alg="ssh-rsa"`, with asyncssh as the client).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import interop
import paramiko
import pytest
from test_interop import StepFailed, outcome

from conftest import SSHSPEC, LiveServer, start_server
from sshspec.fsm.certificates import Certificate, CertificatePolicy, CertRefusal, refusal
from test_faults import check_log


def keygen(*args: str) -> None:
    subprocess.run(["ssh-keygen", "-q", *args], check=True, capture_output=True)


class CA:
    """A directory of CAs and one user key; `sign` makes a certificate of that key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        keygen("-t", "ed25519", "-N", "", "-f", str(root / "ca"))  # auth.trustedUserCAKeys
        keygen("-t", "rsa", "-b", "2048", "-N", "", "-f", str(root / "rsa_ca"))  # trusted too
        keygen("-t", "ed25519", "-N", "", "-f", str(root / "line_ca"))  # carol's cert-authority line
        keygen("-t", "ed25519", "-N", "", "-f", str(root / "other_ca"))  # trusted by nobody
        keygen("-t", "ed25519", "-N", "", "-f", str(root / "user"))
        self.count = 0

    def sign(self, *options: str, ca: str = "ca", principals: str = "alice") -> Path:
        """A copy of the user key with a certificate; returns the private key's path
        (OpenSSH finds `<key>-cert.pub` beside it)."""
        self.count += 1
        key = self.root / f"k{self.count}"
        key.write_bytes((self.root / "user").read_bytes())
        key.chmod(0o600)
        (self.root / f"k{self.count}.pub").write_bytes((self.root / "user.pub").read_bytes())
        keygen("-s", str(self.root / ca), "-I", f"test-{self.count}", "-n", principals, *options,
               f"{key}.pub")
        return key


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return CA(tmp_path_factory.mktemp("cas"))


@pytest.fixture(scope="module")
def live(cas: CA, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = cas.root
    # alice: certificates naming her; bob: only certificates naming `ops`
    # (authorizedPrincipals); carol: a cert-authority line of her own. (The list replaces
    # the suite's base users: certificates are everyone's only credential here.)
    config = {"auth": {
        "trustedUserCAKeys": [str(root / "ca.pub"), str(root / "rsa_ca.pub")],
        "users": [
            {"username": "alice"},
            {"username": "bob", "authorizedPrincipals": ["ops"]},
            {"username": "carol",
             "authorizedKeys": [f"cert-authority {(root / 'line_ca.pub').read_text().strip()}"]},
        ]}}
    server = start_server(tmp_path_factory.mktemp("srv"), "certificates", config=config)
    yield server
    server.stop()


def ssh(live: LiveServer, key: Path, user: str, *command: str, source: str | None = None,
        stdin: bytes = b"", options: tuple[str, ...] = (),
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    args = ["ssh", "-p", str(live.port), "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", "IdentitiesOnly=yes", "-o", "PreferredAuthentications=publickey",
            "-i", str(key), "-o", f"CertificateFile={key}-cert.pub"]
    if source:
        args += ["-b", source]
    args += options
    return subprocess.run([*args, f"{user}@127.0.0.1", *command], input=stdin, capture_output=True,
                          timeout=60, env=env)


def refusals(live: LiveServer, user: str) -> list[str]:
    return [r["labels"]["reason"] for r in live.records()
            if r["code"] == "SSH_AUTH_CERT_REFUSED" and r["labels"].get("username") == user]


def refused(live: LiveServer, key: Path, user: str, why: CertRefusal, *, source: str | None = None) -> str:
    """Log in with the certificate, expect Permission denied and one new refusal saying `why`."""
    before = len(refusals(live, user))
    result = ssh(live, key, user, "true", source=source)
    assert result.returncode == 255 and b"Permission denied" in result.stderr, result
    live.wait_for(lambda _: len(refusals(live, user)) > before)
    reason = refusals(live, user)[before]
    assert reason.startswith(f"{why}: certificate 'test-"), reason
    return reason


def test_a_valid_certificate_logs_in(live: LiveServer, cas: CA) -> None:
    key = cas.sign("-V", "-5m:+1h")
    result = ssh(live, key, "alice", "echo", "in")
    assert (result.returncode, result.stdout) == (0, b"in\n"), result.stderr
    shown = subprocess.run(["ssh-keygen", "-l", "-f", str(cas.root / "ca.pub")], capture_output=True,
                           text=True, check=True).stdout.split()[1]
    # Which certificate and CA let her in, as sshd's "Accepted publickey" line says.
    assert any(r["code"] == "SSH_AUTH_SUCCESSFUL" and r["labels"].get("reason")
               == f"certificate 'test-{cas.count}' serial 0 signed by CA {shown}" for r in live.records())


def test_an_expired_certificate_is_refused(live: LiveServer, cas: CA) -> None:
    reason = refused(live, cas.sign("-V", "-2d:-1d"), "alice", CertRefusal.expired)
    assert "was valid until 20" in reason


def test_a_certificate_not_yet_valid_is_refused(live: LiveServer, cas: CA) -> None:
    reason = refused(live, cas.sign("-V", "+1d:+2d"), "alice", CertRefusal.not_yet_valid)
    assert "is valid from 20" in reason


def test_a_certificate_for_another_principal_is_refused(live: LiveServer, cas: CA) -> None:
    reason = refused(live, cas.sign(principals="mallory,root"), "alice", CertRefusal.principal)
    assert "is for 'mallory', 'root', user 'alice' needs one of 'alice'" in reason


def test_a_certificate_for_a_user_not_configured_is_refused(live: LiveServer, cas: CA) -> None:
    """Like sshd, which needs an account: a trusted CA does not mint users."""
    reason = refused(live, cas.sign(principals="mallory"), "mallory", CertRefusal.unknown_user)
    assert "offered for 'mallory', who is not in auth.users" in reason


def test_a_certificate_from_an_unknown_ca_is_refused(live: LiveServer, cas: CA) -> None:
    reason = refused(live, cas.sign(ca="other_ca"), "alice", CertRefusal.unknown_ca)
    shown = subprocess.run(["ssh-keygen", "-l", "-f", str(cas.root / "other_ca.pub")], capture_output=True,
                           text=True, check=True).stdout.split()[1]
    assert f"is signed by CA {shown}, not trusted for user 'alice'" in reason  # which CA, as ssh-keygen -l


def test_source_address_is_honoured(live: LiveServer, cas: CA) -> None:
    key = cas.sign("-O", "source-address=127.0.0.2/32")
    reason = refused(live, key, "alice", CertRefusal.source_address, source="127.0.0.3")
    assert "may be used from 127.0.0.2/32, not from 127.0.0.3" in reason
    result = ssh(live, key, "alice", "echo", "from-2", source="127.0.0.2")
    assert (result.returncode, result.stdout) == (0, b"from-2\n"), result.stderr


def test_force_command_runs_whatever_the_client_asks(live: LiveServer, cas: CA) -> None:
    key = cas.sign("-O", 'force-command=printf "forced[%s]" "${SSH_ORIGINAL_COMMAND-unset}"')
    result = ssh(live, key, "alice", "rm", "-rf", "/nonexistent")
    assert (result.returncode, result.stdout) == (0, b"forced[rm -rf /nonexistent]"), result.stderr
    # A shell request runs it too, without SSH_ORIGINAL_COMMAND (sshd sets it for exec only).
    result = ssh(live, key, "alice", stdin=b"echo not run\n")
    assert (result.returncode, result.stdout) == (0, b"forced[unset]"), result.stderr
    records = [r for r in live.records()
               if r["code"] == "SSH_EXIT" and r["labels"].get("username") == "alice"]
    assert any(r["labels"].get("command", "").startswith("printf") for r in records)


def test_a_sha1_signed_certificate_is_refused(live: LiveServer, cas: CA) -> None:
    key = cas.sign("-t", "ssh-rsa", ca="rsa_ca")
    shown = subprocess.run(["ssh-keygen", "-L", "-f", f"{key}-cert.pub"], capture_output=True, text=True,
                           check=True).stdout
    assert "(using ssh-rsa)" in shown  # really SHA-1
    reason = refused(live, key, "alice", CertRefusal.sha1)
    assert "signed with ssh-rsa (SHA-1)" in reason
    # The same CA signing with SHA-2 is trusted.
    result = ssh(live, cas.sign("-t", "rsa-sha2-512", ca="rsa_ca"), "alice", "echo", "sha2")
    assert (result.returncode, result.stdout) == (0, b"sha2\n"), result.stderr


def test_authorized_principals_replace_the_user_name(live: LiveServer, cas: CA) -> None:
    result = ssh(live, cas.sign(principals="ops"), "bob", "echo", "ops")
    assert (result.returncode, result.stdout) == (0, b"ops\n"), result.stderr
    reason = refused(live, cas.sign(principals="bob"), "bob", CertRefusal.principal)
    assert "user 'bob' needs one of 'ops'" in reason


def test_a_cert_authority_line_trusts_its_ca_for_its_user_only(live: LiveServer, cas: CA) -> None:
    result = ssh(live, cas.sign(ca="line_ca", principals="carol"), "carol", "echo", "carol")
    assert (result.returncode, result.stdout) == (0, b"carol\n"), result.stderr
    # carol's CA vouches for carol alone.
    refused(live, cas.sign(ca="line_ca", principals="alice"), "alice", CertRefusal.unknown_ca)


def paramiko_login(live: LiveServer, key: Path, user: str) -> paramiko.SSHClient:
    pkey = paramiko.Ed25519Key.from_private_key_file(str(key))
    pkey.load_certificate(f"{key}-cert.pub")
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect("127.0.0.1", live.port, username=user, pkey=pkey, allow_agent=False,
                   look_for_keys=False, timeout=30)
    return client


def test_a_signed_attempt_with_a_refused_certificate_counts(live: LiveServer, cas: CA) -> None:
    """paramiko signs at once (no query): the refusal is a failed attempt (`checking`)."""
    before = len(refusals(live, "alice"))
    with pytest.raises(paramiko.AuthenticationException):
        paramiko_login(live, cas.sign("-V", "-2d:-1d"), "alice")
    records = live.wait_for(lambda _: len(refusals(live, "alice")) > before)
    record = [r for r in records if r["code"] == "SSH_AUTH_CERT_REFUSED"][-1]
    assert record["labels"]["reason"].startswith("expired: ")
    attempt = [r for r in records if r["labels"].get("connectionId") == record["labels"]["connectionId"]]
    assert "SSH_AUTH_ATTEMPT" in [r["code"] for r in attempt]  # signed: an attempt, not a query


def test_a_signed_valid_certificate_logs_in_with_its_forced_command(live: LiveServer, cas: CA) -> None:
    client = paramiko_login(live, cas.sign("-O", "force-command=echo forced"), "alice")
    try:
        _, stdout, _ = client.exec_command("echo asked")
        assert stdout.read() == b"forced\n"
        assert stdout.channel.recv_exit_status() == 0
    finally:
        client.close()


# --- start-up: a malformed CA file or line is a config error (exit 2, file and key) -------


def serve_exit(tmp_path: Path, yaml_text: str) -> tuple[int, str]:
    config = tmp_path / "config.yaml"
    config.write_text(yaml_text)
    result = subprocess.run([*SSHSPEC, "serve", "--config", str(config)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    return result.returncode, result.stderr


def test_a_malformed_ca_file_is_refused_at_start(tmp_path: Path, cas: CA) -> None:
    bad = tmp_path / "cas.pub"
    bad.write_text(f"# CAs\n{(cas.root / 'ca.pub').read_text()}not a key\n")
    status, err = serve_exit(tmp_path, f"auth: {{trustedUserCAKeys: ['{bad}']}}\n")
    assert status == 2, err
    assert f"auth.trustedUserCAKeys[0]: `{bad}` line 3: not a public key" in err
    assert "Traceback" not in err
    # A certificate where a CA key belongs says so.
    cert = cas.sign()
    bad.write_text(Path(f"{cert}-cert.pub").read_text())
    status, err = serve_exit(tmp_path, f"auth: {{trustedUserCAKeys: ['{bad}']}}\n")
    assert status == 2 and "line 1: a certificate is not a CA key" in err, err


def test_a_malformed_cert_authority_line_is_refused_at_start(tmp_path: Path, cas: CA) -> None:
    ca = (cas.root / "ca.pub").read_text().strip()
    status, err = serve_exit(tmp_path, "auth:\n  users:\n    - username: a\n      authorizedKeys:\n"
                                       f"        - 'cert-authority,principals=\"x\" {ca}'\n")
    assert status == 2, err
    assert "auth.users[0].authorizedKeys[0]: options on a `cert-authority` line are not supported" in err
    keys = tmp_path / "authorized_keys"
    keys.write_text(f"{ca}\ncert-authority ssh-ed25519 AAAAnot-base64\n")
    status, err = serve_exit(tmp_path, f"auth: {{authorizedKeysFile: '{keys}'}}\n")
    assert status == 2, err
    assert f"auth.authorizedKeysFile: `{keys}` line 2: `cert-authority` line: not a public key" in err
    assert "Traceback" not in err


def test_an_empty_ca_file_and_a_list_in_one_principal_are_refused(tmp_path: Path, cas: CA) -> None:
    empty = tmp_path / "empty.pub"
    empty.write_text("# no CA yet\n")
    status, err = serve_exit(tmp_path, f"auth: {{trustedUserCAKeys: ['{empty}']}}\n")
    assert status == 2 and f"auth.trustedUserCAKeys[0]: `{empty}`: no CA key in the file" in err, err
    status, err = serve_exit(tmp_path, f"auth:\n  trustedUserCAKeys: ['{cas.root / 'ca.pub'}']\n  users:\n"
                                       "    - {username: a, authorizedPrincipals: [ops, 'dev, qa']}\n")
    assert status == 2, err
    assert "auth.users[0].authorizedPrincipals[1]: `dev, qa`: one principal per entry" in err


def test_authorized_principals_need_a_trusted_ca(tmp_path: Path) -> None:
    status, err = serve_exit(tmp_path, "auth:\n  users:\n    - {username: a, passwordHash: x, "
                                       "authorizedPrincipals: [ops]}\n")
    assert status == 2, err
    assert "auth.users[0].authorizedPrincipals: applies to certificates from auth.trustedUserCAKeys" in err


# --- the decision alone (fsm/certificates.py): the edges a live test cannot reach ----------

CA_BLOB = b"ca"


def cert(**fields: Any) -> Certificate:
    base: dict[str, Any] = dict(ca=CA_BLOB, signature_algorithm="ssh-ed25519", key_id="k", serial=7,
                                principals=("alice",), valid_after=100, valid_before=200)
    return Certificate(**{**base, **fields})


def test_the_validity_interval_is_half_open() -> None:
    policy = CertificatePolicy(trusted=frozenset({CA_BLOB}))
    assert refusal(policy, cert(), "alice", "127.0.0.1", 100) is None
    assert refusal(policy, cert(), "alice", "127.0.0.1", 99.5)[0] is CertRefusal.not_yet_valid  # type: ignore[index]
    assert refusal(policy, cert(), "alice", "127.0.0.1", 200)[0] is CertRefusal.expired  # type: ignore[index]


def test_a_certificate_without_principals_is_refused_everywhere() -> None:
    for policy in (CertificatePolicy(trusted=frozenset({CA_BLOB})),
                   CertificatePolicy(authorities={None: frozenset({CA_BLOB})})):
        why = refusal(policy, cert(principals=()), "alice", "127.0.0.1", 150)
        assert why is not None and why[0] is CertRefusal.principal and "is for none" in why[1]


def test_source_address_matches_ipv4_mapped_and_ipv6() -> None:
    policy = CertificatePolicy(trusted=frozenset({CA_BLOB}))
    limited = cert(source_addresses=("10.0.0.0/8", "2001:db8::/32"))
    assert refusal(policy, limited, "alice", "::ffff:10.1.2.3", 150) is None
    assert refusal(policy, limited, "alice", "2001:db8::1", 150) is None
    assert refusal(policy, limited, "alice", None, 150)[0] is CertRefusal.source_address  # type: ignore[index]


def test_time_is_the_wall_clock() -> None:
    policy = CertificatePolicy(trusted=frozenset({CA_BLOB}))
    now = time.time()
    assert refusal(policy, cert(valid_after=int(now) - 60, valid_before=int(now) + 60), "alice", None, now) \
        is None


def test_an_unreadable_ca_file_is_a_failed_start(tmp_path: Path) -> None:
    """Like an unreadable authorizedKeysFile (a config may be checked on another
    machine): SSH_START_FAILED naming the key and the file, exit 1, no traceback."""
    log = tmp_path / "log.jsonl"
    status, err = serve_exit(tmp_path, f"ssh: {{listen: '127.0.0.1:0'}}\nstateDir: {tmp_path}/state\n"
                                       f"auth: {{trustedUserCAKeys: ['{tmp_path}/nope.pub']}}\n"
                                       f"log: {{file: {log}, flushInterval: 0}}\n")
    why = f"auth.trustedUserCAKeys[0]: cannot read `{tmp_path}/nope.pub`: No such file or directory"
    assert status == 1 and "Traceback" not in err, err
    assert err.endswith(f"sshspec serve: cannot start on 127.0.0.1:0: {why}\n"), err
    assert '"code":"SSH_START_FAILED"' in log.read_text() and why in log.read_text()


def test_an_asyncssh_client_logs_in_with_a_certificate_asyncssh_made(live: LiveServer, cas: CA) -> None:
    """asyncssh as the client and as the CA (its own certificate encoder), and its SHA-1
    certificate (`sig_alg="ssh-rsa"`) refused like ssh-keygen's."""
    import asyncio

    import asyncssh

    ca = asyncssh.read_private_key(str(cas.root / "rsa_ca"))
    user = asyncssh.generate_private_key("ssh-ed25519")

    async def login(sig_alg: str) -> bytes | str:
        cert = ca.generate_user_certificate(user, "asyncssh-made", principals=["alice"],
                                            valid_after="-5m", valid_before="+1h", sig_alg=sig_alg)
        try:
            async with asyncssh.connect("127.0.0.1", live.port, username="alice", client_keys=[(user, cert)],
                                        known_hosts=None, preferred_auth="publickey") as conn:
                result = await conn.run("echo asyncssh", check=True)
                return str(result.stdout)
        except asyncssh.PermissionDenied:
            return "denied"

    assert asyncio.run(login("rsa-sha2-256")) == "asyncssh\n"
    before = len(refusals(live, "alice"))
    assert asyncio.run(login("ssh-rsa")) == "denied"
    live.wait_for(lambda _: len(refusals(live, "alice")) > before)
    assert refusals(live, "alice")[before].startswith("SHA-1 signature: certificate 'asyncssh-made'")


def test_a_certificate_without_the_forwarding_extensions_forwards_nothing(
        live: LiveServer, cas: CA, agent: dict[str, str]) -> None:
    """sshd's rules for `ssh-keygen -O no-port-forwarding -O no-agent-forwarding`: the
    config allows both (forwarding's defaults), the certificate does not; the same key
    with a plain certificate gets the agent."""
    plain = ssh(live, cas.sign(), "alice", 'echo "[$SSH_AUTH_SOCK]"; ssh-add -l', options=("-A",),
                env=agent)
    assert plain.returncode == 0 and b"forwarded-key" in plain.stdout, plain
    restricted = cas.sign("-O", "no-port-forwarding", "-O", "no-agent-forwarding")
    agentless = ssh(live, restricted, "alice", 'echo "[$SSH_AUTH_SOCK]"', options=("-A",), env=agent)
    assert agentless.stdout == b"[]\n", agentless
    stdio = ssh(live, restricted, "alice", options=("-W", f"127.0.0.1:{live.port}"))  # direct-tcpip
    assert stdio.returncode == 255 and b"stdio forwarding failed" in stdio.stderr, stdio
    live.wait_for(lambda records: any(r["code"] == "SSH_FORWARD_DENIED" for r in records))
    reasons = {r["code"]: r["labels"].get("reason") for r in live.records()
               if r["code"] in ("SSH_FORWARD_DENIED", "SSH_AGENT_FORWARDING_DENIED")}
    assert reasons["SSH_AGENT_FORWARDING_DENIED"] == \
        "the certificate does not permit agent forwarding (no permit-agent-forwarding)"
    assert reasons["SSH_FORWARD_DENIED"].endswith(
        ": the certificate does not permit port forwarding (no permit-port-forwarding)")


def test_a_certificate_without_permit_pty_gets_no_pty(live: LiveServer, cas: CA) -> None:
    """sshd's rule for the permit-pty extension (`ssh-keygen -O no-pty`): the pty request
    fails (SSH_CHANNEL_REQUEST_FAILED with why); OpenSSH's `-tt` then closes the channel
    itself, as it does against sshd ("PTY allocation request failed"), and so does
    paramiko; the connection goes on."""
    result = ssh(live, cas.sign("-O", "no-pty"), "alice", "tty", options=("-tt",))
    assert b"PTY allocation request failed on channel 0" in result.stderr, result
    assert any(r["code"] == "SSH_CHANNEL_REQUEST_FAILED" and r["labels"].get("requestType") == "pty-req"
               and r["labels"].get("reason") == "the certificate does not permit a pty (no permit-pty)"
               for r in live.records())
    client = paramiko_login(live, cas.sign("-O", "no-pty"), "alice")
    try:
        transport = client.get_transport()
        assert transport is not None
        with pytest.raises(paramiko.SSHException):
            transport.open_session().get_pty()
        channel = transport.open_session()  # the connection goes on, without a pty
        channel.exec_command("tty")
        assert channel.makefile().read() == b"not a tty\n"
    finally:
        client.close()
    result = ssh(live, cas.sign(), "alice", "tty", options=("-tt",))  # ssh-keygen permits one by default
    assert result.returncode == 0 and result.stdout.startswith(b"/dev/pts/"), result


@pytest.mark.parametrize("profile", interop.PROFILES)
def test_interop_row(profile: str, cas: CA, server_factory: Any) -> None:
    """The interop table's certificate row (tests/interop.py): OpenSSH logs in with a
    certificate of a trusted CA and runs exec with stdin and an exit code."""
    live = server_factory({"ssh": {"profile": profile}, "auth": {
        "trustedUserCAKeys": [str(cas.root / "ca.pub")], "users": [{"username": "alice"}]}})
    done = ssh(live, cas.sign(), "alice", "cat; exit 3", stdin=b"hello from stdin\n")
    failure = None
    if (done.returncode, done.stdout) != (3, b"hello from stdin\n"):
        failure = StepFailed(f"ssh: exit {done.returncode}: {done.stderr.decode(errors='replace')}")
    assert outcome(live, failure) == interop.EXPECTED[(interop.CERTIFICATE, profile)]
    check_log(live)
