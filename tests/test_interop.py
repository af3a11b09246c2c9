"""Every common client against `sshspec serve`, on the default and the strict profile.

Each client does what it does in real use: exec with stdin and an exit code, and
its own file transfers (see tests/interop.py, which also holds the expected
matrix the README's table is made from). A live server per case; its log replays
against the specs (check_log). The client programs come from Debian packages
(.ci/system-packages): a missing one is a failure, not a skip.

Certificate logins (OpenSSH user certificates) are tested in their own file, with
their rows in tests/interop.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
import interop
import paramiko
import pytest

from conftest import ROOT, LiveServer
from test_faults import check_log

HOST = "127.0.0.1"
COMMAND = "cat; exit 3"  # stdin comes back, and the exit code is not 0
STDIN = "hello from stdin\n"
PAYLOAD = b"interop payload\n" * 1000  # 16 KB: several packets


class StepFailed(AssertionError):
    pass


def _run(cmd: list[str], *, input: str = "", env: dict[str, str] | None = None,
         expect_rc: int = 0, cwd: Path | None = None) -> str:
    base = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    try:
        done = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=60,
                              env={**base, **(env or {})}, cwd=cwd)
    except FileNotFoundError as exc:
        raise AssertionError(f"{cmd[0]} is not installed (.ci/system-packages installs it)") from exc
    if done.returncode != expect_rc:
        raise StepFailed(f"{shlex.join(cmd)}: exit {done.returncode}, expected {expect_rc}\n"
                         f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def _files(tmp: Path) -> tuple[Path, Path]:
    """A file to upload, and one the server side holds for download."""
    up = tmp / "upload.bin"
    up.write_bytes(PAYLOAD)
    remote = tmp / "remote"
    remote.mkdir(exist_ok=True)
    (remote / "download.bin").write_bytes(PAYLOAD[::-1])
    return up, remote


def _same(path: Path, data: bytes, step: str) -> None:
    if not path.exists() or path.read_bytes() != data:
        raise StepFailed(f"{step}: {path} does not hold what was sent")


def _ssh_options(live: LiveServer) -> list[str]:
    return ["-F", "/dev/null", "-i", str(live.key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "LogLevel=ERROR"]


def _host_key(live: LiveServer) -> Path:
    return live.key.parent / "state" / "ssh_host_ed25519_key"


def _host_fingerprint(live: LiveServer) -> str:
    """SHA256:... of the server's host key, as OpenSSH and PuTTY print it."""
    out = _run(["ssh-keygen", "-lf", str(_host_key(live))])
    return out.split()[1]


# --- the clients -----------------------------------------------------------------------------

def openssh(live: LiveServer, tmp: Path) -> None:
    up, remote = _files(tmp)
    opts = _ssh_options(live)
    target = f"{live.username}@{HOST}"
    out = _run(["ssh", "-p", str(live.port), *opts, target, COMMAND], input=STDIN, expect_rc=3)
    if out != STDIN:
        raise StepFailed(f"ssh exec: stdout {out!r}")
    _run(["scp", "-P", str(live.port), *opts, str(up), f"{target}:{remote / 'scp.bin'}"])
    _same(remote / "scp.bin", PAYLOAD, "scp upload")
    _run(["sftp", "-P", str(live.port), *opts, "-b", "-", target],
         input=f"get {remote / 'download.bin'} {tmp / 'sftp.bin'}\n")
    _same(tmp / "sftp.bin", PAYLOAD[::-1], "sftp download")


def rsync(live: LiveServer, tmp: Path) -> None:
    up, remote = _files(tmp)
    shell = shlex.join(["ssh", "-p", str(live.port), *_ssh_options(live)])
    target = f"{live.username}@{HOST}"
    _run(["rsync", "-e", shell, str(up), f"{target}:{remote / 'rsync.bin'}"])
    _same(remote / "rsync.bin", PAYLOAD, "rsync upload")
    _run(["rsync", "-e", shell, f"{target}:{remote / 'download.bin'}", str(tmp / "rsync-down.bin")])
    _same(tmp / "rsync-down.bin", PAYLOAD[::-1], "rsync download")


def git(live: LiveServer, tmp: Path) -> None:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp),
           "GIT_SSH_COMMAND": shlex.join(["ssh", *_ssh_options(live)])}
    src = tmp / "src"
    _run(["git", "init", "-q", "-b", "main", str(src)], env=env)
    (src / "a.txt").write_text("one\n")
    _run(["git", "-C", str(src), "add", "a.txt"], env=env)
    _run(["git", "-C", str(src), "commit", "-q", "-m", "one"], env=env)
    bare = tmp / "repo.git"
    _run(["git", "clone", "-q", "--bare", str(src), str(bare)], env=env)
    url = f"ssh://{live.username}@{HOST}:{live.port}{bare}"
    work = tmp / "work"
    _run(["git", "clone", "-q", url, str(work)], env=env)
    if (work / "a.txt").read_text() != "one\n":
        raise StepFailed("git clone: wrong content")
    (work / "b.txt").write_text("two\n")
    _run(["git", "-C", str(work), "add", "b.txt"], env=env)
    _run(["git", "-C", str(work), "commit", "-q", "-m", "two"], env=env)
    _run(["git", "-C", str(work), "push", "-q", "origin", "main"], env=env)
    log = _run(["git", "--git-dir", str(bare), "log", "--format=%s", "main"], env=env)
    if log.split() != ["two", "one"]:
        raise StepFailed(f"git push: the bare repository has {log.split()}")


def putty(live: LiveServer, tmp: Path) -> None:
    up, remote = _files(tmp)
    ppk = tmp / "id.ppk"
    _run(["puttygen", str(live.key), "-O", "private", "-o", str(ppk)])
    opts = ["-batch", "-P", str(live.port), "-i", str(ppk), "-hostkey", _host_fingerprint(live)]
    target = f"{live.username}@{HOST}"
    out = _run(["plink", "-ssh", *opts, target, COMMAND], input=STDIN, expect_rc=3)
    if out != STDIN:
        raise StepFailed(f"plink exec: stdout {out!r}")
    _run(["pscp", *opts, str(up), f"{target}:{remote / 'pscp.bin'}"])
    _same(remote / "pscp.bin", PAYLOAD, "pscp upload")
    batch = tmp / "psftp.batch"
    batch.write_text(f"get {remote / 'download.bin'} {tmp / 'psftp.bin'}\n")
    _run(["psftp", *opts, "-b", str(batch), target])
    _same(tmp / "psftp.bin", PAYLOAD[::-1], "psftp download")


def dropbear(live: LiveServer, tmp: Path) -> None:
    up, remote = _files(tmp)
    key = tmp / "id.dropbear"
    _run(["dropbearconvert", "openssh", "dropbear", str(live.key), str(key)])
    # -y -y: no host-key check (dbclient can only check against ~/.ssh/known_hosts).
    client = ["dbclient", "-y", "-y", "-i", str(key), "-p", str(live.port)]
    target = f"{live.username}@{HOST}"
    out = _run([*client, target, COMMAND], input=STDIN, expect_rc=3)
    if out != STDIN:
        raise StepFailed(f"dbclient exec: stdout {out!r}")
    _run(["rsync", "-e", shlex.join(client), str(up), f"{target}:{remote / 'dbclient.bin'}"])
    _same(remote / "dbclient.bin", PAYLOAD, "rsync over dbclient")


def curl(live: LiveServer, tmp: Path) -> None:
    up, remote = _files(tmp)
    pin = base64.b64encode(hashlib.sha256(_public_blob(_host_key(live))).digest()).decode()
    base = ["curl", "-sS", "--hostpubsha256", pin, "-u", f"{live.username}:{live.password}"]
    url = f"://{HOST}:{live.port}"
    _run([*base, "-T", str(up), f"sftp{url}{remote / 'curl.bin'}"])
    _same(remote / "curl.bin", PAYLOAD, "curl sftp upload")
    _run([*base, "-o", str(tmp / "curl-sftp.bin"), f"sftp{url}{remote / 'download.bin'}"])
    _same(tmp / "curl-sftp.bin", PAYLOAD[::-1], "curl sftp download")
    _run([*base, "-o", str(tmp / "curl-scp.bin"), f"scp{url}{remote / 'download.bin'}"])
    _same(tmp / "curl-scp.bin", PAYLOAD[::-1], "curl scp download")


def _public_blob(private: Path) -> bytes:
    return asyncssh.read_private_key(str(private)).public_data


def _paramiko(live: LiveServer, tmp: Path) -> None:
    up, remote = _files(tmp)
    transport = paramiko.Transport((HOST, live.port))
    try:
        key = paramiko.Ed25519Key.from_private_key_file(str(live.key))
        transport.connect(username=live.username, pkey=key)
        chan = transport.open_session()
        chan.exec_command(COMMAND)
        chan.sendall(STDIN.encode())
        chan.shutdown_write()
        out = chan.makefile().read().decode()
        status = chan.recv_exit_status()
        if (out, status) != (STDIN, 3):
            raise StepFailed(f"paramiko exec: {out!r}, exit {status}")
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        sftp.put(str(up), str(remote / "paramiko.bin"))
        sftp.get(str(remote / "download.bin"), str(tmp / "paramiko-down.bin"))
        sftp.close()
    except paramiko.SSHException as exc:
        raise StepFailed(f"paramiko: {exc}") from exc
    finally:
        transport.close()
    _same(remote / "paramiko.bin", PAYLOAD, "paramiko sftp upload")
    _same(tmp / "paramiko-down.bin", PAYLOAD[::-1], "paramiko sftp download")


def _asyncssh(live: LiveServer, tmp: Path) -> None:
    up, remote = _files(tmp)

    async def run() -> None:
        async with asyncssh.connect(HOST, live.port, username=live.username, client_keys=[str(live.key)],
                                    known_hosts=None, agent_path=None) as conn:
            done = await conn.run(COMMAND, input=STDIN)
            if (done.stdout, done.exit_status) != (STDIN, 3):
                raise StepFailed(f"asyncssh exec: {done.stdout!r}, exit {done.exit_status}")
            async with conn.start_sftp_client() as sftp:
                await sftp.put(str(up), str(remote / "asyncssh.bin"))
                await sftp.get(str(remote / "download.bin"), str(tmp / "asyncssh-down.bin"))

    try:
        asyncio.run(asyncio.wait_for(run(), 60))
    except (OSError, asyncssh.Error) as exc:
        raise StepFailed(f"asyncssh: {exc}") from exc
    _same(remote / "asyncssh.bin", PAYLOAD, "asyncssh sftp upload")
    _same(tmp / "asyncssh-down.bin", PAYLOAD[::-1], "asyncssh sftp download")


RUNNERS: dict[str, Callable[[LiveServer, Path], None]] = {
    "OpenSSH ssh, scp, sftp": openssh,
    "rsync (over OpenSSH)": rsync,
    "git (over OpenSSH)": git,
    "PuTTY plink, pscp, psftp": putty,
    "Dropbear dbclient": dropbear,
    "curl sftp://, scp://": curl,
    "paramiko": _paramiko,
    "asyncssh": _asyncssh,
}


def outcome(live: LiveServer, failure: StepFailed | None) -> str:
    """The result as the table words it, from the server's log (and, for a client that
    hung up first, the client's own message). Certificate rows use it too."""
    records = live.wait_for(lambda rs: sum(r["code"] == "SSH_CONNECTED" for r in rs)
                            == sum(r["code"] == "SSH_DISCONNECTED" for r in rs) > 0)
    if failure is None:
        return interop.WORKS
    ended = [(r["code"], r["labels"].get("reason") or "") for r in records
             if r["code"] in ("SSH_HANDSHAKE_FAILED", "SSH_HANDSHAKE_ABANDONED")]
    # A client that finds no common key exchange in the server's KEXINIT may close before
    # its own KEXINIT went out (PuTTY does, some of the time): the server then saw a client
    # leave without trying, and only the client's message names the key exchange.
    client_says_kex = re.search(r"key exchange|kex|encryption keys", str(failure), re.IGNORECASE)
    if ended and all(
        (code == "SSH_HANDSHAKE_FAILED" and reason.startswith("No matching key exchange algorithm"))
        or (code == "SSH_HANDSHAKE_ABANDONED" and client_says_kex)
        for code, reason in ended
    ):
        return interop.NO_KEX
    return f"failed: {failure}; server: {ended}"


def test_every_client_has_a_runner() -> None:
    assert set(RUNNERS) == {c.name for c in interop.CLIENTS} - set(interop.EXTERNAL)


@pytest.mark.parametrize("profile", interop.PROFILES)
@pytest.mark.parametrize("client", list(RUNNERS))
def test_client(client: str, profile: str, server_factory: Any, tmp_path: Path) -> None:
    program = interop.BY_NAME[client].program
    if program not in ("paramiko", "asyncssh"):
        assert shutil.which(program), f"{program} is not installed (.ci/system-packages installs it)"
    live = server_factory({"ssh": {"profile": profile}})
    work = tmp_path / "work-area"
    work.mkdir()
    failure = None
    try:
        RUNNERS[client](live, work)
    except StepFailed as exc:
        failure = exc
    assert outcome(live, failure) == interop.EXPECTED[(client, profile)]
    if failure is None:
        records = live.records()
        codes = [r["code"] for r in records]
        assert "SSH_HANDSHAKE_FAILED" not in codes and "SSH_SPEC_VIOLATION" not in codes, codes
        # A request the server does not implement gets the same codes whatever its type
        # (issue #14): PuTTY's simple@putty.projects.tartarus.org as x11-req would.
        def types(code: str) -> set[str | None]:
            return {r["labels"].get("requestType") for r in records if r["code"] == code}
        unimplemented, refused = types("SSH_NOT_IMPLEMENTED"), types("SSH_CHANNEL_REQUEST_FAILED")
        assert refused <= unimplemented, (refused, unimplemented)
        if client.startswith("PuTTY"):
            assert "simple@putty.projects.tartarus.org" in unimplemented
    check_log(live)


def test_readme_table() -> None:
    """The README's interop table is the declared matrix (which test_client measures),
    with the versions installed here."""
    readme = ROOT / "README.md"
    table = interop.render({c.name: c.version() for c in interop.CLIENTS})
    if os.environ.get("SSHSPEC_UPDATE_README"):
        interop.replace_section(readme, table)
    assert interop.readme_section(readme) == table, (
        "README's interop table is stale; rewrite it with SSHSPEC_UPDATE_README=1 "
        ".venv/bin/python -m pytest tests/test_interop.py -k readme")
