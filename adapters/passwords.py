"""Password hashes for `auth.users[].passwordHash` and `sshspec hash-password`.

Format (the PHC string format as used for scrypt by passlib and others)::

    $scrypt$ln=14,r=8,p=1$<salt>$<hash>

- ``ln`` is log2 of the scrypt cost N, ``r`` the block size, ``p`` the parallelism;
  they are stored so that hashes keep verifying if the defaults are ever raised.
- ``<salt>`` (16 random bytes) and ``<hash>`` (the 32-byte scrypt output) are standard
  base64 (``A-Za-z0-9+/``) without ``=`` padding.

Passwords are bytes; a ``str`` is UTF-8 encoded (``surrogatepass``, so no string can
make hashing or verification raise). There is no normalisation and no length cap:
scrypt feeds the password to PBKDF2-HMAC-SHA256 once, which hashes an over-long key
first, so a 1 MiB password costs about the same as an 8-byte one; the SSH transport
already bounds what a client can send.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import os
import re
from typing import BinaryIO, NamedTuple, TextIO

from asyncssh.saslprep import SASLPrepError, saslprep

LN, R, P = 14, 8, 1
SALT_BYTES = 16
KEY_BYTES = 32
# scrypt needs 128 * r * (N + p + 2) bytes; the cap keeps a hash string from a config
# file from asking for gigabytes at login time.
MAX_MEMORY = 64 * 1024 * 1024

# A hash of 32 random bytes that were thrown away: no password matches it. The server
# verifies unknown usernames against it so they take the same path and time as known
# ones (for hashes made with the default parameters).
DUMMY_HASH = "$scrypt$ln=14,r=8,p=1$gVoGKFN/KQAVScMwpWLrGQ$uqsKKwXRLOJBU0odqk2nkMaiNS/9vakXBH0BhXj5Axk"

_PARAMS = re.compile(r"ln=(\d{1,2}),r=(\d{1,3}),p=(\d{1,3})")


class ScryptHash(NamedTuple):
    ln: int
    r: int
    p: int
    salt: bytes
    key: bytes


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str, what: str) -> bytes:
    # validate=True refuses characters outside the alphabet instead of skipping them;
    # the round trip refuses non-canonical encodings (stray low bits in the last char).
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not unpadded base64") from None
    if _b64encode(data) != text:
        raise ValueError(f"{what} is not canonical unpadded base64")
    return data


def parse_hash(encoded: str) -> ScryptHash:
    """Split and check a hash string; ValueError names what is wrong (never echoes it)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "scrypt":
        raise ValueError(
            "not an scrypt hash: expected `$scrypt$ln=14,r=8,p=1$<salt>$<hash>`"
            " as printed by `sshspec hash-password`"
        )
    match = _PARAMS.fullmatch(parts[2])
    if match is None:
        raise ValueError("parameters must look like `ln=14,r=8,p=1`")
    ln, r, p = (int(g) for g in match.groups())
    if not (1 <= ln <= 31 and 1 <= r <= 255 and 1 <= p <= 16):
        raise ValueError("parameters out of range (1 <= ln <= 31, 1 <= r <= 255, 1 <= p <= 16)")
    if 128 * r * (2**ln + p + 2) > MAX_MEMORY:
        raise ValueError(f"parameters need more than {MAX_MEMORY // 2**20} MiB of memory")
    salt = _b64decode(parts[3], "salt")
    key = _b64decode(parts[4], "hash")
    if len(salt) < 16:
        raise ValueError("salt is shorter than 16 bytes")
    if not 16 <= len(key) <= 64:
        raise ValueError("hash is not 16 to 64 bytes long")
    return ScryptHash(ln, r, p, salt, key)


def _to_bytes(password: bytes | str) -> bytes:
    if isinstance(password, str):
        return password.encode("utf-8", "surrogatepass")
    return password


def _scrypt(password: bytes, ln: int, r: int, p: int, salt: bytes, dklen: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=2**ln, r=r, p=p, dklen=dklen, maxmem=MAX_MEMORY + 2**20)


def prepare(password: bytes | str) -> bytes:
    """The password as SSH carries it: UTF-8 after SASLprep (RFC 4013), which
    asyncssh applies to every "password" request (NFKC, soft hyphens dropped,
    non-ASCII spaces mapped). Hashing and checking the prepared form lets a
    password typed as given match whichever way the client sent it.
    ValueError when SSH cannot carry it (not UTF-8, control characters...)."""
    try:
        text = password.decode("utf-8") if isinstance(password, bytes) else password
        return saslprep(text).encode("utf-8")
    except (UnicodeError, SASLPrepError) as exc:
        raise ValueError(f"an SSH client cannot send this password: {exc}") from None


def hash_password(password: bytes | str) -> str:
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(prepare(password), LN, R, P, salt, KEY_BYTES)
    return f"$scrypt$ln={LN},r={R},p={P}${_b64encode(salt)}${_b64encode(key)}"


def verify_password(password: bytes | str, encoded: str) -> bool:
    """True when `password` matches; ValueError when `encoded` is malformed."""
    h = parse_hash(encoded)
    try:
        prepared, ok = prepare(password), True
    except ValueError:
        prepared, ok = _to_bytes(password), False  # same work, so the same time; never a match
    key = _scrypt(prepared, h.ln, h.r, h.p, h.salt, len(h.key))
    return hmac.compare_digest(key, h.key) and ok


def read_password_for_hashing(stdin: TextIO | BinaryIO) -> bytes:
    """The password for `sshspec hash-password`.

    On a terminal: prompt twice (no echo) and insist both agree. Otherwise (a pipe,
    a file) read one line as raw bytes and drop only its line ending, so leading or
    trailing spaces stay part of the password. An empty password is refused.
    """
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != first:
            raise ValueError("passwords do not match")
        password = _to_bytes(first)
    else:
        # Read bytes (via .buffer for sys.stdin) so a non-UTF-8 password is hashed as is;
        # a text stream without a buffer (io.StringIO) gives str, encoded as typed.
        password = _to_bytes(getattr(stdin, "buffer", stdin).readline())
        if password.endswith(b"\n"):
            password = password[:-1]
            if password.endswith(b"\r"):
                password = password[:-1]
    if not password:
        raise ValueError("empty password")
    return password
