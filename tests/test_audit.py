"""ssh-audit against a live `sshspec serve`: the defaults are audit-clean.

tests/test_algorithms.py audits a bare asyncssh server built with the same
options; this audits what `sshspec serve` really offers, with its generated
ed25519 host key, for both profiles. ssh-audit's own connections (several
per run) are ordinary pre-auth connections to the server: each must end with
SSH_DISCONNECTED and the log must replay against the specs.
"""

from __future__ import annotations

from conftest import LiveServer
from sshspec.adapters.algorithms import resolve
from test_algorithms import PSEUDO_KEX, _audit, _offered, assert_audit_clean
from test_faults import check_all_disconnected, check_log


def _audit_live(live: LiveServer, profile: str) -> None:
    returncode, report = _audit(live.port)
    algs = resolve(profile)
    kex = _offered(report, "kex")
    assert [k for k in kex if k not in PSEUDO_KEX] == list(algs.kex)
    assert set(kex) >= PSEUDO_KEX  # strict kex (Terrapin) and ext-info
    assert _offered(report, "enc") == list(algs.encryption)
    assert _offered(report, "mac") == list(algs.mac)
    assert _offered(report, "key") == ["ssh-ed25519"]
    assert report["banner"]["raw"] == "SSH-2.0-sshspec"
    assert_audit_clean(report, returncode, profile)
    records = live.wait_for(lambda rs: sum(r["code"] == "SSH_CONNECTED" for r in rs)
                            == sum(r["code"] == "SSH_DISCONNECTED" for r in rs) > 0)
    check_all_disconnected(records)
    assert "SSH_AUTH_SUCCESSFUL" not in [r["code"] for r in records]
    check_log(live)


def test_ssh_audit_default_profile(server: LiveServer) -> None:
    """Defaults: no failures; warnings only the post-quantum notes on curve25519."""
    _audit_live(server, "default")


def test_ssh_audit_strict_profile(server_factory) -> None:  # type: ignore[no-untyped-def]
    """ssh.profile: strict: no warnings at all."""
    _audit_live(server_factory({"ssh": {"profile": "strict"}}), "strict")

