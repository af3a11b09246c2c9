"""`make bench`'s transfer phase: bulk transfer against OpenSSH's sshd, side by side.

    .venv/bin/python bench/run.py --transfer-only [--transfer-size 1G] [--sftp-size 512M]
                                  [--keystrokes 500] [--transfer-rounds 3]
                                  [--transfer-baseline OTHER_CHECKOUT] [--transfer-chacha]

Two servers on 127.0.0.1, both pinned to CPU 0 (with every process they start), the
OpenSSH clients on CPU 1: sshspec (`sshspec serve`, the local backend, default log
settings) and OpenSSH's sshd, started here with a config of its own (port, host key,
an authorized_keys file, no PAM) for a test user whose shell is /bin/sh
(`sshspec-bench`, created once with useradd if missing; sshspec runs its programs as
its own user, with /bin/sh too). Rounds alternate the order (sshd first, then sshspec
first), each measure once per server per round:

* download: `ssh -c CIPHER host 'head -c SIZE /dev/zero; times >&2' > /dev/null`
* upload:   `head -c SIZE /dev/zero | ssh -c CIPHER host 'cat > /dev/null; times >&2'`
  (aes128-gcm and aes256-gcm)
* download with the client's default algorithms (no `-c`): what an OpenSSH client
  that names none gets. The two servers then run different algorithms: OpenSSH lists
  chacha20-poly1305 first, which sshd takes, and aes128-ctr next, which sshspec takes
  (it does not offer chacha20, adapters/algorithms.py) with umac-128-etm.
* sftp get / put of a SIZE file (a file in /dev/shm to /dev/null, and back)
* pty keystrokes: one byte at a time into `ssh -tt host cat` (a pty running cat),
  each round trip timed until the echo comes back out of the client; with the
  client's default algorithms (as above), and with aes128-gcm on both.

Server CPU is its cgroup's (one per server, made here: everything it ever ran, so
sshd's per-connection and privsep processes count, read once a session's processes
are gone) minus the program's own CPU (`times` in the remote shell: head, cat). For
sftp the sftp-server program (the same binary on both) is included. Throughput is
the client's wall time. Ratios are sshspec / sshd, medians of the rounds (min, max).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_USER = "sshspec-bench"
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
# --transfer-chacha: also chacha20-poly1305, which sshspec does not offer unless configured
# (adapters/algorithms.py); the sshspec servers then list it (ssh.ciphers), after these.
CHACHA = "chacha20-poly1305@openssh.com"
SSHSPEC_CIPHERS = [*CIPHERS, CHACHA, "aes128-ctr", "aes256-ctr"]
SERVER_CPU, CLIENT_CPU = 0, 1
TICK = os.sysconf("SC_CLK_TCK")
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if not m:
        raise SystemExit(f"bench: size {text!r}: expected e.g. 512M or 1G")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


def _pin(cpu: int) -> Any:
    two = (os.cpu_count() or 1) >= 2
    return (lambda: os.sched_setaffinity(0, {cpu})) if two else None


@dataclass
class Target:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    user: str
    cgroup: Path
    idle: set[int] = field(default_factory=set)  # its process tree with no session

    def tree(self) -> list[int]:
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            with contextlib.suppress(FileNotFoundError):  # a process that just ended
                for task in Path(f"/proc/{pid}/task").glob("*/children"):
                    todo += [int(p) for p in task.read_text().split()]
        return out

    def cpu_s(self) -> float:
        """CPU of every process that ever ran in the server's cgroup: sshd's
        per-connection processes too, after they exit (the kernel's accounting)."""
        return _cgroup_usage_ns(self.cgroup) / 1e9

    def settled_cpu_s(self, timeout: float = 30.0) -> float:
        """CPU once the last session's processes are gone and reaped."""
        deadline = time.monotonic() + timeout
        while not set(self.tree()) <= self.idle and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.cpu_s()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# Server CPU comes from a cgroup of its own per server: /proc's cutime misses sshd's
# session processes (nobody waits for them with accounting), and sampling would miss
# short-lived ones. cgroup v1's cpuacct or v2's cpu.stat, whichever is mounted.
_CG_V1 = Path("/sys/fs/cgroup/cpuacct")
_CG_V2 = Path("/sys/fs/cgroup")


def _make_cgroup(name: str) -> Path | None:
    for base in (_CG_V1, _CG_V2):
        marker = "cpuacct.usage" if base == _CG_V1 else "cgroup.controllers"
        if (base / marker).exists():
            path = base / f"sshspec-bench-{os.getpid()}-{name}"
            try:
                path.mkdir(exist_ok=True)
            except OSError:
                continue
            return path
    return None


def _cgroup_usage_ns(path: Path) -> int:
    if (path / "cpuacct.usage").exists():
        return int((path / "cpuacct.usage").read_text())
    stat = dict(line.split() for line in (path / "cpu.stat").read_text().splitlines())
    return int(stat["usage_usec"]) * 1000


def _enter(path: Path, cpu: int) -> Any:
    pin = _pin(cpu)

    def setup() -> None:
        (path / "cgroup.procs").write_text(str(os.getpid()))
        if pin is not None:
            pin()
    return setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
            s.recv(4)  # the version line: the server is past its start-up
            return
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"bench: {what} did not start:\n{log.read_text(errors='replace')[-2000:]}")


def ensure_user() -> str | None:
    """The test user sshd logs in (shell /bin/sh); None and a reason if impossible."""
    try:
        pwd.getpwnam(BENCH_USER)
        return None
    except KeyError:
        pass
    if os.geteuid() != 0 or not shutil.which("useradd"):
        return f"no user {BENCH_USER} and cannot create it (not root or no useradd)"
    # Password "*": none can match, but the account is not locked ("!"), which sshd
    # without PAM refuses even for a key.
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/",
                    "--shell", "/bin/sh", "--password", "*", BENCH_USER], check=True)
    return None


def start_sshd(work: Path, pubkey: str, cgroup: Path) -> Target:
    keys = work / "sshd_authorized_keys"
    keys.write_text(pubkey + "\n")
    keys.chmod(0o644)
    host = work / "sshd_host_ed25519"
    if not host.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host)], check=True)
    port = _free_port()
    config = work / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {host}", "PidFile none",
        f"AuthorizedKeysFile {keys}", "StrictModes no", "UsePAM no", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", f"AllowUsers {BENCH_USER}", "PrintMotd no",
        "PrintLastLog no", "Banner none", "MaxStartups 100", "X11Forwarding no",
        f"Subsystem sftp {SFTP_SERVER}", "LogLevel ERROR", ""]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    log = work / "sshd.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                preexec_fn=_enter(cgroup, SERVER_CPU))
    _wait_listening(port, proc, "sshd", log)
    return Target("sshd", proc, port, BENCH_USER, cgroup)


def start_sshspec(work: Path, sshspec: list[str], pubkey: str, env: dict[str, str],
                  cgroup: Path, *, name: str = "sshspec", root: Path = ROOT, chacha: bool = False) -> Target:
    """sshspec from the checkout `root` (another one: `--transfer-baseline`, its own venv)."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    port = _free_port()
    config = work / f"transfer-{name}.yaml"
    config.write_text(json.dumps({  # JSON is YAML; log level, durability: the defaults
        "ssh": {"listen": f"127.0.0.1:{port}", "hostkeys": [str(work / "sshd_host_ed25519")],
                **({"ciphers": SSHSPEC_CIPHERS} if chacha else {})},
        "auth": {"users": [{"username": user, "authorizedKeys": [pubkey]}]},
        "backend": {"shell": "/bin/sh"},
        "log": {"format": "json", "file": str(work / f"transfer-{name}.log")},
        "stateDir": str(work / f"transfer-state-{name}")}))
    log = work / f"transfer-{name}.stderr"
    with open(log, "wb") as err:
        proc = subprocess.Popen([*sshspec, "serve", "--config", str(config)], cwd=root,
                                env={**env, "PYTHONPATH": str(root)},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=_enter(cgroup, SERVER_CPU))
    _wait_listening(port, proc, name, log)
    return Target(name, proc, port, user, cgroup)


def _ssh_opts(key: Path) -> list[str]:
    return ["-i", str(key), "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", "IdentitiesOnly=yes"]


def _program_cpu(stderr: bytes) -> float:
    """The remote shell's `times`: its second line is the children's user and sys time."""
    lines = [ln for ln in stderr.decode(errors="replace").splitlines() if re.match(r"^\d+m", ln)]
    if len(lines) < 2:
        raise SystemExit(f"bench: no `times` output from the remote shell: {stderr[-500:]!r}")
    return sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", lines[1]))


def _run(argv: list[str] | str, target: Target, what: str, *, shell: bool = False) -> tuple[float, bytes]:
    start = time.monotonic()
    done = subprocess.run(argv, shell=shell, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, preexec_fn=_pin(CLIENT_CPU), timeout=900)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"bench: {what} on {target.name} failed ({done.returncode}): "
                         f"{done.stderr.decode(errors='replace')[-800:]}")
    return wall, done.stderr


def stream(target: Target, key: Path, cipher: str | None, size: int, upload: bool) -> dict[str, float]:
    """`cipher` None: the client's default algorithms."""
    ssh = ["ssh", "-p", str(target.port), *_ssh_opts(key), *(["-c", cipher] if cipher else []),
           f"{target.user}@127.0.0.1"]
    before = target.settled_cpu_s()
    if upload:
        remote = "'cat > /dev/null; times >&2'"
        cmd = f"head -c {size} /dev/zero | {' '.join(ssh)} {remote}"
        wall, err = _run(cmd, target, f"upload {cipher or 'defaults'}", shell=True)
    else:
        wall, err = _run([*ssh, f"head -c {size} /dev/zero; times >&2"], target,
                         f"download {cipher or 'defaults'}")
    cpu = target.settled_cpu_s() - before - _program_cpu(err)
    return {"mb_per_s": size / wall / 1e6, "cpu_s_per_gb": cpu / (size / 1e9)}


def sftp(target: Target, key: Path, local: Path, size: int, put: bool) -> dict[str, float]:
    batch = f"put {local} /dev/null\n" if put else f"get {local} /dev/null\n"
    argv = ["sftp", "-P", str(target.port), *_ssh_opts(key), "-c", CIPHERS[0], "-b", "-",
            f"{target.user}@127.0.0.1"]
    before = target.settled_cpu_s()
    start = time.monotonic()
    done = subprocess.run(argv, input=batch.encode(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, preexec_fn=_pin(CLIENT_CPU), timeout=900)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"bench: sftp {'put' if put else 'get'} on {target.name} failed: "
                         f"{done.stderr.decode(errors='replace')[-800:]}")
    cpu = target.settled_cpu_s() - before
    return {"mb_per_s": size / wall / 1e6, "cpu_s_per_gb": cpu / (size / 1e9)}


def keystrokes(target: Target, key: Path, count: int, cipher: str | None = None) -> dict[str, float]:
    """Round trips of one byte into a pty (its echo) through OpenSSH's client (`ssh -tt
    host cat`), timed by a driver on the client CPU writing to its stdin and reading
    its stdout. `cipher` None: the client's default algorithms."""
    ssh = ["ssh", "-tt", "-p", str(target.port), *_ssh_opts(key), *(["-c", cipher] if cipher else []),
           f"{target.user}@127.0.0.1", "cat"]
    done = subprocess.run([sys.executable, str(Path(__file__)), "keystrokes", str(count), *ssh],
                          capture_output=True, preexec_fn=_pin(CLIENT_CPU), timeout=300, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"bench: keystrokes on {target.name} failed: {done.stderr.decode()[-800:]}")
    result: dict[str, float] = json.loads(done.stdout)
    return result


class Keystrokes:
    """`ssh -tt host cat` (argv `ssh`) driven a byte at a time from its stdin: past what
    the server says first, each `one()` writes a byte and reads back the pty's echo."""

    def __init__(self, ssh: list[str]) -> None:
        self.proc = subprocess.Popen(ssh, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.out, self.inp = self.proc.stdout.fileno(), self.proc.stdin.fileno()
        try:
            os.write(self.inp, b"x")  # skip anything the server says first, up to the first echo
            seen = b""
            while b"x" not in seen or select.select([self.out], [], [], 0.2)[0]:
                chunk = os.read(self.out, 4096)
                if not chunk:
                    raise SystemExit(f"keystrokes: no echo, only {seen[-200:]!r}")
                seen += chunk
        except BaseException:
            self.close()
            raise

    def one(self) -> None:
        os.write(self.inp, b"x")
        if os.read(self.out, 1) != b"x":  # the pty's echo
            raise SystemExit("keystrokes: no echo")

    def end(self) -> None:
        """End the line, then EOF: cat exits, and so does the session."""
        os.write(self.inp, b"\r\x04")
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(60)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _keystroke_driver(count: int, ssh: list[str]) -> dict[str, float]:
    keys = Keystrokes(ssh)
    try:
        rtts = []
        for _ in range(count + 10):  # the first few warm up the path
            start = time.perf_counter()
            keys.one()
            rtts.append(time.perf_counter() - start)
        keys.end()
    finally:
        keys.close()
    rtts = sorted(rtts[10:])
    return {"p50_us": rtts[len(rtts) // 2] * 1e6, "p90_us": rtts[len(rtts) * 9 // 10] * 1e6}


def _ratio(values: list[dict[str, float]], other: list[dict[str, float]], key: str) -> dict[str, float]:
    ratios = [a[key] / b[key] for a, b in zip(values, other, strict=True)]
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
            "max": round(max(ratios), 3)}


def transfer_phase(work: Path, _host_key: Path, sshspec: list[str], env: dict[str, str], *, size: int,
                   sftp_size: int, keys: int, rounds: int, baseline: Path | None = None,
                   chacha: bool = False) -> dict[str, Any]:
    """`baseline`: another sshspec checkout (with its own .venv), measured in the same
    rounds as a third server, "baseline": before/after side by side."""
    problem = ensure_user()
    if problem is not None or not shutil.which("sshd"):
        return {"skipped": problem or "no sshd (openssh-server) installed"}
    if baseline is not None and not (baseline / ".venv" / "bin" / "sshspec").exists():
        return {"skipped": f"--transfer-baseline {baseline}: no .venv/bin/sshspec there"}
    cgroups = [_make_cgroup("sshd"), _make_cgroup("sshspec")]
    if baseline is not None:
        cgroups.append(_make_cgroup("baseline"))
    if None in cgroups:
        return {"skipped": "cannot make a cgroup to account the servers' CPU"}
    # sshd reads the authorized_keys file as the test user: the work dir (0700) must be
    # traversable (the private keys in it stay 0600).
    work.chmod(0o711)
    key = work / "transfer_id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pubkey = (work / "transfer_id_ed25519.pub").read_text().strip()
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    local = shm / f"sshspec-bench-{os.getpid()}.bin"
    with open(local, "wb") as f:
        f.truncate(sftp_size)  # sparse: reads cost no disk, writes of /dev/null none either
    local.chmod(0o644)
    servers: list[Target] = []
    measures: list[tuple[str, Any]] = []
    for cipher in (*CIPHERS, CHACHA) if chacha else CIPHERS:
        short = cipher.split("@")[0]
        measures.append((f"download {short}", lambda t, c=cipher: stream(t, key, c, size, False)))
        measures.append((f"upload {short}", lambda t, c=cipher: stream(t, key, c, size, True)))
    measures.append(("download defaults", lambda t: stream(t, key, None, size, False)))
    measures.append(("sftp get aes128-gcm", lambda t: sftp(t, key, local, sftp_size, False)))
    measures.append(("sftp put aes128-gcm", lambda t: sftp(t, key, local, sftp_size, True)))
    measures.append(("pty keystroke", lambda t: keystrokes(t, key, keys)))
    measures.append(("pty keystroke aes128-gcm", lambda t: keystrokes(t, key, keys, CIPHERS[0])))
    names = ["sshd", "sshspec"] + (["baseline"] if baseline is not None else [])
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        name: {srv: [] for srv in names} for name, _ in measures}
    try:
        assert cgroups[0] is not None and cgroups[1] is not None
        servers.append(start_sshd(work, pubkey, cgroups[0]))
        servers.append(start_sshspec(work, sshspec, pubkey, env, cgroups[1], chacha=chacha))
        if baseline is not None:
            assert cgroups[2] is not None
            servers.append(start_sshspec(work, [str(baseline / ".venv" / "bin" / "sshspec")], pubkey,
                                         env, cgroups[2], name="baseline", root=baseline,
                                         chacha=chacha))
        for target in servers:  # a first session starts what stays (sshspec's guard)
            ssh = ["ssh", "-p", str(target.port), *_ssh_opts(key), f"{target.user}@127.0.0.1"]
            _run([*ssh, "true"], target, "warm-up")
            time.sleep(0.5)  # its session processes end (the set is taken once, here)
            target.idle = set(target.tree())
        for turn in range(rounds):
            order = servers if turn % 2 == 0 else servers[::-1]
            for name, measure in measures:
                for target in order:
                    results[name][target.name].append(measure(target))
                last = [results[name][srv][-1] for srv in names[1:] + ["sshd"]]
                print(f"  round {turn + 1}/{rounds} {name:<25} " + "  ".join(
                    f"{k} " + "/".join(f"{x[k]:.3f}" for x in last) for k in last[0]), flush=True)
    finally:
        for s in servers:
            s.stop()
        local.unlink(missing_ok=True)
        for cg in cgroups:  # what the servers left (sessions of a failed measure) goes too
            if cg is not None:
                with contextlib.suppress(OSError):
                    for pid in (cg / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                    deadline = time.monotonic() + 5
                    while (cg / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
                        time.sleep(0.01)
                    cg.rmdir()
    out: dict[str, Any] = {"size": size, "sftp_size": sftp_size, "keystrokes": keys, "rounds": rounds,
                           "rounds_raw": results, "ratios": {},
                           "baseline": None if baseline is None else str(baseline)}
    for name, per in results.items():
        keys_of = per["sshspec"][0].keys()
        out["ratios"][name] = {k: _ratio(per["sshspec"], per["sshd"], k) for k in keys_of}
        out["ratios"][name]["medians"] = {
            srv: {k: round(statistics.median(x[k] for x in per[srv]), 3) for k in keys_of}
            for srv in names}
        if baseline is not None:
            out.setdefault("baseline_ratios", {})[name] = {
                k: _ratio(per["baseline"], per["sshd"], k) for k in keys_of}
            out.setdefault("vs_baseline", {})[name] = {
                k: _ratio(per["sshspec"], per["baseline"], k) for k in keys_of}
    return out


def report(t: dict[str, Any]) -> None:
    if "skipped" in t:
        print(f"\ntransfer: skipped: {t['skipped']}")
        return
    print(f"\ntransfer vs OpenSSH sshd (servers on CPU 0, clients on CPU 1; {t['size'] >> 20} MiB streams, "
          f"{t['sftp_size'] >> 20} MiB sftp, {t['keystrokes']} keystrokes, {t['rounds']} rounds): "
          f"sshspec / sshd, median (min max); medians sshspec | sshd")
    for name, r in t["ratios"].items():
        cells = []
        for k, v in r.items():
            if k != "medians":
                cells.append(f"{k} {v['median']:.3f} ({v['min']:.3f} {v['max']:.3f})")
        med = r["medians"]
        print(f"  {name:<25}" + "   ".join(cells) + "   | " + "  ".join(
            f"{k} {med['sshspec'][k]} | {med['sshd'][k]}" for k in med["sshspec"]))
    if t.get("baseline"):
        print(f"baseline {t['baseline']}, same rounds: baseline / sshd, then sshspec / baseline, "
              f"median (min max)")
        for label, table in (("baseline/sshd", t["baseline_ratios"]), ("sshspec/baseline", t["vs_baseline"])):
            for name, r in table.items():
                print(f"  {label:<17} {name:<25}" + "   ".join(
                    f"{k} {v['median']:.3f} ({v['min']:.3f} {v['max']:.3f})" for k, v in r.items()))


def targets(t: dict[str, Any]) -> dict[str, tuple[Any, str, bool]]:
    if "skipped" in t:
        return {}
    r = t["ratios"]
    out: dict[str, tuple[Any, str, bool]] = {}
    for name in ("download aes128-gcm", "sftp get aes128-gcm"):
        v = r[name]["cpu_s_per_gb"]["median"]
        out[f"{name}: server CPU/GB vs sshd"] = (v, "<= 1.0", v <= 1.0)
    v = r["pty keystroke"]["p50_us"]["median"]
    out["pty keystroke round trip vs sshd"] = (v, "<= 1.1", v <= 1.1)
    return out


if __name__ == "__main__" and len(sys.argv) > 3 and sys.argv[1] == "keystrokes":
    print(json.dumps(_keystroke_driver(int(sys.argv[2]), sys.argv[3:])))
