"""What the bare server (A), the sshspec handler (B) and the load client share.

Auth cost is the same on both sides: `BENCH_AUTH=trivial` (the default) compares
the password with `hmac.compare_digest` on the event loop; `BENCH_AUTH=scrypt`
checks it with `verify_password` against a default-cost scrypt hash in the loop's
default executor, as `ConfiguredHandler` does.
"""

from __future__ import annotations

import asyncio
import hmac
import os

USERNAME = "bench"
PASSWORD = "bench-password"
OUTPUT = b"ok\n"
WAIT_COMMAND = "wait"  # the program then waits for the client's EOF (idle sessions)
AUTH_MODE = os.environ.get("BENCH_AUTH", "trivial")
if AUTH_MODE not in ("trivial", "scrypt"):
    raise SystemExit(f"BENCH_AUTH={AUTH_MODE!r}: expected trivial or scrypt")

_PASSWORD = PASSWORD.encode()
_hash: str | None = None


def _scrypt_hash() -> str:
    global _hash
    if _hash is None:
        from sshspec.adapters.passwords import hash_password
        _hash = hash_password(PASSWORD)
    return _hash


if AUTH_MODE == "scrypt":
    _scrypt_hash()  # once at start, not on the first login


async def check_password(username: str, password: bytes) -> bool:
    if AUTH_MODE == "scrypt":
        from sshspec.adapters.passwords import verify_password
        ok = await asyncio.get_running_loop().run_in_executor(None, verify_password, password,
                                                              _scrypt_hash())
    else:
        ok = hmac.compare_digest(password, _PASSWORD)
    return ok and username == USERNAME
