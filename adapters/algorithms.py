"""SSH algorithm profiles for the asyncssh 2.24.1 server.

Two profiles, both with an ed25519 host key as the default:

``default``
    Post-quantum hybrid key exchange first (``mlkem768x25519-sha256``; plus
    ``sntrup761x25519-sha512@openssh.com`` when asyncssh finds liboqs), then
    classical X25519 so that clients older than OpenSSH 9.9 (Debian 12 ships
    9.2) still connect.  After the EtM MACs, the non-EtM ``hmac-sha2-256`` and
    ``hmac-sha2-512``, kept for named clients that have no EtM MAC: Dropbear
    2022.83 (``dbclient``, Debian 12) and libssh2 1.10 (curl's ``sftp://`` and
    ``scp://``, PHP's ssh2, libgit2); without them both fail with "no matching
    MAC".  Clients that know an EtM MAC still get it (SSH takes the client's
    order, and every such client lists EtM first).  ssh-audit 3.9 reports no
    failures; its only warnings are "does not provide protection against
    post-quantum attacks" on the two curve25519 names and "using
    encrypt-and-MAC mode" on the two non-EtM MACs (`KEPT_FOR_CLIENTS`).
``strict``
    Post-quantum hybrid key exchange and EtM MACs only: ssh-audit reports no
    warnings and no failures.  OpenSSH >= 9.9, paramiko 5.1 and asyncssh connect; Debian 12's
    OpenSSH 9.2 does not, unless liboqs is installed so that sntrup761 is on
    offer.

SSH takes the *client's* order: for every algorithm class the first entry of
the client's list that the server also lists wins (RFC 4253, 7.1).  The order
below is the order of preference, but only leaving an algorithm out changes
what a client gets.  That is why ``chacha20-poly1305@openssh.com`` is not on
offer, though it is secure: OpenSSH and asyncssh clients list it first, so
offering it means their sessions use asyncssh's slowest cipher (see below).
It is also the one cipher here that ssh-audit names as open to Terrapin
against peers without strict kex.  Its only benefit is to clients without AES
(none seen in practice).  It is not in `WEAK`, so ``ssh.ciphers`` can turn it
back on.  Left out as well: ``aes192-ctr``, which
no client needs instead of aes128/256-ctr.

Measured per-byte cost in asyncssh 2.24.1 (cryptography 50.0.2 / OpenSSL
4.0.3, AMD EPYC with AES-NI, SHA-NI and VAES, 2 vCPUs, Python 3.11).  The
first two columns are encrypt plus verify-and-decrypt of one packet through
asyncssh's own packet objects, best of 3.  The last is the CPU per byte of a
whole 64 MiB transfer over loopback, best of 5 (lowest and highest of three
runs):

================================= ========= ======== ====================
cipher (+ MAC)                    32 KiB pk 1 KiB pk 64 MiB loopback, CPU
================================= ========= ======== ====================
aes128-gcm@openssh.com            0.47 ns/B 5.9 ns/B 3.1-3.3 ns/B
aes256-gcm@openssh.com            0.50 ns/B 5.9 ns/B 3.2-3.3 ns/B
aes128-ctr + umac-128-etm         0.93 ns/B 11  ns/B 3.8-3.9 ns/B
aes256-ctr + umac-128-etm         1.0  ns/B 11  ns/B 4.0-4.4 ns/B
aes128-ctr + hmac-sha2-256-etm    1.65 ns/B 6.5 ns/B 4.3-5.5 ns/B
aes256-ctr + hmac-sha2-256-etm    1.75 ns/B 6.4 ns/B 4.5-4.7 ns/B
chacha20-poly1305@openssh.com     1.60 ns/B 29  ns/B 5.4-5.6 ns/B
aes256-ctr + hmac-sha2-512-etm    3.05 ns/B 9.0 ns/B 5.9-6.1 ns/B
================================= ========= ======== ====================

So chacha20-poly1305 costs 3.4x AES-GCM per byte in the packet object at
32 KiB packets and 5x at 1 KiB, because asyncssh builds four pyca objects for
every packet.  A whole transfer costs 1.65-1.8x as much CPU (about 170 instead
of 290-300 MiB/s), the rest being asyncssh's framing.  AES-128 and AES-256
cost the same within noise.  UMAC (libnettle through ctypes) is the cheapest
MAC for bulk data and HMAC-SHA-256 the cheapest for small packets.

To reproduce the first two columns, run
``python -m sshspec.adapters.algorithms [payload_bytes] [MiB]`` (defaults:
32768 and 64).  The loopback column ran client and server in one event loop,
so one core does both ends.  The client called ``conn.run(input=64 MiB)``
against a server process that counts its stdin, with
``time.process_time()`` around the call and ``encryption_algs``/``mac_algs``
pinned to the row on both sides.

Host keys: asyncssh's server offers every host-key algorithm a loaded key can
sign with.  For an RSA key that includes ``ssh-rsa`` (SHA-1), which ssh-audit
fails.  The ``signature_algs`` option does not change that: on a server it
only fills the ``server-sig-algs`` extension, i.e. which *user*-key signatures
clients are told they may use.  Pass the host keys through
``server_options(host_keys=...)`` (or `restrict_host_keys`) so that only
`Algorithms.signature` is offered.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncssh
from asyncssh.compression import get_compression_algs
from asyncssh.encryption import get_encryption_algs
from asyncssh.kex import get_kex_algs
from asyncssh.mac import get_mac_algs
from asyncssh.public_key import (
    decode_ssh_public_key,
    get_certificate_algs,
    get_public_key_algs,
)
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = [
    "CLIENT_AUTH_SIGNATURES",
    "COMPRESSION_ON",
    "CONFIG_KEYS",
    "KEPT_FOR_CLIENTS",
    "MIN_RSA_BITS",
    "PROFILES",
    "WEAK",
    "Algorithms",
    "resolve",
    "restrict_host_keys",
    "server_options",
]

AlgList = str | Sequence[str] | None


@dataclass(frozen=True)
class Algorithms:
    """One set of SSH algorithm lists, most preferred first."""

    kex: tuple[str, ...]
    encryption: tuple[str, ...]
    mac: tuple[str, ...]
    signature: tuple[str, ...]
    """Host-key algorithms the server may offer (applied to the host keys)."""
    compression: tuple[str, ...]


_PQ_KEX = ("mlkem768x25519-sha256", "sntrup761x25519-sha512@openssh.com")
_CLASSICAL_KEX = ("curve25519-sha256", "curve25519-sha256@libssh.org")
# paramiko only knows the @libssh.org name; OpenSSH 6.5 to 7.3 does as well.
_CIPHERS = (  # cheapest per byte first (see the table above)
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)
_MACS = (
    "umac-128-etm@openssh.com",
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
)
# Encrypt-and-MAC (the tag covers the plaintext), which ssh-audit warns about; with
# the AES-GCM and AES-CTR ciphers on offer no attack is known. Default profile only.
_NON_ETM_MACS = ("hmac-sha2-256", "hmac-sha2-512")
KEPT_FOR_CLIENTS: dict[str, str] = {
    # algorithm: the clients that need it (ssh-audit warns about each; README, Security)
    "curve25519-sha256": "OpenSSH < 9.9 (Debian 12's 9.2), PuTTY 0.78, Dropbear, libssh2: no PQ kex",
    "curve25519-sha256@libssh.org": "paramiko and OpenSSH 6.5-7.3 know only this name",
    "hmac-sha2-256": "Dropbear 2022.83 and libssh2 1.10 (curl sftp:// and scp://) have no EtM MAC",
    "hmac-sha2-512": "Dropbear 2022.83 and libssh2 1.10 (curl sftp:// and scp://) have no EtM MAC",
}
_HOST_KEY_ALGS = (
    "ssh-ed25519",
    "ssh-ed25519-cert-v01@openssh.com",
    # These take effect only when an RSA host key is configured:
    "rsa-sha2-512",
    "rsa-sha2-512-cert-v01@openssh.com",
    "rsa-sha2-256",
    "rsa-sha2-256-cert-v01@openssh.com",
)
# Compression is off by default (ssh.compression): "none" only. Turned on, the
# server adds zlib@openssh.com, which starts only after authentication (OpenSSH's
# "delayed" compression; plain "zlib", which starts before, is never offered), and
# every decompressed packet is bounded (asyncssh_internals.MAX_DECOMPRESSED).
_COMPRESSION = ("none",)
COMPRESSION_ON = ("none", "zlib@openssh.com")

PROFILES: dict[str, Algorithms] = {
    "default": Algorithms(
        kex=_PQ_KEX + _CLASSICAL_KEX,
        encryption=_CIPHERS,
        mac=_MACS + _NON_ETM_MACS,
        signature=_HOST_KEY_ALGS,
        compression=_COMPRESSION,
    ),
    "strict": Algorithms(
        kex=_PQ_KEX,
        encryption=_CIPHERS,
        mac=_MACS,
        signature=_HOST_KEY_ALGS,
        compression=_COMPRESSION,
    ),
}
"""Wanted lists.  Entries the running asyncssh lacks are dropped by `resolve`:
sntrup761 needs the liboqs shared library, umac needs libnettle and ML-KEM
needs a cryptography build whose OpenSSL has it (the 50.0.2 wheel here does)."""

# User-key signature algorithms advertised in ``server-sig-algs``.  asyncssh's
# server still *verifies* other signatures its key classes know (including
# ssh-rsa/SHA-1); what is accepted is up to the auth layer.
CLIENT_AUTH_SIGNATURES: tuple[str, ...] = (
    "ssh-ed25519",
    "sk-ssh-ed25519@openssh.com",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "webauthn-sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-256",
)

# Algorithms refused even as an explicit override, and why.
_SHA1 = "SHA-1 is broken (chosen-prefix collisions)"
_MD5 = "MD5 is broken"
_CBC = "CBC mode: plaintext recovery (CVE-2008-5161) and Terrapin with EtM MACs"
_BLOCK64 = "64-bit block cipher (Sweet32)"
_RC4 = "RC4 is broken"
_GEX = "asyncssh grants 1024-bit groups to clients that ask (ssh-audit: fail)"
_DH2048 = "2048-bit modulus, 112-bit strength"
_TRUNC = "truncated MAC tag (64 or 96 bits)"
_WEAK_REASONS: dict[str, str] = {
    # key exchange
    "diffie-hellman-group1-sha1": "1024-bit modulus (Logjam) and " + _SHA1,
    "diffie-hellman-group14-sha1": _SHA1,
    "diffie-hellman-group14-sha256": _DH2048,
    "diffie-hellman-group14-sha256@ssh.com": _DH2048,
    "diffie-hellman-group14-sha224@ssh.com": _DH2048,
    "diffie-hellman-group-exchange-sha1": _SHA1,
    "diffie-hellman-group-exchange-sha256": _GEX,
    "diffie-hellman-group-exchange-sha224@ssh.com": _GEX,
    "diffie-hellman-group-exchange-sha384@ssh.com": _GEX,
    "diffie-hellman-group-exchange-sha512@ssh.com": _GEX,
    "gss-group1-sha1": "1024-bit modulus and " + _SHA1,
    "gss-group14-sha1": _SHA1,
    "gss-group14-sha256": _DH2048,
    "gss-gex-sha1": _SHA1,
    "gss-gex-sha256": _GEX,
    "rsa1024-sha1": "1024-bit RSA and " + _SHA1,
    "rsa2048-sha256": "2048-bit RSA, 112-bit strength",
    # ciphers
    "3des-cbc": _BLOCK64,
    "blowfish-cbc": _BLOCK64,
    "cast128-cbc": _BLOCK64,
    "seed-cbc@ssh.com": _CBC,
    "aes128-cbc": _CBC,
    "aes192-cbc": _CBC,
    "aes256-cbc": _CBC,
    "arcfour": _RC4,
    "arcfour128": _RC4,
    "arcfour256": _RC4,
    # MACs
    "hmac-sha1": _SHA1,
    "hmac-sha1-etm@openssh.com": _SHA1,
    "hmac-sha1-96": _SHA1,
    "hmac-sha1-96-etm@openssh.com": _SHA1,
    "hmac-md5": _MD5,
    "hmac-md5-etm@openssh.com": _MD5,
    "hmac-md5-96": _MD5,
    "hmac-md5-96-etm@openssh.com": _MD5,
    "hmac-sha2-256-96": _TRUNC,
    "hmac-sha2-256-96-etm@openssh.com": _TRUNC,
    "hmac-sha2-512-96": _TRUNC,
    "hmac-sha2-512-96-etm@openssh.com": _TRUNC,
    "umac-64@openssh.com": _TRUNC,
    "umac-64-etm@openssh.com": _TRUNC,
    # host keys
    "ssh-rsa": _SHA1,
    "ssh-rsa-cert-v01@openssh.com": _SHA1,
    "ssh-dss": "1024-bit DSA and " + _SHA1,
    "ssh-dss-cert-v01@openssh.com": "1024-bit DSA and " + _SHA1,
}
WEAK: frozenset[str] = frozenset(_WEAK_REASONS)
"""Refused everywhere, each for the reason in ``_WEAK_REASONS``.  The NIST
curves (ecdh-sha2-nistp*, mlkem*nistp*, ecdsa host keys) are not here: they
are sound and FIPS deployments need them, although ssh-audit fails them."""

# The keys of adapters/config.py, named in error messages.
CONFIG_KEYS: dict[str, str] = {
    "kex": "ssh.kex",
    "encryption": "ssh.ciphers",
    "mac": "ssh.macs",
    "signature": "ssh.hostKeyAlgorithms",
    "host_keys": "ssh.hostkeys",
    "profile": "ssh.profile",
}
MIN_RSA_BITS = 3072  # ssh-audit warns below: 2048 bits is 112-bit strength


def _names(algs: list[bytes]) -> frozenset[str]:
    return frozenset(a.decode("ascii") for a in algs)


_SUPPORTED: dict[str, Callable[[], frozenset[str]]] = {
    "kex": lambda: _names(get_kex_algs()),
    "encryption": lambda: _names(get_encryption_algs()),
    "mac": lambda: _names(get_mac_algs()),
    "signature": lambda: _names(get_public_key_algs() + get_certificate_algs()),
    "compression": lambda: _names(get_compression_algs()),
}


def _is_pq(kex: str) -> bool:
    return kex.startswith(("mlkem", "sntrup"))


def _override(field: str, value: str | Sequence[str], strict: bool) -> tuple[str, ...]:
    key = CONFIG_KEYS[field]
    items = value.split(",") if isinstance(value, str) else list(value)
    algs = tuple(dict.fromkeys(a.strip() for a in items if a.strip()))
    if not algs:
        raise ValueError(f"{key}: no algorithms given")
    supported = _SUPPORTED[field]()
    for alg in algs:
        if alg in WEAK:
            raise ValueError(f"{key}: {alg!r} is refused as weak: {_WEAK_REASONS[alg]}")
        if alg not in supported:
            raise ValueError(f"{key}: {alg!r} is not supported by asyncssh {asyncssh.__version__}")
        if strict and field == "kex" and not _is_pq(alg):
            reason = "profile 'strict' takes post-quantum hybrids only"
            raise ValueError(f"{key}: {alg!r} is not allowed: {reason}")
    return algs


def resolve(
    profile: str = "default",
    *,
    kex: AlgList = None,
    ciphers: AlgList = None,
    macs: AlgList = None,
    host_key_algs: AlgList = None,
    compression: bool = False,
) -> Algorithms:
    """The profile's lists, minus what this asyncssh lacks, with overrides.

    Overrides (a comma-separated string or a sequence) replace the profile's
    list; ``None`` or an empty one keeps it.  They must name algorithms asyncssh supports, none of them in
    `WEAK`; otherwise `ValueError` names the algorithm and the config key. ``compression``
    adds zlib@openssh.com to the profile's "none" (`COMPRESSION_ON`).
    """
    try:
        base = PROFILES[profile]
    except KeyError:
        choices = ", ".join(sorted(PROFILES))
        key = CONFIG_KEYS["profile"]
        raise ValueError(f"{key}: unknown profile {profile!r} (one of: {choices})") from None
    strict = profile == "strict"
    lists: dict[str, tuple[str, ...]] = {}
    for field, value in (
        ("kex", kex),
        ("encryption", ciphers),
        ("mac", macs),
        ("signature", host_key_algs),
        ("compression", None),
    ):
        if value:  # None or empty: the profile's list
            lists[field] = _override(field, value, strict)
            continue
        supported = _SUPPORTED[field]()
        wanted = COMPRESSION_ON if field == "compression" and compression else getattr(base, field)
        lists[field] = tuple(a for a in wanted if a in supported)
        if not lists[field]:
            raise ValueError(
                f"profile {profile!r}: asyncssh {asyncssh.__version__} supports none of "
                f"{', '.join(getattr(base, field))} (ML-KEM needs a cryptography build "
                "with ML-KEM, sntrup761 needs liboqs, umac needs libnettle)"
            )
    return Algorithms(**lists)


def restrict_host_keys(keys: Any, host_key_algs: Sequence[str]) -> list[asyncssh.SSHKeyPair]:
    """Load *keys* (anything `asyncssh.load_keypairs` takes) and limit each key
    to the host-key algorithms in *host_key_algs*.  A key left with none
    (e.g. a DSA key, or ECDSA when not allowed) or an RSA key shorter than
    `MIN_RSA_BITS` raises `ValueError`.
    """
    allowed = [a.encode("ascii") for a in host_key_algs]
    result: list[asyncssh.SSHKeyPair] = []
    for keypair in asyncssh.load_keypairs(keys):
        public = decode_ssh_public_key(keypair.key_public_data).pyca_key
        if isinstance(public, rsa.RSAPublicKey) and public.key_size < MIN_RSA_BITS:
            raise ValueError(
                f"{CONFIG_KEYS['host_keys']}: {public.key_size}-bit RSA host key is refused "
                f"as weak (under {MIN_RSA_BITS} bits); use ed25519"
            )
        algs = tuple(a for a in keypair.host_key_algorithms if a in allowed)
        if not algs:
            raise ValueError(
                f"{CONFIG_KEYS['signature']}: host key of type "
                f"{keypair.algorithm.decode('ascii')!r} allows none of "
                f"{', '.join(host_key_algs)}"
            )
        narrowed = copy.copy(keypair)  # leave the caller's object alone
        narrowed.host_key_algorithms = algs
        result.append(narrowed)
    return result


def server_options(
    profile: str = "default",
    *,
    kex: AlgList = None,
    ciphers: AlgList = None,
    macs: AlgList = None,
    host_key_algs: AlgList = None,
    host_keys: Any = None,
    compression: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for `asyncssh.create_server` /
    `asyncssh.SSHServerConnectionOptions`.

    Always contains ``kex_algs``, ``encryption_algs``, ``mac_algs``,
    ``compression_algs`` and ``signature_algs`` (the latter is the
    ``server-sig-algs`` list for user keys, `CLIENT_AUTH_SIGNATURES`).  With
    *host_keys*, it also contains ``server_host_keys``, limited to the
    profile's (or *host_key_algs*') host-key algorithms. ``compression``:
    offer zlib@openssh.com (see `resolve`).
    """
    algs = resolve(profile, kex=kex, ciphers=ciphers, macs=macs, host_key_algs=host_key_algs,
                   compression=compression)
    supported = _SUPPORTED["signature"]()
    options: dict[str, Any] = {
        "kex_algs": list(algs.kex),
        "encryption_algs": list(algs.encryption),
        "mac_algs": list(algs.mac),
        "compression_algs": list(algs.compression),
        "signature_algs": [a for a in CLIENT_AUTH_SIGNATURES if a in supported],
    }
    if host_keys is not None:
        options["server_host_keys"] = restrict_host_keys(host_keys, algs.signature)
    return options


def _measure(payload: int = 32768, mib: int = 64) -> None:
    """Print the per-byte cost of encrypting + verifying/decrypting packets."""
    import os
    import time

    from asyncssh.encryption import get_encryption, get_encryption_params

    cases = [(c, "") for c in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")]
    cases += [(c, m) for c in ("aes128-ctr", "aes256-ctr") for m in _MACS]
    cases += [("chacha20-poly1305@openssh.com", "")]
    for enc, mac in cases:
        e, m = enc.encode(), mac.encode()
        keylen, ivlen, block, mackeylen, _, etm = get_encryption_params(e, m)
        key, iv, mackey = os.urandom(keylen), os.urandom(ivlen), os.urandom(mackeylen)
        pad = 16 - (payload + 5) % 16 + 4  # >= 4 bytes, AEAD/EtM length in clear
        body = bytes([pad]) + os.urandom(payload + pad)
        header = len(body).to_bytes(4, "big")
        count = (mib << 20) // payload
        best = float("inf")
        for _ in range(3):
            tx = get_encryption(e, key, iv, m, mackey, etm)
            rx = get_encryption(e, key, iv, m, mackey, etm)
            start = time.perf_counter()
            for seq in range(count):
                packet, tag = tx.encrypt_packet(seq, header, body)
                first, _ = rx.decrypt_header(seq, packet[: max(block, 16)], 4)
                if rx.decrypt_packet(seq, first, packet[len(first) :], 4, tag) is None:
                    raise AssertionError(f"{enc} {mac}: packet failed to verify")
            best = min(best, time.perf_counter() - start)
        print(f"{enc:30} {mac or '(AEAD)':30} {best / (count * payload) * 1e9:6.2f} ns/B")


if __name__ == "__main__":
    import sys

    _measure(*(int(arg) for arg in sys.argv[1:3]))
