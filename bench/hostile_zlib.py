"""A zlib bomb against a live `sshspec serve` with compression on: the server's RSS.

    .venv/bin/python bench/hostile_zlib.py [--messages 3] [--mib 200]

Starts `sshspec serve` (ssh.compression: true, a user with a password and a key,
the local backend), warms it up with one normal compressed session, then logs in
with an asyncssh client (by key: a password's scrypt check alone takes 16 MiB,
r=8 x N=2^14 x 128 bytes, for as long as it runs) that negotiates zlib@openssh.com
and sends SSH_MSG_IGNORE messages of --mib MiB of zeros each (~0.2 MB each on the
wire). The server's VmRSS is read idle (before the attacker connects) and once it
is logged in, and sampled every 5 ms from the first bomb until the connection is
gone; VmHWM (the kernel's peak) is read before and after, so a peak between
samples shows too. Prints one JSON line and a summary; exits 1 when the RSS grew
16 MiB or more from idle or the connection did not end with SSH_DECOMPRESSION_LIMIT.
Not part of `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.packet import String

ROOT = Path(__file__).resolve().parent.parent
USERNAME, PASSWORD = "bomb", "bench-password"
MSG_IGNORE = 2
LIMIT_KIB = 16 * 1024


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


KEY = asyncssh.generate_private_key("ssh-ed25519")


def start_server(work: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    from sshspec.adapters.passwords import hash_password
    log = work / "server.jsonl"
    config = work / "sshspec.yaml"
    public = KEY.export_public_key().decode().strip()
    config.write_text(json.dumps({  # JSON is YAML
        "ssh": {"listen": "127.0.0.1:0", "compression": True},
        "auth": {"users": [{"username": USERNAME, "passwordHash": hash_password(PASSWORD),
                            "authorizedKeys": [public]}]},
        "log": {"file": str(log), "flushInterval": 0},
        "backend": {"shell": "/bin/sh"},
        "stateDir": str(work / "state"),
    }))
    proc = subprocess.Popen([sys.executable, "-m", "sshspec.adapters.cli", "serve", "--config", str(config)],
                            cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    for raw in proc.stderr:
        if m := re.match(rb"sshspec: listening on 127\.0\.0\.1:(\d+)$", raw.rstrip()):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep it drained
            return proc, int(m.group(1)), log
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def options() -> dict[str, Any]:
    return {"username": USERNAME, "password": PASSWORD, "known_hosts": None, "client_keys": None,
            "agent_path": None, "preferred_auth": "password", "config": None,
            "compression_algs": ["zlib@openssh.com"]}


class Watch(asyncssh.SSHClient):
    lost: Exception | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        Watch.lost = exc


async def normal_session(port: int) -> None:
    async with asyncssh.connect("127.0.0.1", port, **options()) as conn:
        assert conn.get_extra_info("send_compression") == "zlib@openssh.com"
        done = await conn.run("echo ok", check=True)
        assert done.stdout == "ok\n", done


async def bomb(port: int, messages: int, mib: int, logged_in: Any) -> dict[str, Any]:
    blob = bytes(mib << 20)
    conn, _ = await asyncssh.create_connection(Watch, "127.0.0.1", port,
                                               **{**options(), "client_keys": [KEY],
                                                  "preferred_auth": "publickey"})
    peer = conn.get_extra_info("sockname")
    logged_in()
    sent = 0
    for _ in range(messages):
        if conn.is_closed():
            break
        # Compressed by asyncssh (zlib@openssh.com is on once authenticated): ~0.2 MB a message.
        conn.send_packet(MSG_IGNORE, String(blob))
        sent += 1
        await asyncio.sleep(0)
    try:
        await asyncio.wait_for(conn.wait_closed(), 30)
    except TimeoutError:  # the server swallowed the bombs: leave ourselves
        Watch.lost = RuntimeError("the server did not disconnect within 30 s")
        conn.close()
        await conn.wait_closed()
    return {"sent": sent, "client_addr": f"{peer[0]}:{peer[1]}", "lost": repr(Watch.lost)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--mib", type=int, default=200, help="MiB each IGNORE message inflates to")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, port, log = start_server(Path(tmp))
        try:
            asyncio.run(normal_session(port))
            time.sleep(0.5)  # let the warm-up's program and channel go
            unused = status_kib(proc.pid, "VmRSS")
            samples: list[int] = []
            base: dict[str, int] = {}
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    samples.append(status_kib(proc.pid, "VmRSS"))
                    time.sleep(0.005)

            sampler = threading.Thread(target=sample)

            def logged_in() -> None:  # called once authenticated, before the first bomb
                base.update(rss=status_kib(proc.pid, "VmRSS"), hwm=status_kib(proc.pid, "VmHWM"))
                sampler.start()

            started = time.monotonic()
            try:
                result = asyncio.run(bomb(port, args.messages, args.mib, logged_in))
            finally:
                stop.set()
                if sampler.is_alive():
                    sampler.join()
            elapsed = time.monotonic() - started
            before, hwm_before = base["rss"], base["hwm"]
            after, hwm_after = status_kib(proc.pid, "VmRSS"), status_kib(proc.pid, "VmHWM")
            asyncio.run(normal_session(port))  # the server still serves
        finally:
            proc.terminate()
            status = proc.wait(30)
        records = [json.loads(line) for line in log.read_bytes().splitlines()]
        cid = next(r["labels"]["connectionId"] for r in records
                   if r["code"] == "SSH_CONNECTED" and r["labels"].get("remoteAddr") == result["client_addr"])
        mine = [r for r in records if r["labels"].get("connectionId") == cid]
        ending = [(r["code"], r["labels"].get("reason")) for r in mine[-2:]]
    peak = max(samples, default=before)
    report = {
        "messages": args.messages, "mib_each": args.mib, "sent": result["sent"],
        "client_saw": result["lost"], "log_ending": ending, "server_exit": status,
        "rss_idle_kib": unused, "rss_before_kib": before, "rss_peak_kib": peak, "rss_after_kib": after,
        "grown_kib": peak - unused, "hwm_before_kib": hwm_before, "hwm_after_kib": hwm_after,
        "samples": len(samples), "seconds": round(elapsed, 3),
    }
    print(json.dumps(report))
    grown = max(peak, hwm_after if hwm_after > hwm_before else 0) - unused
    ok = grown < LIMIT_KIB and [c for c, _ in ending] == ["SSH_DECOMPRESSION_LIMIT", "SSH_DISCONNECTED"]
    print(f"zlib bomb, {result['sent']} of {args.messages} x {args.mib} MiB sent: server RSS "
          f"idle {unused / 1024:.1f}, attacker logged in {before / 1024:.1f}, peak "
          f"{peak / 1024:.1f} MiB (+{grown / 1024:.1f} from idle, limit {LIMIT_KIB // 1024}), "
          f"VmHWM {hwm_before / 1024:.1f} -> {hwm_after / 1024:.1f} MiB; "
          f"log ends {[c for c, _ in ending]}: {'ok' if ok else 'FAILED'}", file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
