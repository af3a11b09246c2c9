"""Instructions per pty keystroke, counted by valgrind's callgrind, in one session.

    .venv/bin/python bench/keystroke_instructions.py [-n 1000] [--cipher aes128-gcm@openssh.com]
                                                     [--baseline OTHER_CHECKOUT]

`make bench`'s keystroke round trip (bench/transfer.py) is a latency on a shared,
noisy machine: it moves by 20% between runs, more than one change to the server's
per-keystroke path is worth. This counts what the server itself executes for one
keystroke: `ssh -tt host cat` (OpenSSH's client, its default algorithms unless
`--cipher`), one byte written and its echo read back, as the bench does; the server
(`sshspec serve`, the local backend, default log settings) runs under callgrind,
and only the keystrokes after the first 400 of the session are counted (past the
login, and past the packet count after which a busy key keeps its crypto objects:
asyncssh_internals._KEEP_AFTER). `--baseline`: another checkout (its own .venv),
counted the same way after this one. Counts miss the kernel's side (the socket, the
pty), which is the same for both. Not part of `make bench`: callgrind is ~50x slower.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.instructions import dumped_total  # noqa: E402
from bench.run import LISTENING  # noqa: E402
from bench.transfer import Keystrokes, _ssh_opts  # noqa: E402

WARM = 400


def counted(work: Path, checkout: Path, name: str, n: int, cipher: str | None) -> int:
    """Instructions per keystroke of `checkout`'s server."""
    config = work / f"{name}.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "ssh": {"listen": "127.0.0.1:0", "hostkeys": [str(work / "host")]},
        "auth": {"users": [{"username": pwd.getpwuid(os.geteuid()).pw_name,
                            "authorizedKeys": [(work / "client.pub").read_text().strip()]}]},
        "backend": {"shell": "/bin/sh"},
        "log": {"file": str(work / f"{name}.log")},
        "stateDir": str(work / f"state-{name}")}))
    out = work / f"{name}.callgrind"
    err = work / f"{name}.stderr"
    with open(err, "wb") as errfile:
        server = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                   f"--callgrind-out-file={out}", str(checkout / ".venv" / "bin" / "sshspec"),
                                   "serve", "--config", str(config)],
                                  cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)},
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errfile)
    try:
        deadline = time.monotonic() + 300  # ~50x slower under callgrind
        while not (match := LISTENING.search(err.read_text(errors="replace"))):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"keystroke_instructions: {name} did not start: {err.read_text()[-2000:]}")
            time.sleep(0.2)
        ssh = ["ssh", "-tt", "-p", match.group(1), *_ssh_opts(work / "client"),
               *(["-c", cipher] if cipher else []), f"{pwd.getpwuid(os.geteuid()).pw_name}@127.0.0.1", "cat"]
        keys = Keystrokes(ssh)
        try:
            for _ in range(WARM):
                keys.one()

            def control(*args: str) -> None:
                subprocess.run(["callgrind_control", *args, str(server.pid)], check=True, capture_output=True)

            control("-z")
            control("-i", "on")
            for _ in range(n):
                keys.one()
            control("-i", "off")
            control("-d")
            keys.end()
        finally:
            keys.close()
        total = dumped_total(out, name)
    finally:
        server.terminate()
        server.wait(60)
    return total // n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="keystrokes counted per server (default 1000)")
    parser.add_argument("--cipher", help="the client's -c (default: its default algorithms)")
    parser.add_argument("--baseline", type=Path, help="another checkout, with its own .venv, counted too")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("keystroke_instructions: needs valgrind (apt-get install valgrind)")
    checkouts = {"sshspec": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    for name, checkout in checkouts.items():
        if not (checkout / ".venv" / "bin" / "sshspec").exists():
            raise SystemExit(f"keystroke_instructions: {name}: no .venv/bin/sshspec in {checkout}")
    with tempfile.TemporaryDirectory(prefix="sshspec-keystrokes-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        for key in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / key)], check=True)
        counts = {name: counted(work, checkout, name, args.n, args.cipher)
                  for name, checkout in checkouts.items()}
    for name, count in counts.items():
        print(f"{name:<9}{count:>10,} instructions per keystroke ({checkouts[name]})")
    if "baseline" in counts:
        print(f"sshspec / baseline {counts['sshspec'] / counts['baseline']:.3f}")


if __name__ == "__main__":
    main()
