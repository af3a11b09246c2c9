"""OpenSSH user certificates: whether one may log a user in, and if not, why.

Sans-I/O like the rest of `fsm/`: the adapter hands over what the certificate says
(`Certificate`, read by asyncssh, whose decoder has already checked the CA's
signature) and what the config trusts (`CertificatePolicy`); `refusal` answers with
the first reason to refuse it, in the order sshd checks them, or None. The core
turns a refusal into the spec's `certificate_refused` (SSH_AUTH_CERT_REFUSED, the
reason in the record) and an accepted certificate into `auth_ok`.

sshd's semantics (auth2-pubkey.c), with one difference said where it is:
- A CA in `auth.trustedUserCAKeys` (TrustedUserCAKeys) vouches for every user: the
  certificate must list the user's name as a principal, or, if the user has
  `authorizedPrincipals` (AuthorizedPrincipalsFile), one of those names instead.
- A `cert-authority` line in a user's `authorizedKeys` (or in `authorizedKeysFile`,
  which is every user's) vouches for that user: the certificate must list the user's
  name. (sshd's `principals="..."` option on such a line is refused by the config:
  `authorizedPrincipals` with `trustedUserCAKeys` says the same.)
- Unlike sshd, a certificate that lists no principal at all is refused everywhere
  (sshd takes it as valid for any user of an authorized_keys `cert-authority` line):
  a CA that forgot `-n` should not have minted a key to every account.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import ipaddress
import time
from collections.abc import Mapping

import msgspec

# Signature algorithms over SHA-1: `ssh-rsa` (RSA PKCS#1 v1.5 with SHA-1) and DSA.
# OpenSSH refuses them on certificates since 8.2 (CASignatureAlgorithms).
SHA1_SIGNATURES = frozenset({"ssh-rsa", "ssh-dss"})
# OpenSSH's "forever": valid_before 2^64-1.
FOREVER = 2**64 - 1


class CertRefusal(enum.StrEnum):
    """Why a certificate is refused: the first words of the record's reason."""

    unknown_user = "unknown user"
    unknown_ca = "unknown CA"
    sha1 = "SHA-1 signature"
    not_yet_valid = "not yet valid"
    expired = "expired"
    principal = "wrong principal"
    source_address = "source address"


class Certificate(msgspec.Struct, frozen=True):
    """What an OpenSSH user certificate says (asyncssh decoded and verified it)."""

    ca: bytes  # the signing CA's public key blob
    signature_algorithm: str  # of the CA's signature on the certificate
    key_id: str
    serial: int
    principals: tuple[str, ...]
    valid_after: int  # seconds since the epoch, as ssh-keygen -V wrote them
    valid_before: int
    source_addresses: tuple[str, ...] = ()  # the source-address critical option, CIDRs
    force_command: str | None = None  # the force-command critical option
    permit_pty: bool = True  # the permit-pty extension (ssh-keygen sets it unless -O no-pty)
    # the permit-port-forwarding and permit-agent-forwarding extensions (likewise, unless
    # -O no-port-forwarding / -O no-agent-forwarding)
    permit_port_forwarding: bool = True
    permit_agent_forwarding: bool = True


class CertificatePolicy(msgspec.Struct, frozen=True):
    """Which CAs the config trusts, for whom, with which principals."""

    # auth.trustedUserCAKeys: CA key blobs trusted for every user.
    trusted: frozenset[bytes] = frozenset()
    # auth.users[].authorizedPrincipals: a user's names in certificates from `trusted`.
    authorized_principals: Mapping[str, tuple[str, ...]] = {}
    # cert-authority lines: user (None: every user, authorizedKeysFile) -> CA key blobs.
    authorities: Mapping[str | None, frozenset[bytes]] = {}
    # The users a certificate may log in as (the configured ones, as sshd needs an
    # account); None: any name (a webhook's or an application's users are not listed).
    users: frozenset[str] | None = None

    @property
    def empty(self) -> bool:
        return not self.trusted and not self.authorities


def fingerprint(blob: bytes) -> str:
    """A key's fingerprint as `ssh-keygen -l` prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def _when(seconds: int) -> str:
    if seconds >= FOREVER:
        return "forever"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(min(seconds, 253402300799)))


def _names(principals: tuple[str, ...]) -> str:
    return ", ".join(repr(p) for p in principals) if principals else "none"


def describe(cert: Certificate) -> str:
    """Which certificate logged a user in, as sshd's "Accepted publickey" line names it."""
    return f"certificate {cert.key_id!r} serial {cert.serial} signed by CA {fingerprint(cert.ca)}"


def refusal(policy: CertificatePolicy, cert: Certificate, username: str, host: str | None,
            now: float) -> tuple[CertRefusal, str] | None:
    """Why `cert` may not log `username` in from `host` at `now` (wall clock, seconds
    since the epoch), or None if it may. The reason names the certificate (its key id
    and serial, as sshd logs them) and what was wrong."""
    what = f"certificate {cert.key_id!r} serial {cert.serial}"
    if policy.users is not None and username not in policy.users:
        return CertRefusal.unknown_user, f"{CertRefusal.unknown_user}: {what} offered for {username!r}, " \
                                         "who is not in auth.users"
    # The principals the certificate must name one of, over every place that trusts its CA
    # (sshd tries TrustedUserCAKeys, then each authorized_keys line).
    wanted: list[str] = []
    trusted = False
    if any(cert.ca in policy.authorities.get(scope, ()) for scope in (username, None)):
        trusted = True
        wanted.append(username)
    if cert.ca in policy.trusted:
        trusted = True
        wanted += policy.authorized_principals.get(username) or (username,)
    if not trusted:
        return CertRefusal.unknown_ca, f"{CertRefusal.unknown_ca}: {what} is signed by CA " \
                                       f"{fingerprint(cert.ca)}, not trusted for user {username!r}"
    if cert.signature_algorithm in SHA1_SIGNATURES:
        return CertRefusal.sha1, f"{CertRefusal.sha1}: {what} is signed with {cert.signature_algorithm} " \
                                 "(SHA-1): have the CA sign it again with rsa-sha2-512"
    if now < cert.valid_after:
        return CertRefusal.not_yet_valid, f"{CertRefusal.not_yet_valid}: {what} is valid from " \
                                          f"{_when(cert.valid_after)}"
    if now >= cert.valid_before:
        return CertRefusal.expired, f"{CertRefusal.expired}: {what} was valid until " \
                                    f"{_when(cert.valid_before)}"
    if not set(wanted) & set(cert.principals):
        return CertRefusal.principal, f"{CertRefusal.principal}: {what} is for {_names(cert.principals)}, " \
                                      f"user {username!r} needs one of {_names(tuple(dict.fromkeys(wanted)))}"
    if cert.source_addresses and not _from(host, cert.source_addresses):
        return CertRefusal.source_address, f"{CertRefusal.source_address}: {what} may be used from " \
                                           f"{', '.join(cert.source_addresses)}, not from {host or 'here'}"
    return None


def _from(host: str | None, networks: tuple[str, ...]) -> bool:
    if host is None:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for network in networks:
        try:
            if address in ipaddress.ip_network(network, strict=False):
                return True
        except ValueError:
            continue
    return False
