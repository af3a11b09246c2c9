"""`make bench`'s forwarding phase: bytes through `ssh -L`, sshspec against OpenSSH's
sshd, side by side on this machine.

    .venv/bin/python bench/forwarding.py [--mib 256] [--rounds 3]

Both servers run on 127.0.0.1 (sshd started here with its own config, key and
authorized_keys in a temporary directory; sshspec with the local backend), the same
OpenSSH client (`ssh -N -L`, the same cipher for both) opens one tunnel to each.
A round sends MIB through each tunnel in each direction, the servers' turns
alternating: upload (the client writes, a sink on loopback reads to EOF and says how
many bytes it got) and download (a source sends MIB, the client reads to EOF). Each
is wall time, from the first byte to the last; the server's CPU time per MiB (its
every process and thread, schedstat) is the structural figure on this shared,
noisy machine. Medians and spreads, ratios printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import SSHSPEC, Server, start  # noqa: E402

CHUNK = 1 << 20


class Endpoints:
    """A sink (reads to EOF, answers with the byte count) and a source (sends `size`
    bytes, then closes) on loopback, each in a thread per connection."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sink = socket.create_server(("127.0.0.1", 0))
        self.source = socket.create_server(("127.0.0.1", 0))
        for sock, serve in ((self.sink, self._sink), (self.source, self._source)):
            threading.Thread(target=self._accept, args=(sock, serve), daemon=True).start()

    @staticmethod
    def _accept(sock: socket.socket, serve: Any) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _sink(conn: socket.socket) -> None:
        got = 0
        with contextlib.suppress(OSError), conn:  # (a readiness probe connects and leaves)
            while data := conn.recv(CHUNK):
                got += len(data)
            conn.sendall(str(got).encode())

    def _source(self, conn: socket.socket) -> None:
        block = b"x" * CHUNK
        with contextlib.suppress(OSError), conn:
            for _ in range(self.size // CHUNK):
                conn.sendall(block)


def upload(port: int, size: int) -> float:
    block = b"y" * CHUNK
    with socket.create_connection(("127.0.0.1", port)) as s:
        started = time.perf_counter()
        for _ in range(size // CHUNK):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while data := s.recv(64):
            answer += data
        took = time.perf_counter() - started
    if int(answer or b"0") != size:
        raise SystemExit(f"bench: upload through {port}: the sink got {answer!r}, not {size}")
    return took


def download(port: int, size: int) -> float:
    got = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        started = time.perf_counter()
        while data := s.recv(CHUNK):
            got += len(data)
        took = time.perf_counter() - started
    if got != size:
        raise SystemExit(f"bench: download through {port}: {got} bytes, not {size}")
    return took


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sshd(work: Path, pubkey: str) -> Server:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    key = work / "sshd_host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    auth = work / "sshd_authorized_keys"
    auth.write_text(pubkey)
    auth.chmod(0o600)
    port = free_port()
    config = work / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {key}\nAuthorizedKeysFile {auth}\n"
                      "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                      "StrictModes no\nPermitRootLogin prohibit-password\nAllowTcpForwarding yes\n"
                      f"PidFile {work / 'sshd.pid'}\nLogLevel ERROR\n")
    with open(work / "sshd.stderr", "wb") as err:
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return Server("sshd", proc, port)
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"bench: sshd did not start: {(work / 'sshd.stderr').read_text()[-2000:]}")


def start_sshspec(work: Path, pubkey: str) -> Server:
    config = work / "sshspec.yaml"
    config.write_text(json.dumps({
        "ssh": {"listen": "127.0.0.1:0"},
        "auth": {"users": [{"username": os.environ.get("USER") or "root", "authorizedKeys": [pubkey]}]},
        "log": {"level": "info", "format": "json", "file": str(work / "sshspec.log")},
        "stateDir": str(work / "state")}))
    return start("sshspec", [*SSHSPEC, "serve", "--config", str(config)], work, pin=False)


def tunnel(server: Server, key: Path, port: int, target: int) -> subprocess.Popen[bytes]:
    user = os.environ.get("USER") or "root"
    proc = subprocess.Popen(["ssh", "-N", "-F", "/dev/null", "-i", str(key), "-p", str(server.port),
                             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                             "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                             "-o", "Ciphers=aes128-gcm@openssh.com",
                             "-L", f"127.0.0.1:{port}:127.0.0.1:{target}", f"{user}@127.0.0.1"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    stderr = proc.stderr.read() if proc.stderr else b""
    raise SystemExit(f"bench: ssh -L to {server.name} did not come up: {stderr!r}")


def forwarding_phase(work: Path, mib: int, rounds: int) -> dict[str, Any]:
    size = mib * CHUNK
    key = work / "client_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pubkey = (work / "client_ed25519.pub").read_text().strip()
    ends = Endpoints(size)
    servers = [start_sshspec(work, pubkey), start_sshd(work, pubkey)]
    tunnels: list[subprocess.Popen[bytes]] = []
    results: dict[str, dict[str, list[float]]] = {
        s.name: {"upload_s": [], "download_s": [], "upload_cpu_ms_per_mib": [], "download_cpu_ms_per_mib": []}
        for s in servers}
    try:
        ports = {}
        for s in servers:
            up, down = free_port(), free_port()
            tunnels += [tunnel(s, key, up, ends.sink.getsockname()[1]),
                        tunnel(s, key, down, ends.source.getsockname()[1])]
            ports[s.name] = (up, down)
        for r in range(rounds):
            order = servers if r % 2 == 0 else servers[::-1]
            for s in order:
                up, down = ports[s.name]
                for what, run, port in (("upload", upload, up), ("download", download, down)):
                    before = s.cpu_ns()
                    took = run(port, size)
                    results[s.name][f"{what}_s"].append(took)
                    results[s.name][f"{what}_cpu_ms_per_mib"].append((s.cpu_ns() - before) / 1e6 / mib)
            times = {name: (got["upload_s"][-1], got["download_s"][-1]) for name, got in results.items()}
            print(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{name} up {up:.2f}s down {down:.2f}s" for name, (up, down) in times.items()), flush=True)
    finally:
        for t in tunnels:
            t.send_signal(signal.SIGTERM)
            t.wait(10)
        for s in servers:
            s.stop()
        ends.sink.close()
        ends.source.close()
    out: dict[str, Any] = {"mib": mib, "rounds": rounds, "raw": results}
    for what in ("upload", "download"):
        spec, sshd = results["sshspec"], results["sshd"]
        spec_mbps = [mib / t for t in spec[f"{what}_s"]]
        sshd_mbps = [mib / t for t in sshd[f"{what}_s"]]
        ratios = [a / b for a, b in zip(spec_mbps, sshd_mbps, strict=True)]
        out[what] = {
            "sshspec_mib_s": statistics.median(spec_mbps), "sshd_mib_s": statistics.median(sshd_mbps),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "sshspec_cpu_ms_per_mib": statistics.median(spec[f"{what}_cpu_ms_per_mib"]),
            "sshd_cpu_ms_per_mib": statistics.median(sshd[f"{what}_cpu_ms_per_mib"]),
        }
    return out


def report(res: dict[str, Any]) -> None:
    print(f"\nforwarding through ssh -L, {res['mib']} MiB each way, {res['rounds']} rounds (medians):")
    print(f"{'':10} {'sshspec MiB/s':>14} {'sshd MiB/s':>11} {'ratio':>6} {'(min-max)':>12} "
          f"{'CPU ms/MiB sshspec':>19} {'sshd':>6}")
    for what in ("upload", "download"):
        r = res[what]
        print(f"{what:10} {r['sshspec_mib_s']:14.1f} {r['sshd_mib_s']:11.1f} {r['ratio']:6.2f} "
              f"{r['ratio_min']:5.2f}-{r['ratio_max']:<5.2f} {r['sshspec_cpu_ms_per_mib']:19.2f} "
              f"{r['sshd_cpu_ms_per_mib']:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="MiB each way per round (default 256)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, the servers' turns alternating (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sshspec-bench-fwd-") as tmp:
        res = forwarding_phase(Path(tmp), args.mib, args.rounds)
    report(res)


if __name__ == "__main__":
    main()
