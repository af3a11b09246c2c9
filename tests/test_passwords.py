"""Password hashing: scrypt in the `$scrypt$ln=..,r=..,p=..$salt$hash` format.

Each scrypt call costs ~50 ms, so the tests hash as few times as they can.
"""

from __future__ import annotations

import io

import pytest

from sshspec.adapters import passwords
from sshspec.adapters.passwords import (
    DUMMY_HASH,
    hash_password,
    parse_hash,
    read_password_for_hashing,
    verify_password,
)


@pytest.fixture(scope="module")
def hashed() -> str:
    # Non-ASCII, spaces and a trailing space: nothing is normalised or stripped.
    return hash_password("pässwörd with spaces ")


def test_hash_has_documented_format(hashed: str) -> None:
    assert hashed.startswith("$scrypt$ln=14,r=8,p=1$")
    h = parse_hash(hashed)
    assert (h.ln, h.r, h.p, len(h.salt), len(h.key)) == (14, 8, 1, 16, 32)
    assert "=" not in hashed.split("$", 3)[3]  # unpadded base64


def test_verify_right_and_wrong(hashed: str) -> None:
    assert verify_password("pässwörd with spaces ", hashed)
    assert verify_password("pässwörd with spaces ".encode(), hashed)  # str is UTF-8
    assert not verify_password("pässwörd with spaces", hashed)


def test_salt_is_random() -> None:
    assert hash_password(b"x") != hash_password(b"x")


def test_dummy_hash_is_valid_and_uses_default_parameters() -> None:
    h = parse_hash(DUMMY_HASH)
    assert (h.ln, h.r, h.p) == (passwords.LN, passwords.R, passwords.P)
    assert not verify_password("", DUMMY_HASH)


def test_lone_surrogate_does_not_raise() -> None:
    assert not verify_password("\udc80", DUMMY_HASH)


@pytest.mark.parametrize(
    ("encoded", "problem"),
    [
        ("", "not an scrypt hash"),
        ("plaintext", "not an scrypt hash"),
        ("$2b$12$abcdefghijklmnopqrstuv", "not an scrypt hash"),
        ("$scrypt$n=16384,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43, "parameters"),
        ("$scrypt$ln=14,r=8,p=0$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43, "out of range"),
        ("$scrypt$ln=24,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43, "MiB of memory"),
        ("$scrypt$ln=14,r=8,p=1$AAAA!AAAAAAAAAAAAAAAAA$" + "A" * 43, "salt is not"),
        ("$scrypt$ln=14,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAB$" + "A" * 43, "canonical"),
        ("$scrypt$ln=14,r=8,p=1$AAAA$" + "A" * 43, "salt is shorter"),
        ("$scrypt$ln=14,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAA", "hash is not 16 to 64"),
        (DUMMY_HASH + "$", "not an scrypt hash"),
    ],
)
def test_malformed_hash_is_rejected_with_the_problem(encoded: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_hash(encoded)
    with pytest.raises(ValueError, match=problem):
        verify_password("x", encoded)


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_read_password_from_a_pipe_strips_only_the_newline() -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b" secret \xff \r\nsecond line\n"))
    assert read_password_for_hashing(stdin) == b" secret \xff "


def test_read_password_from_a_binary_stream_without_newline() -> None:
    assert read_password_for_hashing(io.BytesIO(b"pw")) == b"pw"


def test_read_password_from_a_text_stream_without_buffer() -> None:
    assert read_password_for_hashing(io.StringIO("pässword\n")) == "pässword".encode()


def test_read_empty_password_is_refused() -> None:
    with pytest.raises(ValueError, match="empty password"):
        read_password_for_hashing(io.BytesIO(b"\n"))


def test_read_password_from_a_tty_prompts_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["pässword", "pässword"])
    prompts: list[str] = []

    def getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(passwords.getpass, "getpass", getpass)
    assert read_password_for_hashing(_FakeTTY()) == "pässword".encode()
    assert len(prompts) == 2


def test_read_password_from_a_tty_refuses_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["one", "two"])
    monkeypatch.setattr(passwords.getpass, "getpass", lambda prompt="": next(answers))
    with pytest.raises(ValueError, match="do not match"):
        read_password_for_hashing(_FakeTTY())


def test_hash_password_cli_refuses_what_ssh_cannot_carry() -> None:
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "sshspec.adapters.cli", "hash-password"],
                          input=b"tab\there\n", capture_output=True)
    assert done.returncode == 2 and b"an SSH client cannot send this password" in done.stderr
    done = subprocess.run([sys.executable, "-m", "sshspec.adapters.cli", "hash-password"],
                          input=b"\xef\xac\x81sh\n", capture_output=True)  # U+FB01 LATIN SMALL LIGATURE FI
    assert done.returncode == 0
    from sshspec.adapters.passwords import verify_password
    encoded = done.stdout.decode().strip()
    assert verify_password("\ufb01sh", encoded) and verify_password("fish", encoded)
