"""The algorithm profiles against ssh-audit and real clients (OpenSSH, paramiko, asyncssh)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import paramiko
import pytest

from sshspec.adapters.algorithms import (
    CONFIG_KEYS,
    KEPT_FOR_CLIENTS,
    PROFILES,
    WEAK,
    resolve,
    restrict_host_keys,
    server_options,
)

HOST = "127.0.0.1"
NOT_PQ = "does not provide protection against post-quantum attacks"
ENCRYPT_AND_MAC = "using encrypt-and-MAC mode"
PSEUDO_KEX = {"ext-info-s", "kex-strict-s-v00@openssh.com"}


class _Server(asyncssh.SSHServer):
    """Lets everyone in without auth: the tests are about the transport."""

    def begin_auth(self, username: str) -> bool:
        return False


def _process(process: asyncssh.SSHServerProcess) -> None:
    process.stdout.write("ok\n")
    process.exit(0)


class ServerThread:
    """An asyncssh server with `server_options(profile)` on its own loop."""

    def __init__(self, profile: str, key_file: Path, sftp_root: Path) -> None:
        self.profile = profile
        self._key_file = key_file
        self._sftp_root = os.fsencode(sftp_root)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncssh.SSHAcceptor | None = None
        self._error: BaseException | None = None
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = await asyncssh.create_server(
            _Server,
            HOST,
            0,
            process_factory=_process,
            sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=self._sftp_root),
            **server_options(self.profile, host_keys=[str(self._key_file)]),
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("keys")
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(tmp / "host_ed25519")
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(tmp / "id_ed25519")
    (tmp / "id_ed25519").chmod(0o600)
    (tmp / "sftp").mkdir()
    (tmp / "sftp" / "hello.txt").write_text("hi\n")
    return tmp


@pytest.fixture(scope="module", params=sorted(PROFILES))
def server(request: pytest.FixtureRequest, keys: Path) -> Iterator[ServerThread]:
    srv = ServerThread(request.param, keys / "host_ed25519", keys / "sftp").start()
    yield srv
    srv.stop()


def _ssh_audit() -> str:
    found = shutil.which("ssh-audit") or str(Path(sys.executable).parent / "ssh-audit")
    if not Path(found).exists():
        pytest.skip("ssh-audit is not installed")
    return found


def _audit(port: int) -> tuple[int, dict]:
    result = subprocess.run(
        [_ssh_audit(), "-j", "--skip-rate-test", "-t", "10", "-p", str(port), HOST],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (0, 2, 3), result.stderr  # good / warnings / failures
    return result.returncode, json.loads(result.stdout)


def _notes(report: dict, level: str) -> set[tuple[str, str, str]]:
    return {
        (section, entry["algorithm"], note)
        for section in ("kex", "key", "enc", "mac")
        for entry in report.get(section, [])
        for note in entry.get("notes", {}).get(level, [])
    }


def _offered(report: dict, section: str) -> list[str]:
    return [entry["algorithm"] for entry in report[section]]


def test_ssh_audit(server: ServerThread) -> None:
    returncode, report = _audit(server.port)
    algs = resolve(server.profile)
    kex = _offered(report, "kex")

    # What the server offers is what the profile asks for.
    assert [k for k in kex if k not in PSEUDO_KEX] == list(algs.kex)
    assert kex[0] in ("mlkem768x25519-sha256", "sntrup761x25519-sha512@openssh.com")
    assert _offered(report, "enc") == list(algs.encryption)
    assert _offered(report, "mac") == list(algs.mac)
    assert _offered(report, "key") == ["ssh-ed25519"]
    # Terrapin countermeasure (strict kex) and RFC 8308 extension negotiation.
    assert set(kex) >= PSEUDO_KEX
    assert_audit_clean(report, returncode, server.profile)


def _openssh_version() -> tuple[int, int]:
    banner = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", banner)
    assert match, banner
    return int(match[1]), int(match[2])


def _openssh(tool: str, server: ServerThread, keys: Path, *args: str, stdin: str = "") -> tuple:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} (OpenSSH client) is not installed")
    options = [
        "-F", "/dev/null",
        "-v",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=accept-new",
        "-o", f"UserKnownHostsFile={keys / f'known_hosts_{server.profile}'}",
        "-o", "IdentitiesOnly=yes",
        "-o", f"IdentityFile={keys / 'id_ed25519'}",
        "-o", "ConnectTimeout=10",
    ]  # fmt: skip
    port = ["-P" if tool == "sftp" else "-p", str(server.port)]
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    result = subprocess.run(
        [tool, *options, *port, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("tool", ["ssh", "sftp"])
def test_openssh_client(tool: str, server: ServerThread, keys: Path) -> None:
    if tool == "ssh":
        rc, out, err = _openssh("ssh", server, keys, f"u@{HOST}", "x")
        expected = "ok"
    else:
        rc, out, err = _openssh("sftp", server, keys, "-b", "-", f"u@{HOST}", stdin="ls\n")
        expected = "hello.txt"
    if (
        server.profile == "strict"
        and _openssh_version() < (9, 9)  # no ML-KEM before OpenSSH 9.9
        and "sntrup761x25519-sha512@openssh.com" not in resolve("strict").kex  # needs liboqs
    ):
        assert rc == 255
        assert "no matching key exchange method found" in err
        return
    assert rc == 0, err
    assert expected in out
    kex = re.search(r"kex: algorithm: (\S+)", err)
    assert kex and kex[1] in resolve(server.profile).kex


def test_paramiko_client(server: ServerThread) -> None:
    transport = paramiko.Transport((HOST, server.port))
    try:
        transport.connect()
        transport.auth_none("u")
        channel = transport.open_session()
        channel.exec_command("x")
        assert channel.makefile().read().strip() == b"ok"
        assert transport.remote_cipher in resolve(server.profile).encryption
    finally:
        transport.close()


def test_asyncssh_client(server: ServerThread) -> None:
    async def run() -> str:
        async with asyncssh.connect(
            HOST, server.port, known_hosts=None, username="u", client_keys=None
        ) as conn:
            assert conn.get_extra_info("send_cipher") in resolve(server.profile).encryption
            return str((await conn.run("x", check=True)).stdout).strip()

    assert asyncio.run(asyncio.wait_for(run(), 20)) == "ok"


@pytest.mark.parametrize(
    ("kwarg", "alg", "key"),
    [
        ("ciphers", "3des-cbc", "ssh.ciphers"),
        ("ciphers", "aes256-cbc", "ssh.ciphers"),
        ("ciphers", "arcfour256", "ssh.ciphers"),
        ("macs", "hmac-sha1", "ssh.macs"),
        ("macs", "hmac-sha1-etm@openssh.com", "ssh.macs"),
        ("macs", "umac-64-etm@openssh.com", "ssh.macs"),
        ("kex", "diffie-hellman-group1-sha1", "ssh.kex"),
        ("kex", "diffie-hellman-group14-sha1", "ssh.kex"),
        ("kex", "diffie-hellman-group-exchange-sha256", "ssh.kex"),
        ("host_key_algs", "ssh-rsa", "ssh.hostKeyAlgorithms"),
        ("host_key_algs", "ssh-dss", "ssh.hostKeyAlgorithms"),
    ],
)
def test_weak_override_refused(kwarg: str, alg: str, key: str) -> None:
    assert alg in WEAK
    good = {
        "ciphers": "aes128-gcm@openssh.com",
        "macs": "hmac-sha2-256-etm@openssh.com",
        "kex": "curve25519-sha256",
        "host_key_algs": "ssh-ed25519",
    }[kwarg]
    # Alone, and after a good algorithm, as a list and as a config string.
    for value in (alg, [good, alg], f"{good}, {alg}"):
        with pytest.raises(ValueError, match=rf"^{re.escape(key)}: '{re.escape(alg)}' .*weak"):
            server_options(**{kwarg: value})


def test_unknown_override_refused() -> None:
    with pytest.raises(ValueError, match=r"^ssh\.ciphers: 'aes512-gcm' is not supported"):
        server_options(ciphers="aes512-gcm")


def test_empty_override_keeps_profile() -> None:
    assert server_options(kex=(), ciphers="", macs=None) == server_options()
    with pytest.raises(ValueError, match=r"^ssh\.ciphers: no algorithms given"):
        server_options(ciphers=" , ")
    with pytest.raises(ValueError, match=r"^ssh\.profile: unknown profile 'paranoid'"):
        server_options("paranoid")


def test_good_override_accepted() -> None:
    options = server_options(ciphers="aes256-gcm@openssh.com, chacha20-poly1305@openssh.com")
    assert options["encryption_algs"] == ["aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"]
    with pytest.raises(ValueError, match=r"^ssh\.kex: 'curve25519-sha256' .*strict"):
        server_options("strict", kex="curve25519-sha256")


def test_weak_list_covers_asyncssh() -> None:
    """Every weak-looking algorithm this asyncssh knows is refused."""
    from asyncssh.encryption import get_encryption_algs
    from asyncssh.kex import get_kex_algs
    from asyncssh.mac import get_mac_algs
    from asyncssh.public_key import get_certificate_algs, get_public_key_algs

    every = get_kex_algs() + get_encryption_algs() + get_mac_algs()
    every += get_public_key_algs() + get_certificate_algs()
    weak = re.compile(r"sha1|md5|cbc|arcfour|-96|umac-64|dss|group1-|^ssh-rsa(-cert|$)|gex")
    looks_weak = {name for a in every if weak.search(name := a.decode())}
    assert looks_weak - WEAK == set()
    for profile in PROFILES.values():
        for field in ("kex", "encryption", "mac", "signature", "compression"):
            assert not set(getattr(profile, field)) & WEAK


def test_rsa_host_key_restricted() -> None:
    strong = asyncssh.generate_private_key("ssh-rsa", key_size=3072)
    (keypair,) = restrict_host_keys([strong], PROFILES["default"].signature)
    assert set(keypair.host_key_algorithms) == {b"rsa-sha2-256", b"rsa-sha2-512"}
    weak = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    with pytest.raises(ValueError, match=rf"^{CONFIG_KEYS['host_keys']}: 2048-bit RSA"):
        restrict_host_keys([weak], PROFILES["default"].signature)
    ecdsa = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    with pytest.raises(ValueError, match=r"^ssh\.hostKeyAlgorithms: host key .*ecdsa"):
        restrict_host_keys([ecdsa], PROFILES["default"].signature)


def assert_audit_clean(report: dict, returncode: int, profile: str) -> None:  # type: ignore[type-arg]
    """No failures and no CVEs; with the default profile only the post-quantum
    notes on the curve25519 key exchanges, with strict none at all."""
    assert report["cves"] == []
    assert report["additional_notes"] == []
    assert _notes(report, "fail") == set()
    if profile == "default":
        warnings = _notes(report, "warn")
        # Each warning is about an algorithm kept for named clients (algorithms.KEPT_FOR_CLIENTS).
        assert {alg for _, alg, _ in warnings} == set(KEPT_FOR_CLIENTS)
        assert {(s, a, n) for s, a, n in warnings if s == "kex"} == {
            ("kex", "curve25519-sha256", NOT_PQ),
            ("kex", "curve25519-sha256@libssh.org", NOT_PQ),
        }
        assert {n for s, _, n in warnings if s == "mac"} == {ENCRYPT_AND_MAC}
        assert returncode == 2  # warnings only
    else:
        assert _notes(report, "warn") == set()
        assert returncode == 0
