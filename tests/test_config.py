"""Config loading: defaults, a full example, and errors that name the file and the key."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from sshspec.adapters.config import (
    Config,
    ConfigError,
    Duration,
    Listen,
    MaxStartups,
    NetBlockSize,
    config_schema,
    default_config,
    dump_config,
    load_config,
    parse_duration,
    resolve_state_dir,
)
from sshspec.adapters.passwords import DUMMY_HASH

ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIByIgQ4NmxJpWy3jnovTaasbKWF0kTv4K3UMay4yJ8zt"
ED25519_CERT = ("ssh-ed25519-cert-v01@openssh.com "
                "AAAAIHNzaC1lZDI1NTE5LWNlcnQtdjAxQG9wZW5zc2guY29tAAAAIHLxm9lA9xs5N/Jzq9Gr9YbSHpmofhTstM1XLM"
                "rQE0hWAAAAIB3mJRF2lLtjTcDLgxxY/yKCzQq2Reu6WNfI1Tb0/IDAAAAAAAAAAAAAAAABAAAAAXQAAAAFAAAAAWEA"
                "AAAAAAAAAP//////////AAAAAAAAAIIAAAAVcGVybWl0LVgxMS1mb3J3YXJkaW5nAAAAAAAAABdwZXJtaXQtYWdlbn"
                "QtZm9yd2FyZGluZwAAAAAAAAAWcGVybWl0LXBvcnQtZm9yd2FyZGluZwAAAAAAAAAKcGVybWl0LXB0eQAAAAAAAAAO"
                "cGVybWl0LXVzZXItcmMAAAAAAAAAAAAAARcAAAAHc3NoLXJzYQAAAAMBAAEAAAEBAMzPqavMs+782kG9q6f4lWwxbx"
                "zdY3g5u0txTQZodqHbB9ZWxNnQwvKYTZaDH5on+h0TA4eEkfTyQ61AgQWsnhsz2voV0o03nNMZOkyPc3mHL77kru+C"
                "gegtkJqIg7qFhosIUI2gtsNr4eK9ybnl7J2zLvzXyP1i05j9albHqgawC6pxZ0wWMJB55Am8iq9Lz0lAuABcx7FVc4"
                "9gDblT6RCtk/N/vKV7gbXEjE3Tg+Upb5Z/JY7jFGMRY7CMDBytfxjYRwdfZSoJ9kbVIDiSztfBw5rdOPfZUSe73exw"
                "+TIGGWzHRtjK1kKMeKHf2eXD3FnVnuizcgdxV1esOyH4t2EAAAEUAAAADHJzYS1zaGEyLTUxMgAAAQB18I+/7zijuD"
                "R3selKBdCP6G9W3nznLDzXZ7dSd6oAU6weesB1fcvFqGQdBowdZpiq+rpV3nNFd+LRWoW7a4uu2hUQiHibiYU+eg+/"
                "40UKw6HmXsnL+VWX5XD/uZXGc2hDvLFy5I7A8LJNcSZO0Os5iV3+6n0YOK+U5jfr5Q0lCjcCDSdZC0+6GJ90YTBulk"
                "2JiY/zBBR86Zic/2Yy+EX1WkK21eoGvqNEBjxhUtsFpht3e0gtzP7jffhggtbD618pf2eGzwDlgmr7P/pX8SCcgbL7"
                "GuIxpU2cpT5oYc8sArnsW5hM/6YCl1vi3fVqsjuLGz1RILwVS93amTeMarPI")
ED25519_2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC0Kv5gqu1FcWAJ5jJ98yqw549eBS1/rrOGXkQAq0Owd"

FULL = f"""\
ssh:
  listen: "[::1]:2200"
  hostkeys: [/etc/sshspec/ssh_host_ed25519_key, /etc/sshspec/ssh_host_rsa_key]
  serverVersion: SSH-2.0-sshspec_1.0 test build
  banner: "Authorised use only\\n"
  ciphers: [chacha20-poly1305@openssh.com, aes256-gcm@openssh.com]
  kex: [mlkem768x25519-sha256]  # strict takes post-quantum hybrids only (checked at load)
  macs: [hmac-sha2-256-etm@openssh.com]
  hostKeyAlgorithms: [ssh-ed25519]
  profile: strict
  compression: true
  clientAliveInterval: 1m30s
  clientAliveCountMax: 5
  proxyProtocol:
    enabled: true
    trustedNetworks: [10.0.0.0/8, 192.0.2.7, "2001:db8::/32"]
    headerTimeout: 3s
auth:
  users:
    - username: alice
      passwordHash: "{DUMMY_HASH}"
      authorizedKeys: ["{ED25519} alice@laptop", "{ED25519_2}"]
    - username: bob
      authorizedKeys: ["{ED25519}"]
  authorizedKeysFile: /etc/sshspec/authorized_keys  # not read at load when absent (as host keys)
  failureDelay: 4s
limits:
  loginTimeout: 30s
  maxAuthTries: 3
  maxSessions: 4
  maxStartups: 20
  perSourceMaxStartups: 3
  perSourceNetBlockSize: "24:48"
  perSourcePenalties:
    authfail: 30s
    exempt: [192.0.2.7, "2001:db8::/32"]
  maxEnv: 0
  maxQueuedRequests: 8
  shutdownTimeout: 500ms
  maxBufferedPerConnection: 1MiB
  maxBufferedTotal: 64000000
backend:
  type: local
  envDeny: [LD_*, DYLD_*, PYTHON*]
log:
  level: warning
  format: text
  file: /var/log/sshspec.jsonl
  flushInterval: 250ms
  durable: false
stateDir: /var/lib/sshspec
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")  # always names the file
    return message.removeprefix(f"{path}: ")


def test_defaults() -> None:
    config = load_config(None)
    assert config == default_config() == Config()
    assert config.ssh.listen == ("127.0.0.1", 2222)  # loopback unless configured otherwise
    assert config.ssh.hostkeys == () and config.ssh.profile == "default"
    assert config.ssh.server_version == "SSH-2.0-sshspec"
    assert config.ssh.client_alive_interval == 0 and config.ssh.client_alive_count_max == 3
    assert config.auth.users == () and config.auth.authorized_keys_file == ""
    limits = config.limits
    assert (limits.login_timeout, limits.shutdown_timeout) == (120.0, 10.0)
    assert (limits.max_auth_tries, limits.max_sessions) == (6, 10)
    # OpenSSH's MaxStartups and PerSourcePenalties defaults; a per-source limit below start
    assert limits.max_startups == MaxStartups(10, 30, 100) and limits.per_source_max_startups == 5
    assert limits.per_source_net_block_size == NetBlockSize(32, 64)
    penalties = limits.per_source_penalties
    assert penalties.enabled
    assert (penalties.authfail, penalties.noauth, penalties.grace_exceeded) == (5, 1, 10)
    assert (penalties.protocol_error, penalties.min, penalties.max) == (5, 15, 600)
    assert (penalties.max_sources, penalties.overflow, penalties.exempt) == (65536, "permissive", ())
    assert config.auth.failure_delay == 2.0
    assert (limits.max_env, limits.max_queued_requests) == (64, 16)
    assert config.backend.env_deny == ("LD_*", "DYLD_*")
    assert (config.log.level, config.log.format, config.log.file) == ("debug", "json", "")
    assert config.log.flush_interval == 0.1
    assert config.state_dir == ""


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file_is_the_defaults(tmp_path: Path, text: str) -> None:
    assert load_config(_write(tmp_path, text)) == default_config()


def test_full_example(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, FULL))
    assert config.ssh.listen == Listen("::1", 2200)
    assert (config.ssh.listen.host, config.ssh.listen.port) == ("::1", 2200)
    assert config.ssh.hostkeys[1] == "/etc/sshspec/ssh_host_rsa_key"
    assert config.ssh.server_version == "SSH-2.0-sshspec_1.0 test build"
    assert config.ssh.banner == "Authorised use only\n"
    assert config.ssh.ciphers == ("chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com")
    assert config.ssh.host_key_algorithms == ("ssh-ed25519",)
    assert config.ssh.profile == "strict"
    assert config.ssh.compression is True
    assert config.ssh.client_alive_interval == 90.0
    assert isinstance(config.ssh.client_alive_interval, Duration)
    proxy = config.ssh.proxy_protocol
    assert proxy.enabled and proxy.header_timeout == 3.0
    assert proxy.trusted_networks == ("10.0.0.0/8", "192.0.2.7", "2001:db8::/32")
    alice, bob = config.auth.users
    assert alice.username == "alice" and alice.password_hash == DUMMY_HASH
    assert len(alice.authorized_keys) == 2
    assert bob.password_hash is None
    assert config.auth.authorized_keys_file == "/etc/sshspec/authorized_keys"
    assert config.limits == msgspec.structs.replace(
        config.limits,
        login_timeout=30.0,
        max_auth_tries=3,
        max_sessions=4,
        max_startups=MaxStartups(20, 100, 20),
        per_source_max_startups=3,
        per_source_net_block_size=NetBlockSize(24, 48),
        per_source_penalties=msgspec.structs.replace(default_config().limits.per_source_penalties,
                                                     authfail=30.0, exempt=("192.0.2.7/32", "2001:db8::/32")),
        max_env=0,
        max_queued_requests=8,
        shutdown_timeout=0.5,
        max_buffered_per_connection=1 << 20,
        max_buffered_total=64_000_000,
    )
    assert config.limits.shutdown_timeout == 0.5
    assert config.backend.env_deny == ("LD_*", "DYLD_*", "PYTHON*")
    assert (config.log.level, config.log.format, config.log.flush_interval) == ("warning", "text", 0.25)
    assert config.log.durable is False
    assert config.state_dir == "/var/lib/sshspec"
    assert config.auth.failure_delay == 4.0
    # The example sets every key away from its default, so it tests every field.
    for section in ("ssh", "limits", "log"):
        changed = getattr(config, section)
        default = getattr(default_config(), section)
        for field in changed.__struct_fields__:
            assert getattr(changed, field) != getattr(default, field), f"{section}.{field}"


def test_full_example_round_trips(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, FULL))
    dumped = tmp_path / "dumped.yaml"
    dumped.write_bytes(dump_config(config))
    assert load_config(dumped) == config


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        default_config().limits.max_sessions = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ssh: {lisen: 127.0.0.1:22}", "ssh.lisen: unknown key (did you mean `listen`?)"),
        ("sshd: {}", "sshd: unknown key (did you mean `ssh`?)"),
        ("zzz: 1", "zzz: unknown key (known keys: ssh, auth, limits, backend, forwarding, log, configserver, "
                   "metrics, health, docker, stateDir)"),
        ("state_dir: /x", "state_dir: unknown key (did you mean `stateDir`?)"),
        (
            "auth: {users: [{username: a, authorizedKeys: [], password: x}]}",
            "auth.users[0].password: unknown key (did you mean `passwordHash`?)",
        ),
    ],
)
def test_unknown_key_names_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    assert _error(tmp_path, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("limits: {maxAuthTries: 0}", "limits.maxAuthTries: Expected `int` >= 1"),
        ("limits: {maxSessions: 0}", "limits.maxSessions: Expected `int` >= 1"),
        ("limits: {maxStartups: -1}", "limits.maxStartups: Expected `start:rate:full` or an int >= 1"),
        ("limits: {maxStartups: '10:30'}", "limits.maxStartups: Invalid maxStartups `10:30`: expected"),
        ("limits: {maxStartups: '10:101:100'}", "limits.maxStartups: Invalid maxStartups `10:101:100`: rate"),
        ("limits: {maxStartups: '11:30:10'}", "limits.maxStartups: Invalid maxStartups `11:30:10`: expected "
                                              "start <= full"),
        ("limits: {maxStartups: 10:30:50}", "limits.maxStartups: YAML reads an unquoted `10:30:50` as a "
                                            "base-60 number: quote it"),
        ("limits: {perSourceMaxStartups: -1}", "limits.perSourceMaxStartups: Expected `int` >= 0"),
        ("limits: {perSourceNetBlockSize: 24:56}", "limits.perSourceNetBlockSize: YAML reads an unquoted"),
        ("limits: {perSourceNetBlockSize: '33:64'}", "limits.perSourceNetBlockSize: Invalid perSource"),
        ("limits: {perSourceNetBlockSize: 'a:b'}", "limits.perSourceNetBlockSize: Invalid perSource"),
        ("limits: {perSourcePenalties: {exempt: [10.0.0.1/8]}}",
         "limits.perSourcePenalties.exempt[0]: Invalid network `10.0.0.1/8`: 10.0.0.1/8 has host bits set"),
        ("limits: {perSourcePenalties: {exempt: [nowhere]}}", "limits.perSourcePenalties.exempt[0]: Invalid"),
        ("limits: {perSourcePenalties: {overflow: deny}}", "limits.perSourcePenalties.overflow: Invalid"),
        ("limits: {perSourcePenalties: {max: 15s}}", "limits.perSourcePenalties.max: must be greater"),
        ("limits: {perSourcePenalties: {mix: 1s}}", "limits.perSourcePenalties.mix: unknown key (did you "
                                                    "mean `min`?)"),
        ("auth: {failureDelay: -1s}", "auth.failureDelay: Invalid duration `-1s`"),
        ("limits: {maxEnv: -1}", "limits.maxEnv: Expected `int` >= 0"),
        ("limits: {maxQueuedRequests: 0}", "limits.maxQueuedRequests: Expected `int` >= 1"),
        ("ssh: {clientAliveCountMax: 0}", "ssh.clientAliveCountMax: Expected `int` >= 1"),
        ("limits: {maxAuthTries: '6'}", "limits.maxAuthTries: Expected `int`, got `str`"),
        ("limits: {maxAuthTries: true}", "limits.maxAuthTries: Expected `int`, got `bool`"),
        ("limits: 6", "limits: Expected `object`, got `int`"),
        ("ssh: {hostkeys: key.pem}", "ssh.hostkeys: Expected `array`, got `str`"),
        ("ssh: {ciphers: [aes128-ctr, 3]}", "ssh.ciphers[1]: Expected `str`, got `int`"),
        ("log: {level: trace}", "log.level: Invalid enum value 'trace'; expected one of: "),
        ("ssh: {profile: lax}", "ssh.profile: Invalid enum value 'lax'; expected one of: "),
        ("backend: {type: kubernetes}", "backend.type: Invalid enum value 'kubernetes'"),
        ("backend: {type: docker}", "docker.image: required with backend.type docker"),
        ("docker: {imag: x}", "docker.imag: unknown key (did you mean `image`?)"),
        ("docker: {pull: sometimes}", "docker.pull: Invalid enum value 'sometimes'"),
        ("docker: {mode: pod}", "docker.mode: Invalid enum value 'pod'"),
        ("docker: {memory: lots}", "docker.memory: `lots` is not a size like `512m`"),
        ("docker: {cpus: -1}", "docker.cpus: Expected `float` >= 0"),
        ("docker: {pids: -1}", "docker.pids: Expected `int` >= 0"),
        ("docker: {maxContainers: 0}", "docker.maxContainers: Expected `int` >= 1"),
        ("docker: {mounts: [{target: data, source: /x}]}", "docker.mounts[0].target: must be an absolute"),
        ("docker: {mounts: [{target: /d}]}", "docker.mounts[0].source: a bind mount's source is an absolute"),
        ("docker: {mounts: [{target: /d, type: nfs}]}", "docker.mounts[0].type: Invalid enum value 'nfs'"),
        ("docker: {labels: {io.sshspec.host: x}}", "docker.labels.io.sshspec.host: labels io.sshspec.* are"),
        ("docker: {host: 'ftp://x'}", "docker.host: `ftp://x`: expected unix:///path or tcp://host:port"),
        ("docker: {host: 'unix:///x', tls: {ca: a, cert: b, key: c}}", "docker.tls: TLS client certificates"),
        ("docker: {timeouts: {stop: soon}}", "docker.timeouts.stop: Invalid duration `soon`"),
        ("docker: {idleCommand: []}", "docker.idleCommand: must name a program"),
        ("docker: {agent: {pth: /x}}", "docker.agent.pth: unknown key (did you mean `path`?)"),
        ("docker: {agent: /usr/bin/sshspec-agent}", "docker.agent: Expected `object | null`, got `str`"),
        ("docker: {agent: {path: sshspec-agent}}", "docker.agent.path: must be an absolute path"),
        ("docker: {agent: {source: opt/agent}}", "docker.agent.source: must be an absolute path"),
        ("docker: {agent: {statusDir: tmp}}", "docker.agent.statusDir: must be an absolute path"),
        ("docker: {agent: {statusDir: ''}}", "docker.agent.statusDir: Expected `str` of length >= 1"),
        ("log: {format: xml}", "log.format: Invalid enum value 'xml'"),
        ("ssh: {serverVersion: OpenSSH_9.6}", "ssh.serverVersion: Expected `SSH-2.0-"),
        ("ssh: {ciphers: ['aes128-ctr,aes256-ctr']}", "ssh.ciphers[0]: Expected an algorithm"),
        ("ssh: {1: x}", "ssh: keys must be strings"),
        ("[1, 2]", "Expected `object`, got `array` at the top level"),
        ("auth: {users: [{username: ''}]}", "auth.users[0].username: Expected `str` of length"),
        ("auth: {users: [{authorizedKeys: []}]}", "auth.users[0].username: required key is missing"),
    ],
)
def test_wrong_value_names_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    assert _error(tmp_path, text).startswith(expected)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("'0'", 0.0),
        ("120", 120.0),
        ("1.5", 1.5),
        ("120s", 120.0),
        ("2m", 120.0),
        ("500ms", 0.5),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("0.25s", 0.25),
    ],
)
def test_durations(tmp_path: Path, text: str, seconds: float) -> None:
    config = load_config(_write(tmp_path, f"limits: {{shutdownTimeout: {text}}}"))
    assert config.limits.shutdown_timeout == seconds


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("2x", "Invalid duration `2x`"),
        ("-1s", "Invalid duration `-1s`"),
        ("-5", "must be a finite number of seconds >= 0"),
        (".inf", "must be a finite number of seconds >= 0"),
        ("1" + "0" * 400, "must be a finite number of seconds >= 0"),
        ("1" + "0" * 400 + "s", "must be a finite number of seconds >= 0"),
        ("1 m", "Invalid duration `1 m`"),
        ("s", "Invalid duration `s`"),
        ("''", "Invalid duration ``"),
        ("yes", "got `bool`"),
        ("null", "got `NoneType`"),
        ("[1]", "got `list`"),
    ],
)
def test_bad_duration(tmp_path: Path, text: str, problem: str) -> None:
    message = _error(tmp_path, f"limits: {{shutdownTimeout: {text}}}")
    assert message.startswith("limits.shutdownTimeout: ")
    assert problem in message


def test_login_timeout_must_be_positive(tmp_path: Path) -> None:
    message = _error(tmp_path, "limits: {loginTimeout: 0s}")
    assert message == "limits.loginTimeout: must be greater than 0"


@given(st.integers(min_value=0, max_value=10**9))
def test_duration_units(n: int) -> None:
    assert parse_duration(f"{n}s") == n
    assert parse_duration(f"{n}m") == n * 60
    assert parse_duration(f"{n}h") == n * 3600
    assert parse_duration(f"{n}ms") == pytest.approx(n / 1000)
    assert parse_duration(n) == n


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:2222", ("127.0.0.1", 2222)),
        ("0.0.0.0:22", ("0.0.0.0", 22)),
        ("localhost:0", ("localhost", 0)),
        ("ssh.example.org:65535", ("ssh.example.org", 65535)),
        ("'[::1]:2222'", ("::1", 2222)),
        ("'[::]:22'", ("::", 22)),
        ("'[fe80::1%eth0]:22'", ("fe80::1%eth0", 22)),
    ],
)
def test_listen(tmp_path: Path, text: str, expected: tuple[str, int]) -> None:
    listen = load_config(_write(tmp_path, f"ssh: {{listen: {text}}}")).ssh.listen
    assert listen == expected
    host, port = listen
    assert (listen.host, listen.port) == (host, port)
    assert load_config(_write(tmp_path, f"ssh: {{listen: '{listen}'}}")).ssh.listen == listen


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("127.0.0.1", "expected `host:port`"),
        ("':2222'", "expected `host:port`"),
        ("127.0.0.1:65536", "port must be 0..65535"),
        ("127.0.0.1:-1", "port must be 0..65535"),
        ("127.0.0.1:ssh", "port must be 0..65535"),
        ("'127.0.0.1:'", "port must be 0..65535"),
        ("'::1:2222'", "write IPv6 in brackets"),
        ("'[::1]'", "expected `[IPv6]:port`"),
        ("'[127.0.0.1]:22'", "is not IPv6"),
        ("'bad host:22'", "is not a host name"),
        ("22:22", "Expected `host:port` as a string, got `int`"),  # YAML 1.1 sexagesimal
        ("[127.0.0.1, 22]", "got `list`"),
    ],
)
def test_bad_listen(tmp_path: Path, text: str, problem: str) -> None:
    message = _error(tmp_path, f"ssh: {{listen: {text}}}")
    assert message.startswith("ssh.listen: ")
    assert problem in message


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    message = _error(tmp_path, "ssh:\n  listen: 127.0.0.1:22\n  banner: [unclosed\nlog: {}\n")
    assert message.startswith("line 4, column ")


def test_yaml_bad_indentation_names_the_line(tmp_path: Path) -> None:
    message = _error(tmp_path, "ssh:\n  listen: 127.0.0.1:22\n profile: strict\n")
    assert message.startswith("line 3, column ")


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    message = _error(tmp_path, "limits:\n  maxSessions: 1\nssh: {}\nlimits:\n  maxEnv: 1\n")
    assert message == "limits: duplicate key `limits` (at line 4, column 1; first at line 1, column 1)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # block style, nested
        ("limits:\n  maxSessions: 1\n  maxEnv: 2\n  maxSessions: 3\n",
         "limits.maxSessions: duplicate key `maxSessions` (at line 4, column 3; first at line 2, column 3)"),
        # flow style, in a list item
        (f"auth: {{users: [{{username: a, authorizedKeys: ['{ED25519}'], username: b}}]}}",
         "auth.users[0].username: duplicate key `username` (at line 1, column "),
        # block style, in a list item; a quoted key is the same key
        (f"auth:\n  users:\n    - username: a\n    - username: b\n      authorizedKeys: ['{ED25519}']\n"
         "      'username': c\n",
         "auth.users[1].username: duplicate key `username` (at line 6, column 7; first at line 4, column 7)"),
    ],
)
def test_duplicate_key_names_its_path(tmp_path: Path, text: str, message: str) -> None:
    assert _error(tmp_path, text).startswith(message)


def test_same_key_in_different_mappings_is_not_a_duplicate(tmp_path: Path) -> None:
    key = f"authorizedKeys: ['{ED25519}']"
    text = f"auth: {{users: [{{username: a, {key}}}, {{username: b, {key}}}]}}"
    config = load_config(_write(tmp_path, text))
    assert [u.username for u in config.auth.users] == ["a", "b"]


def test_out_of_range_date_names_the_line(tmp_path: Path) -> None:
    # YAML 1.1 reads an unquoted 2024-02-30 as a date; PyYAML raises ValueError without a mark.
    message = _error(tmp_path, "ssh: {}\nstateDir: 2024-02-30\n")
    assert message == (
        "line 2, column 11: cannot read '2024-02-30' as timestamp: day is out of range for month"
    )


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=f"^{path}: cannot read: No such file"):
        load_config(path)


@pytest.mark.parametrize(
    ("passwordHash", "problem"),
    [
        ("secret", "not an scrypt hash"),
        (DUMMY_HASH[:-4], "not canonical"),
        (DUMMY_HASH.replace("ln=14", "ln=99"), "parameters"),
    ],
)
def test_invalid_password_hash_names_the_user(tmp_path: Path, passwordHash: str, problem: str) -> None:
    text = f'auth: {{users: [{{username: a, passwordHash: "{DUMMY_HASH}"}},'
    text += f' {{username: b, passwordHash: "{passwordHash}"}}]}}'
    message = _error(tmp_path, text)
    assert message.startswith("auth.users[1].passwordHash: ")
    assert problem in message
    assert passwordHash not in message  # the hash itself is not echoed


@pytest.mark.parametrize(
    "key",
    ["ssh-ed25519 AAAA", "ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5", "", "# c", f"{ED25519}\n{ED25519}"],
)
def test_invalid_authorized_key_names_the_entry(tmp_path: Path, key: str) -> None:
    text = f"auth: {{users: [{{username: a, authorizedKeys: [{ED25519!r}, {key!r}]}}]}}"
    message = _error(tmp_path, text)
    assert message.startswith("auth.users[0].authorizedKeys[1]: not an authorized_keys line")


@pytest.mark.parametrize(("line", "problem"), [
    ("cert-authority ssh-ed25519 AAAA", "`cert-authority` line: not a public key"),
    (f"cert-authority {ED25519_CERT}", "`cert-authority` line: a certificate is not a CA key"),
    (f'cert-authority,principals="alice" {ED25519}', "options on a `cert-authority` line are not supported"),
    (f'restrict,command="true" {ED25519}', "options (`restrict` ...) are not supported: sshspec would "
                                             "not enforce them"),
    (f'from="10.0.0.0/8" {ED25519}', "options (`from` ...) are not supported"),
    (f"no-pty {ED25519} alice@laptop", "options (`no-pty` ...) are not supported"),
])
def test_authorized_keys_options_and_cert_authority_are_refused(tmp_path: Path, line: str,
                                                                problem: str) -> None:
    """They crashed start-up with a KeyImportError traceback (exit 1, nothing named); an
    option sshspec does not enforce must not pass as a plain key either."""
    message = _error(tmp_path, f"auth: {{users: [{{username: a, authorizedKeys: [{ED25519!r}, {line!r}]}}]}}")
    assert message.startswith(f"auth.users[0].authorizedKeys[1]: {problem}"), message
    keys = tmp_path / "authorized_keys"
    keys.write_text(f"# alice\n{ED25519} alice@laptop\n\n{line}\n")
    message = _error(tmp_path, f"auth: {{authorizedKeysFile: {keys}}}")
    assert message.startswith(f"auth.authorizedKeysFile: `{keys}` line 4: {problem}"), message
    keys.write_text(f"# alice\n{ED25519} alice@laptop\n")
    assert load_config(_write(tmp_path, f"auth: {{authorizedKeysFile: {keys}}}")).auth.authorized_keys_file


def test_duplicate_username(tmp_path: Path) -> None:
    key = f"authorizedKeys: ['{ED25519}']"
    message = _error(tmp_path, f"auth: {{users: [{{username: a, {key}}}, {{username: a, {key}}}]}}")
    assert message == "auth.users[1].username: duplicate of auth.users[0].username `a`"


def test_user_without_credentials(tmp_path: Path) -> None:
    message = _error(tmp_path, "auth: {users: [{username: a}]}")
    assert message == ("auth.users[0]: user has neither passwordHash nor authorizedKeys "
                       "(nor a CA in auth.trustedUserCAKeys)")


def test_schema_describes_the_same_keys_as_the_loader() -> None:
    schema = config_schema()
    defs = schema["$defs"]
    assert all(d["additionalProperties"] is False for d in defs.values())
    dumped = msgspec.yaml.decode(dump_config(default_config()))
    assert list(defs["Config"]["properties"]) == list(dumped)
    for section in ("ssh", "auth", "limits", "backend", "log"):
        name = defs["Config"]["properties"][section]["$ref"].rsplit("/", 1)[1]
        assert list(defs[name]["properties"]) == list(dumped[section]), section
    assert defs["LimitsConfig"]["properties"]["maxAuthTries"]["minimum"] == 1
    assert defs["LimitsConfig"]["properties"]["loginTimeout"]["anyOf"]
    assert b"envDeny" in msgspec.json.encode(schema)


def test_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", "/xdg/state")
    assert resolve_state_dir(default_config()) == Path("/xdg/state/sshspec")
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    assert resolve_state_dir(default_config()) == tmp_path / ".local/state/sshspec"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert resolve_state_dir(default_config()) == tmp_path / ".local/state/sshspec"
    explicit = Config(state_dir="~/sshspec-state")
    assert resolve_state_dir(explicit) == tmp_path / "sshspec-state"


def test_the_spec_limits_are_declared_once_in_the_specs(tmp_path: Path) -> None:
    """Each limit of specs/*.yaml is a config key of the same name whose default is the
    spec's, and a configured value is what the compiled machines guard with."""
    from sshspec.adapters.config import SPEC_LIMITS, default_config, load_config, spec_limits
    from sshspec.adapters.server import machines
    from sshspec.fsm.spec import BUNDLED, load_spec
    declared = {name: limit.default for spec in BUNDLED
                for name, limit in load_spec(spec).spec.limits.items()}
    assert declared == SPEC_LIMITS
    assert spec_limits(default_config()) == declared
    path = tmp_path / "c.yaml"
    path.write_text("limits:\n  maxAuthTries: 2\n  maxEnv: 5\nssh:\n  clientAliveCountMax: 7\n")
    compiled = machines(load_config(path))
    assert compiled.connection.limits == {**{n: declared[n] for n in compiled.connection.limits},
                                          "maxAuthTries": 2, "clientAliveCountMax": 7}
    assert compiled.session.limits == {"maxEnv": 5}


def test_a_host_key_others_can_read_is_refused_like_sshd(tmp_path: Path) -> None:
    from sshspec.adapters.config import ConfigError, load_config
    key = tmp_path / "host_key"
    key.write_text("not checked here\n")
    path = tmp_path / "c.yaml"
    path.write_text(f"ssh:\n  hostkeys: [{key}]\n")
    key.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: ssh.hostkeys[0]: `{key}` is accessible by group or others "
                               "(mode 0644); sshd refuses such a key: chmod 600 it")
    key.chmod(0o600)
    assert load_config(path).ssh.hostkeys == (str(key),)


def test_a_password_hash_weaker_than_sshspecs_is_refused(tmp_path: Path) -> None:
    from sshspec.adapters.config import ConfigError, load_config
    from sshspec.adapters.passwords import hash_password
    weak = hash_password("pw").replace("ln=14", "ln=10")  # parses; only its cost is low
    path = tmp_path / "c.yaml"
    path.write_text(f"auth:\n  users:\n    - {{username: alice, passwordHash: '{weak}'}}\n")
    with pytest.raises(ConfigError, match=r"auth\.users\[0\]\.passwordHash: ln=10,r=8 is weaker than "
                                          r"sshspec's ln=14,r=8: hash it again with `sshspec hash-password`"):
        load_config(path)
    path.write_text(f"auth:\n  users:\n    - {{username: alice, passwordHash: '{hash_password('pw')}'}}\n")
    assert load_config(path).auth.users[0].username == "alice"


def test_a_weak_algorithm_is_a_config_error(tmp_path: Path) -> None:
    """Refused at load, exit 2 from `sshspec serve` like every config error (it was a
    failed start, exit 1)."""
    import subprocess
    import sys
    path = tmp_path / "c.yaml"
    path.write_text("ssh:\n  ciphers: [aes128-ctr, 3des-cbc]\n")
    done = subprocess.run([sys.executable, "-m", "sshspec.adapters.cli", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == (f"sshspec serve: {path}: ssh.ciphers: '3des-cbc' is refused as weak: "
                           "64-bit block cipher (Sweet32)\n")


@pytest.mark.parametrize(("text", "size"), [("64KiB", 65536), ("8MiB", 8 << 20), ("1GiB", 1 << 30),
                                            ("100kB", 100_000), ("2MB", 2_000_000), ("70000", 70000),
                                            ("65536B", 65536)])
def test_byte_sizes(tmp_path: Path, text: str, size: int) -> None:
    config = load_config(_write(tmp_path, f"limits:\n  maxBufferedPerConnection: {text}\n"))
    assert config.limits.max_buffered_per_connection == size


@pytest.mark.parametrize(("text", "problem"), [("8 MB/s", "Invalid size"), ("-5", "Invalid size"),
                                               ("1KiB", "must be at least 64KiB"), ("true", "Invalid size")])
def test_bad_byte_sizes_name_the_key(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, f"limits:\n  maxBufferedTotal: {text}\n"))
    assert "limits.maxBufferedTotal" in str(caught.value) and problem in str(caught.value), str(caught.value)


def _serve(tmp_path: Path, config: Path, **env: str) -> Any:
    import os
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "sshspec.adapters.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, **env})


# (what is wrong, the config text ({tmp}: the test's directory), the key the message names)
REFUSALS = [
    ("unknown key", "ssh: {lisen: '127.0.0.1:0'}", "ssh.lisen: unknown key (did you mean `listen`?)"),
    ("wrong type", "limits: {maxAuthTries: many}", "limits.maxAuthTries: Expected `int`"),
    ("impossible value", "limits: {loginTimeout: 0}", "limits.loginTimeout: must be greater than 0"),
    ("bad listen", "ssh: {listen: 'localhost'}", "ssh.listen: Invalid listen address"),
    ("weak cipher", "ssh: {ciphers: [aes128-ctr, 3des-cbc]}", "ssh.ciphers: '3des-cbc' is refused as weak"),
    ("strict profile", "ssh: {profile: strict, kex: [curve25519-sha256]}", "ssh.kex: 'curve25519-sha256'"),
    ("duplicate key", "ssh: {listen: '127.0.0.1:0'}\nssh: {}", "ssh: duplicate key `ssh`"),
    ("yaml syntax", "ssh: [", "line 2, column 1: did not find expected node content"),
    ("host key mode", "ssh: {hostkeys: ['{tmp}/host_key']}",
     "ssh.hostkeys[0]: `{tmp}/host_key` is accessible"),
    ("weak password hash", "auth: {users: [{username: a, passwordHash: '{weak}'}]}",
     "auth.users[0].passwordHash: ln=10,r=8 is weaker"),
    ("cert-authority", f"auth: {{users: [{{username: a, authorizedKeys: ['cert-authority,from=\"::1\" "
                       f"{ED25519}']}}]}}",
     "auth.users[0].authorizedKeys[0]: options on a `cert-authority` line are not supported"),
    ("options", f"auth: {{users: [{{username: a, authorizedKeys: ['command=\"ls\" {ED25519}']}}]}}",
     "auth.users[0].authorizedKeys[0]: options (`command` ...) are not supported"),
    ("cert-authority in a file", "auth: {authorizedKeysFile: '{tmp}/authorized_keys'}",
     "auth.authorizedKeysFile: `{tmp}/authorized_keys` line 2: options on a `cert-authority` line"),
    ("trustedUserCAKeys", "auth: {trustedUserCAKeys: ['{tmp}/authorized_keys']}",
     "auth.trustedUserCAKeys[0]: `{tmp}/authorized_keys` line 2: not a public key"),
]


@pytest.mark.parametrize(("what", "text", "expected"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_every_config_refusal_exits_2_naming_file_and_key(tmp_path: Path, what: str, text: str,
                                                         expected: str) -> None:
    """Through the real CLI: exit status 2 and one line naming the file and the key,
    nothing bound, no traceback (a cert-authority line was a KeyImportError traceback,
    exit 1)."""
    from sshspec.adapters.passwords import hash_password
    (tmp_path / "host_key").write_text("never read\n")
    (tmp_path / "host_key").chmod(0o644)
    (tmp_path / "authorized_keys").write_text(f"{ED25519} ok\n"
                                              f"cert-authority,principals=\"x\" {ED25519} a CA\n")
    fill = {"{tmp}": str(tmp_path), "{weak}": hash_password("pw").replace("ln=14", "ln=10")}
    for mark, value in fill.items():
        text, expected = text.replace(mark, value), expected.replace(mark, value)
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    done = _serve(tmp_path, path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"sshspec serve: {path}: {expected}"), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    missing = _serve(tmp_path, tmp_path / "absent.yaml")
    assert (missing.returncode, missing.stderr) == (
        2, f"sshspec serve: {tmp_path / 'absent.yaml'}: cannot read: No such file or directory\n")


def test_an_unreadable_authorized_keys_file_is_a_failed_start(tmp_path: Path) -> None:
    """Like a host key that cannot be read (a config may be checked on another machine):
    SSH_START_FAILED naming the file, exit 1, no traceback."""
    log = tmp_path / "log.jsonl"
    path = tmp_path / "c.yaml"
    path.write_text(f"ssh: {{listen: '127.0.0.1:0'}}\nstateDir: {tmp_path}/state\n"
                    f"auth: {{authorizedKeysFile: {tmp_path}/nope}}\n"
                    f"log: {{file: {log}, flushInterval: 0}}\n")
    done = _serve(tmp_path, path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    why = f"auth.authorizedKeysFile: cannot read `{tmp_path}/nope`: No such file or directory"
    assert done.stderr.endswith(f"sshspec serve: cannot start on 127.0.0.1:0: {why}\n"), done.stderr
    assert '"code":"SSH_START_FAILED"' in log.read_text() and why in log.read_text()


def test_the_implicit_authorized_keys_file_skips_what_it_cannot_use(tmp_path: Path) -> None:
    """With no users configured the current user's ~/.ssh/authorized_keys is read (the
    user did not name it in a config): lines with options or cert-authority are left
    out, each said on stderr, and the server starts."""
    import signal
    import subprocess
    import sys
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "authorized_keys").write_text(
        f"{ED25519} plain\nrestrict {ED25519_2}\ncert-authority,principals=\"x\" {ED25519_2}\n")
    path = tmp_path / "c.yaml"
    path.write_text(f"ssh: {{listen: '127.0.0.1:0'}}\nstateDir: {tmp_path}/state\n"
                    f"log: {{file: {tmp_path}/log.jsonl}}\n")
    import os
    process = subprocess.Popen([sys.executable, "-m", "sshspec.adapters.cli", "serve", "--config", str(path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HOME": str(tmp_path)})
    lines = []
    try:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if line.startswith("sshspec: listening on"):
                break
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0, lines
    keys = f"{tmp_path}/.ssh/authorized_keys"
    skipped = [line for line in lines if " skipped: " in line]
    assert skipped == [f"sshspec: {keys} line 2 skipped: options (`restrict` ...) are not supported: "
                       "sshspec would not enforce them, so the key would be allowed more than the line "
                       "says; list the key without options\n",
                       f"sshspec: {keys} line 3 skipped: options on a `cert-authority` line are not "
                       "supported: write `cert-authority <CA key>`; for other principals than the user name "
                       "use auth.trustedUserCAKeys with auth.users[].authorizedPrincipals\n"], lines
    assert any(f"or a key from {keys}" in line for line in lines), lines
def test_proxy_protocol_is_off_by_default() -> None:
    proxy = default_config().ssh.proxy_protocol
    assert (proxy.enabled, proxy.trusted_networks, proxy.header_timeout) == (False, (), 5.0)


@pytest.mark.parametrize(("text", "expected"), [
    ("ssh: {proxyProtocol: {enabled: true}}",
     "ssh.proxyProtocol.trustedNetworks: name at least one network (the load balancers') "
     "when proxyProtocol is enabled"),
    ("ssh: {proxyProtocol: {trustedNetworks: [10.0.0.1/8]}}",
     "ssh.proxyProtocol.trustedNetworks[0]: `10.0.0.1/8` is not an IP network like `10.0.0.0/8` or "
     "`192.0.2.7` (10.0.0.1/8 has host bits set)"),
    ("ssh: {proxyProtocol: {enabled: true, trustedNetworks: [127.0.0.1, lb.example]}}",
     "ssh.proxyProtocol.trustedNetworks[1]: `lb.example` is not an IP network like `10.0.0.0/8` or "
     "`192.0.2.7` ('lb.example' does not appear to be an IPv4 or IPv6 network)"),
    ("ssh: {proxyProtocol: {enabled: true, trustedNetworks: [127.0.0.1], headerTimeout: 0}}",
     "ssh.proxyProtocol.headerTimeout: must be greater than 0"),
    ("ssh: {proxyProtocol: {enable: true}}",
     "ssh.proxyProtocol.enable: unknown key (did you mean `enabled`?)"),
])
def test_bad_proxy_protocol(tmp_path: Path, text: str, expected: str) -> None:
    assert _error(tmp_path, text) == expected


def test_the_readme_example_is_the_defaults(tmp_path: Path) -> None:
    """The README's config block (the first yaml block) loads, and says the defaults
    (its user aside)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    data = yaml.safe_load(block)
    del data["auth"]["users"]  # an example user whose hash is elided
    config = load_config(_write(tmp_path, yaml.safe_dump(data)))
    assert config == default_config()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("auth: {webhook: {url: 'ftp://x'}}",
         "auth.webhook.url: `ftp://x`: expected http(s)://host[:port][/path]"),
        ("auth: {webhook: {url: 'http://x:99999'}}", "auth.webhook.url: not a URL: Port out of range"),
        ("auth: {webhook: {url: 'http://x', timeout: 11s}}",
         "auth.webhook.timeout: is longer than auth.webhook.authTimeout (10s)"),
        ("auth: {webhook: {url: 'http://x', timeout: 0}}", "auth.webhook.timeout: must be greater than 0"),
        ("auth: {webhook: {url: 'http://x', cacert: ca.pem}}",
         "auth.webhook.cacert: is set but the url is http://, not https://"),
        ("configserver: {url: 'https://x', cacert: /nonexistent/ca.pem}",
         "configserver.cacert: cannot be used"),
        ("configserver: {url: 'https://x', key: k.pem}", "configserver.key: is set without cert"),
        ("configserver: {url: 'https://x', tlsVersion: '1.1'}",
         "configserver.tlsVersion: Invalid enum value '1.1'"),
        ("auth: {webhook: {passwd: true}}", "auth.webhook.passwd: unknown key (did you mean `password`?)"),
        ("metrics: {listen: 9100}", "metrics.listen: Expected `host:port` as a string, got `int`"),
        ("metrics: {listen: localhost}", "metrics.listen: Invalid listen address"),
        ("metrics: {path: metrics}", "metrics.path: Expected `str` matching regex"),
        ("health: {listen: '127.0.0.1:2222'}", "health.listen: is ssh.listen's address"),
    ],
)
def test_webhook_and_endpoint_keys_are_checked(tmp_path: Path, text: str, expected: str) -> None:
    assert _error(tmp_path, text).startswith(expected)


def test_webhook_tls_files_are_loaded_at_start(tmp_path: Path) -> None:
    """A CA file that is not a certificate is exit 2 naming the key, not a failed login."""
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    text = f"auth: {{webhook: {{url: 'https://auth.example', cacert: {tmp_path / 'ca.pem'}}}}}"
    assert _error(tmp_path, text).startswith("auth.webhook.cacert: cannot be used")


@pytest.mark.parametrize(
    ("text", "expected", "dumped"),
    [
        ("100", MaxStartups(100, 100, 100), "100"),  # an int: the hard limit alone, as before
        ("'100'", MaxStartups(100, 100, 100), "100"),
        ("'10:30:100'", MaxStartups(10, 30, 100), "10:30:100"),
        ("'0:100:1'", MaxStartups(0, 100, 1), "0:100:1"),
        ("10:30:60", MaxStartups(10, 30, 60), "10:30:60"),  # 60 is no base-60 digit: YAML keeps a string
    ],
)
def test_max_startups_forms(tmp_path: Path, text: str, expected: MaxStartups, dumped: str) -> None:
    config = load_config(_write(tmp_path, f"limits: {{maxStartups: {text}}}"))
    assert config.limits.max_startups == expected
    assert str(config.limits.max_startups) == dumped
    again = tmp_path / "again.yaml"
    again.write_bytes(dump_config(config))
    assert load_config(again) == config
    from sshspec.adapters.config import spec_limits
    assert spec_limits(config)["maxStartups"] == expected.full  # the spec's hard limit


def test_net_block_size_forms(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "limits: {perSourceNetBlockSize: 24}")).limits \
        .per_source_net_block_size == NetBlockSize(24, 64)
    assert load_config(_write(tmp_path, "limits: {perSourceNetBlockSize: '16:48'}")).limits \
        .per_source_net_block_size == NetBlockSize(16, 48)


def test_docker_agent_is_off_unless_configured(tmp_path: Path) -> None:
    """docker.agent: unset, programs run without it; `{}` its defaults; with `source`, the
    host file is bind-mounted read-only at `path` in every container."""
    from sshspec.adapters.backend_docker import Agent, ContainerSettings
    assert load_config(None).docker.agent is None
    assert ContainerSettings.from_config(load_config(None).docker).agent is None
    config = load_config(_write(tmp_path, "docker: {agent: {}}")).docker
    assert ContainerSettings.from_config(config).agent == Agent("/usr/bin/sshspec-agent", "", "/dev/shm")
    assert ContainerSettings.from_config(config).create_config({})["HostConfig"]["Mounts"] == []
    config = load_config(_write(tmp_path, "docker: {agent: {source: /opt/a, path: /sbin/a}}")).docker
    mounts = ContainerSettings.from_config(config).create_config({})["HostConfig"]["Mounts"]
    assert mounts == [{"Type": "bind", "Target": "/sbin/a", "Source": "/opt/a", "ReadOnly": True}]
