"""The server configuration: a YAML file decoded by msgspec into frozen structs.

The keys are camelCase in YAML (users rely on them) and snake_case in Python. Every
section refuses unknown keys, so a typo is an error naming the key instead of a
silently ignored setting. Every error is a `ConfigError` whose one-line message names
the file and the key path, e.g. ``config.yaml: limits.maxAuthTries: Expected `int` >= 1``.

Durations (`limits.loginTimeout`, ...) are written `500ms`, `120s`, `2m`, `1h`, `1m30s`,
`0`, or as a plain number of seconds; they decode to float seconds (`Duration`).
`ssh.listen` is `host:port` (`[::1]:2222` for IPv6) and decodes to `Listen`, a
(host, port) tuple. `limits.maxStartups` is OpenSSH's `start:rate:full` or an int
(`MaxStartups`), `limits.perSourceNetBlockSize` is `v4bits:v6bits` (`NetBlockSize`),
and `limits.perSourcePenalties.exempt` lists networks (`Network`).

Paths in the file (hostkeys, authorizedKeysFile, log.file, stateDir) are kept as
written; relative ones are relative to the server's working directory.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect as mi
import yaml

from sshspec.fsm.spec import BUNDLED, load_spec
from sshspec.fsm.yamlfile import DuplicateKeyError, read_yaml, yaml_problem

from .logs import Format, Level
from .passwords import LN, R, parse_hash


class ConfigError(Exception):
    """A config file that cannot be used; `str()` is one line naming file and key."""

    def __init__(self, file: str, key: str | None, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        super().__init__(f"{file}: {key}: {problem}" if key else f"{file}: {problem}")


class Duration(float):
    """Seconds, parsed from `500ms`, `120s`, `2m`, `1h`, `1m30s`, `0` or a number."""


class ByteSize(int):
    """Bytes, parsed from `64KiB`, `8MiB`, `1GiB` (or kB/MB/GB, powers of 1000) or a number."""


class Listen(tuple[str, int]):
    """`ssh.listen` as (host, port); an IPv6 host is stored without brackets."""

    __slots__ = ()

    def __new__(cls, host: str, port: int) -> Listen:
        return super().__new__(cls, (host, port))

    def __getnewargs__(self) -> tuple[str, int]:  # so copy/pickle call __new__(host, port)
        return (self[0], self[1])

    @property
    def host(self) -> str:
        return self[0]

    @property
    def port(self) -> int:
        return self[1]

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"Listen({self.host!r}, {self.port})"


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+|\d+(?:\.\d+)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> Duration:
    # bool is an int subclass, and YAML 1.1 reads `yes`/`on` as true.
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an int too big for a float
            seconds = math.inf
    elif not isinstance(value, str):
        raise ValueError(f"Expected a duration like `120s`, `2m`, `500ms`, got `{type(value).__name__}`")
    elif _DURATION.fullmatch(value) is None:
        raise ValueError(
            f"Invalid duration `{value}`: expected a number with a unit ms, s, m or h,"
            " e.g. `120s`, `2m`, `500ms`, `1m30s`"
        )
    elif parts := _DURATION_PART.findall(value):
        seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    else:  # a bare number: seconds
        seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"Invalid duration `{value}`: must be a finite number of seconds >= 0")
    return Duration(seconds)


_BYTE_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|kB|MB|GB)?")
_UNIT_BYTES = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "kB": 10**3, "MB": 10**6,
               "GB": 10**9}


def parse_byte_size(value: object) -> ByteSize:
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = value, None
    elif isinstance(value, str) and (match := _BYTE_SIZE.fullmatch(value.strip())):
        number, unit = int(match[1]), match[2]
    else:
        raise ValueError(f"Invalid size `{value}`: expected bytes like `64KiB`, `8MiB`, `1GiB` or a number")
    if number < 0:
        raise ValueError(f"Invalid size `{value}`: must be >= 0")
    return ByteSize(number * _UNIT_BYTES[unit])


_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*")


def parse_listen(value: object) -> Listen:
    if not isinstance(value, str):
        # YAML 1.1 reads an unquoted `22:22` as the sexagesimal number 1342.
        raise ValueError(f"Expected `host:port` as a string, got `{type(value).__name__}`")
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"Invalid listen address `{value}`: expected `[IPv6]:port`")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"Invalid listen address `{value}`: `{host}` is not IPv6") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"Invalid listen address `{value}`: expected `host:port`, e.g. `127.0.0.1:2222`")
        if ":" in host:
            raise ValueError(f"Invalid listen address `{value}`: write IPv6 in brackets, e.g. `[::1]:2222`")
        if _HOSTNAME.fullmatch(host) is None:
            raise ValueError(f"Invalid listen address `{value}`: `{host}` is not a host name")
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"Invalid listen address `{value}`: port must be 0..65535")
    return Listen(host, int(port))


class MaxStartups:
    """`limits.maxStartups`: OpenSSH's `start:rate:full` random early drop (from
    `start` unauthenticated connections on, refuse each new one with a probability
    rising from `rate`% to 100% at `full`), or an int: the hard limit alone (full)."""

    __slots__ = ("start", "rate", "full")

    def __init__(self, start: int, rate: int, full: int) -> None:
        self.start, self.rate, self.full = start, rate, full

    @property
    def early_drop(self) -> bool:
        return self.start < self.full

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MaxStartups) and (self.start, self.rate, self.full) == \
            (other.start, other.rate, other.full)

    def __hash__(self) -> int:
        return hash((self.start, self.rate, self.full))

    def __repr__(self) -> str:
        return f"MaxStartups({self.start}, {self.rate}, {self.full})"

    def __str__(self) -> str:
        return f"{self.start}:{self.rate}:{self.full}" if self.early_drop else str(self.full)


def parse_max_startups(value: object) -> MaxStartups:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"Expected `start:rate:full` or an int >= 1, got `{value}`")
        return MaxStartups(value, 100, value)
    if not isinstance(value, str):
        raise ValueError(f"Expected `start:rate:full` (a string) or an int, got `{type(value).__name__}`")
    parts = value.split(":")
    if len(parts) == 1 and value.isascii() and value.isdigit():
        return parse_max_startups(int(value))
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f"Invalid maxStartups `{value}`: expected `start:rate:full`, e.g. `10:30:100`, "
                         "or an int")
    start, rate, full = (int(p) for p in parts)
    if not 1 <= rate <= 100:
        raise ValueError(f"Invalid maxStartups `{value}`: rate must be a percentage from 1 to 100")
    if full < 1 or start > full:
        raise ValueError(f"Invalid maxStartups `{value}`: expected start <= full and full >= 1")
    return MaxStartups(start, rate, full)


class NetBlockSize:
    """`limits.perSourceNetBlockSize`: how many leading bits of an IPv4 and an IPv6
    address make one source (`32:64`; an int gives the IPv4 part alone)."""

    __slots__ = ("ipv4", "ipv6")

    def __init__(self, ipv4: int, ipv6: int) -> None:
        self.ipv4, self.ipv6 = ipv4, ipv6

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NetBlockSize) and (self.ipv4, self.ipv6) == (other.ipv4, other.ipv6)

    def __hash__(self) -> int:
        return hash((self.ipv4, self.ipv6))

    def __repr__(self) -> str:
        return f"NetBlockSize({self.ipv4}, {self.ipv6})"

    def __str__(self) -> str:
        return f"{self.ipv4}:{self.ipv6}"


def parse_net_block_size(value: object) -> NetBlockSize:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"Expected `v4bits:v6bits` as a string, e.g. `32:64`, got `{type(value).__name__}`")
    v4, sep, v6 = value.partition(":")
    if not all(p.isascii() and p.isdigit() for p in ((v4, v6) if sep else (v4,))):
        raise ValueError(f"Invalid perSourceNetBlockSize `{value}`: expected `v4bits:v6bits`, e.g. `32:64`")
    block = NetBlockSize(int(v4), int(v6) if sep else 64)
    if block.ipv4 > 32 or block.ipv6 > 128:
        raise ValueError(f"Invalid perSourceNetBlockSize `{value}`: at most 32 bits for IPv4, 128 for IPv6")
    return block


class Network(str):
    """A network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`); an address is its /32 or /128."""


def parse_network(value: object) -> Network:
    if not isinstance(value, str):
        raise ValueError(f"Expected a network like `10.0.0.0/8` or an address, got `{type(value).__name__}`")
    try:
        network = ipaddress.ip_network(value)
    except ValueError as exc:
        raise ValueError(f"Invalid network `{value}`: {exc}") from None
    return Network(str(network))


def _dec_hook(type_: type, obj: Any) -> Any:
    # msgspec wraps a ValueError raised here into a ValidationError carrying the key path.
    if type_ is Duration:
        return parse_duration(obj)
    if type_ is Listen:
        return parse_listen(obj)
    if type_ is ByteSize:
        return parse_byte_size(obj)
    if type_ is MaxStartups:
        return parse_max_startups(obj)
    if type_ is NetBlockSize:
        return parse_net_block_size(obj)
    if type_ is Network:
        return parse_network(obj)
    raise NotImplementedError(type_)


def _seconds(seconds: float) -> Any:
    # A factory rather than a default: msgspec's schema generator can only encode
    # defaults of builtin types, and Duration is a float subclass.
    return msgspec.field(default_factory=lambda: Duration(seconds))


NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
# RFC 4251 section 6: algorithm names are printable US-ASCII without commas, <= 64 chars.
Algorithm = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[\x21-\x2b\x2d-\x7e]{1,64}$",
        description="an algorithm name: 1 to 64 printable ASCII characters, no spaces or commas",
    ),
]
# RFC 4253 section 4.2: `SSH-2.0-softwareversion[ SP comments]`, 255 bytes with CR LF.
ServerVersion = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^SSH-2\.0-[\x21-\x2c\x2e-\x7e]+( [\x20-\x7e]*)?$",
        max_length=253,
        description="`SSH-2.0-<software version without spaces or '-'>[ <comment>]`,"
        " printable ASCII, at most 253 characters",
    ),
]


# The spec's limits (`limits:` in specs/*.yaml), declared there once: their defaults
# are the config's, and the config key of each is its name (limits.maxAuthTries,
# ssh.clientAliveCountMax).
SPEC_LIMITS: dict[str, int] = {name: limit.default for spec in BUNDLED
                               for name, limit in load_spec(spec).spec.limits.items()}


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """The options of every section; subclasses inherit them, but each says frozen=True
    again for mypy, which takes a dataclass-like subclass without it as not frozen."""


class ProxyProtocolConfig(_Section, frozen=True):
    """HAProxy's PROXY protocol (v1 and v2) from load balancers (adapters/proxy_protocol.py).
    Off by default. When on, a peer in `trusted_networks` must begin with a header
    naming the client (a peer there without one is refused); a header from
    anyone else is refused."""

    enabled: bool = False
    # CIDRs (`10.0.0.0/8`, `192.0.2.7`, `2001:db8::/32`), checked after decoding.
    trusted_networks: tuple[NonEmpty, ...] = ()
    # How long a trusted peer has for its header (haproxy sends it at once);
    # never more than limits.loginTimeout.
    header_timeout: Duration = _seconds(5)


class SSHConfig(_Section, frozen=True):
    # Loopback by default: exposing a login service must be a deliberate choice. A factory
    # so that the schema has no default: msgspec would render the tuple as an array.
    listen: Listen = msgspec.field(default_factory=lambda: Listen("127.0.0.1", 2222))
    hostkeys: tuple[NonEmpty, ...] = ()  # empty: an ed25519 key generated in the state dir
    server_version: ServerVersion = "SSH-2.0-sshspec"
    banner: str = ""
    # Empty: the secure defaults of the profile.
    ciphers: tuple[Algorithm, ...] = ()
    kex: tuple[Algorithm, ...] = ()
    macs: tuple[Algorithm, ...] = ()
    host_key_algorithms: tuple[Algorithm, ...] = ()
    profile: Literal["default", "strict"] = "default"
    # zlib@openssh.com (after authentication, like OpenSSH's `Compression delayed`); off:
    # compression costs CPU, and a decompressed packet is one more thing a client sizes.
    compression: bool = False
    client_alive_interval: Duration = _seconds(0)  # 0: no keepalives
    client_alive_count_max: Annotated[int, msgspec.Meta(ge=1)] = SPEC_LIMITS["clientAliveCountMax"]
    proxy_protocol: ProxyProtocolConfig = msgspec.field(default_factory=ProxyProtocolConfig)


class User(_Section, frozen=True):
    username: NonEmpty
    password_hash: str | None = None  # checked by passwords.parse_hash after decoding
    authorized_keys: tuple[str, ...] = ()  # authorized_keys lines, checked after decoding
    # The names a certificate from auth.trustedUserCAKeys may carry for this user
    # (sshd's AuthorizedPrincipalsFile, inline); empty: the user name.
    authorized_principals: tuple[NonEmpty, ...] = ()


class HTTPClientConfig(_Section, frozen=True):
    """A webhook's HTTP client: ContainerSSH's keys (docs/reference/http.md there)."""

    url: str = ""  # http:// or https://; empty: off
    timeout: Duration = _seconds(2)  # one HTTP call
    cacert: str = ""  # PEM file of the CA that signed the server's certificate (https); empty: the system's
    cert: str = ""  # PEM file of our client certificate, for servers that ask for one (mutual TLS)
    key: str = ""  # PEM file of its private key (empty: in `cert`)
    tls_version: Literal["1.2", "1.3"] = "1.3"  # the lowest TLS version accepted


class AuthWebhookConfig(HTTPClientConfig, frozen=True):
    # Non-200 answers, timeouts and unreachable servers are retried until this deadline.
    auth_timeout: Duration = _seconds(10)
    password: bool = True  # POST {url}/password
    public_key: bool = True  # POST {url}/pubkey
    keyboard_interactive: bool = False  # one "Password:" prompt, checked by {url}/password


class ConfigServerConfig(HTTPClientConfig, frozen=True):
    # Non-200 answers, timeouts and unreachable servers are retried until this deadline.
    config_timeout: Duration = _seconds(10)


class AuthConfig(_Section, frozen=True):
    users: tuple[User, ...] = ()
    authorized_keys_file: str = ""
    # Files of CA public keys (sshd's TrustedUserCAKeys): a user certificate signed by
    # one logs in any user it names as a principal (or one of the user's
    # authorizedPrincipals).
    trusted_user_ca_keys: tuple[NonEmpty, ...] = msgspec.field(default=(), name="trustedUserCAKeys")
    # SHA-1 `ssh-rsa` user signatures: refused, as OpenSSH does since 8.8 (its
    # PubkeyAcceptedAlgorithms); true accepts them from old clients.
    allow_sha1_rsa: bool = False
    # ContainerSSH's authentication API; users in `users` are still decided here.
    webhook: AuthWebhookConfig = msgspec.field(default_factory=AuthWebhookConfig)
    # A failed attempt is answered this long after it arrived, and the connection's
    # next attempt waits for it (Linux-PAM's pam_unix delays a failure ~2 s).
    failure_delay: Duration = _seconds(2)


class PenaltiesConfig(_Section, frozen=True):
    """`limits.perSourcePenalties`, OpenSSH 9.8's PerSourcePenalties (its defaults,
    but protocolError, which OpenSSH folds into noauth: see README)."""

    enabled: bool = True
    authfail: Duration = _seconds(5)  # per failed attempt that counts against maxAuthTries
    noauth: Duration = _seconds(1)  # a connection that ends before login without a failed attempt
    grace_exceeded: Duration = _seconds(10)  # limits.loginTimeout expired before login
    protocol_error: Duration = _seconds(5)  # the client broke the protocol before login
    min: Duration = msgspec.field(default_factory=lambda: Duration(15), name="min")
    max: Duration = msgspec.field(default_factory=lambda: Duration(600), name="max")
    max_sources: Annotated[int, msgspec.Meta(ge=1)] = 65536  # per address family
    overflow: Literal["permissive", "deny-all"] = "permissive"
    exempt: tuple[Network, ...] = ()  # never penalised


class LimitsConfig(_Section, frozen=True):
    login_timeout: Duration = _seconds(120)  # must be > 0, checked after decoding
    max_auth_tries: Annotated[int, msgspec.Meta(ge=1)] = SPEC_LIMITS["maxAuthTries"]
    max_sessions: Annotated[int, msgspec.Meta(ge=1)] = SPEC_LIMITS["maxSessions"]
    # OpenSSH's default; its `full` is the spec's maxStartups limit.
    max_startups: MaxStartups = msgspec.field(
        default_factory=lambda: MaxStartups(10, 30, SPEC_LIMITS["maxStartups"]))
    # Below maxStartups' start, so one source alone never sets off the random early drop.
    per_source_max_startups: Annotated[int, msgspec.Meta(ge=0)] = 5  # 0: no limit
    per_source_net_block_size: NetBlockSize = msgspec.field(default_factory=lambda: NetBlockSize(32, 64))
    per_source_penalties: PenaltiesConfig = msgspec.field(default_factory=PenaltiesConfig)
    max_env: Annotated[int, msgspec.Meta(ge=0)] = SPEC_LIMITS["maxEnv"]
    max_queued_requests: Annotated[int, msgspec.Meta(ge=1)] = 16
    shutdown_timeout: Duration = _seconds(10)
    # Bytes waiting for a client that does not read (answers to what it keeps asking;
    # program output already waits), for one connection and for all of them; at least
    # 64 KiB, the socket buffer's high-water mark, checked after decoding.
    max_buffered_per_connection: ByteSize = msgspec.field(default_factory=lambda: ByteSize(8 << 20))
    max_buffered_total: ByteSize = msgspec.field(default_factory=lambda: ByteSize(256 << 20))


class ForwardingConfig(_Section, frozen=True):
    """TCP forwarding, with OpenSSH's meanings (AllowTcpForwarding, PermitOpen).
    `tcp`: none | local (direct-tcpip: ssh -L, -D, -J) | remote (tcpip-forward: ssh -R) | all.
    Unset: all for the local backend, as sshd; none for the docker backend, whose containers reach no network
    the server does not give them (its forwards would come from the server's host); for an application's
    own handler (--handler), local if it defines forward_target, else none."""

    tcp: Literal["none", "local", "remote", "all"] | None = None
    # host:port patterns a direct-tcpip may reach; `*` for any host or port.
    permit_open: tuple[NonEmpty, ...] = ("*:*",)
    # [host:]port patterns a tcpip-forward (ssh -R) may ask for; `*` for any.
    permit_listen: tuple[NonEmpty, ...] = ("*",)
    # false: every listener is bound on loopback whatever the client asks (sshd's GatewayPorts no);
    # true: on the address the client names ("" or "*": every interface).
    gateway_ports: bool = False
    # ssh -A: a session's programs reach the client's agent through SSH_AUTH_SOCK, a socket in a
    # directory only the server's user may enter. Unset: on for the local backend (as sshd), off
    # for docker (its programs could not reach the socket), and for a --handler app on only if it
    # defines agent_target.
    agent: bool | None = None
    max_forwards_per_connection: Annotated[int, msgspec.Meta(ge=1)] = SPEC_LIMITS["maxForwardsPerConnection"]
    max_listeners_per_connection: Annotated[int, msgspec.Meta(ge=1)] = \
        SPEC_LIMITS["maxListenersPerConnection"]
    # How long the server waits for a target to accept before it refuses the channel, and for the
    # client to answer the server's own channel open (-R forwarded-tcpip, -A auth-agent).
    connect_timeout: Duration = _seconds(10)


class BackendConfig(_Section, frozen=True):
    type: Literal["local", "docker"] = "local"  # docker: a container per connection (see `docker:`)
    env_deny: tuple[NonEmpty, ...] = ("LD_*", "DYLD_*")  # fnmatch patterns
    shell: str = ""  # empty: the user's login shell from the passwd entry, as sshd does


# `docker.memory`: bytes, or a number with a unit (k, m, g: powers of 1024), as `docker run -m`.
MEMORY = re.compile(r"(\d+)([kmg]?)b?", re.IGNORECASE)
_MEMORY_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
# The default idle command: waits for ever and ends at SIGTERM (a plain `sleep` as PID 1
# ignores it, so every stop would wait out docker.timeouts.stop). Needs /bin/sh.
DEFAULT_IDLE = ("/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done")


class DockerTimeouts(_Section, frozen=True):
    pull: Duration = _seconds(300)  # the image check and its pull
    start: Duration = _seconds(60)  # the create, and the start, each
    stop: Duration = _seconds(10)  # SIGTERM to SIGKILL in a stop; the remove gets as long again


class DockerMount(_Section, frozen=True):
    target: NonEmpty  # where in the container, an absolute path
    source: str = ""  # bind: an absolute host path; volume: a volume name; tmpfs: empty
    type: Literal["bind", "volume", "tmpfs"] = "bind"
    read_only: bool = True


class DockerAgent(_Section, frozen=True):
    """sshspec-agent (adapters/agent/sshspec-agent.c, `make agent`), the parent of every
    program in the container: with it a program killed by a signal is exit-signal, as
    with the local backend; without it (unset, the default) the engine's 128+N is
    exit-status 128+N, as with ContainerSSH without its agent."""

    path: NonEmpty = "/usr/bin/sshspec-agent"  # the agent inside the container
    # A file on the engine's host, bind-mounted read-only at `path` in every container
    # (the images need not have it); empty: the images have it at `path`.
    source: str = ""
    # Where the agent leaves a killed program's status for the backend (a tmpfs every
    # Docker and Podman container has, writable by any user).
    status_dir: NonEmpty = "/dev/shm"


class DockerTLS(_Section, frozen=True):
    # PEM files, as DOCKER_CERT_PATH holds them (ca.pem, cert.pem, key.pem).
    ca: NonEmpty
    cert: NonEmpty
    key: NonEmpty


class DockerConfig(_Section, frozen=True):
    # unix:///run/docker.sock, unix:///run/podman/podman.sock, tcp://host:2376 (with tls);
    # empty: $DOCKER_HOST, else unix:///var/run/docker.sock.
    host: str = ""
    tls: DockerTLS | None = None
    image: str = ""  # required with backend.type docker
    pull: Literal["never", "ifNotPresent", "always"] = "ifNotPresent"
    mode: Literal["connection", "session"] = "connection"
    user: str = ""  # empty: the image's
    workdir: str = ""  # empty: the image's
    env: dict[NonEmpty, str] = {}
    network: NonEmpty = "none"  # a container reaches nothing unless configured
    memory: str | int = 0  # 0: no limit
    cpus: Annotated[float, msgspec.Meta(ge=0)] = 0  # 0: no limit
    pids: Annotated[int, msgspec.Meta(ge=0)] = 1024  # processes in the container; 0: no limit
    read_only_rootfs: bool = False
    mounts: tuple[DockerMount, ...] = ()  # none unless configured
    labels: dict[NonEmpty, str] = {}
    idle_command: tuple[NonEmpty, ...] = DEFAULT_IDLE
    shell_command: tuple[NonEmpty, ...] = ("/bin/sh",)
    subsystems: dict[NonEmpty, NonEmpty] = msgspec.field(
        default_factory=lambda: {"sftp": "/usr/lib/openssh/sftp-server"})
    timeouts: DockerTimeouts = msgspec.field(default_factory=DockerTimeouts)
    max_containers: Annotated[int, msgspec.Meta(ge=1)] = 100
    agent: DockerAgent | None = None  # off unless configured (see DockerAgent)


def memory_bytes(value: str | int) -> int:
    """`docker.memory` in bytes (0: no limit); ValueError if it is not `512m`-like."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must be 0 (no limit) or more")
        return value
    match = MEMORY.fullmatch(str(value).strip())
    if match is None:
        raise ValueError(f"`{value}` is not a size like `512m`, `2g` or a number of bytes")
    return int(match.group(1)) * _MEMORY_UNITS[match.group(2).lower()]


class LogConfig(_Section, frozen=True):
    level: Level = "debug"
    format: Format = "json"
    file: str = ""  # empty: stdout
    # Records are written in batches at most this late (0: each step's records
    # before its reply); see adapters/logs.py for what it costs and buys.
    flush_interval: Duration = _seconds(0.1)
    # Durable (the default): the records of what a client can see (auth answers,
    # channel opens, replies, exit statuses, closes, disconnects) are written before
    # it goes out, so a kill -9 never loses one; the rest still wait for the batch.
    # false: everything waits for the batch, up to flushInterval late.
    durable: bool = True


class MetricsConfig(_Section, frozen=True):
    listen: Listen | None = None  # host:port serving Prometheus' text format; unset: no metrics at all
    path: Annotated[str, msgspec.Meta(pattern=r"^/[\x21-\x7e]*$")] = "/metrics"


class HealthConfig(_Section, frozen=True):
    listen: Listen | None = None  # host:port answering GET /healthz; unset: off


class Config(_Section, frozen=True):
    ssh: SSHConfig = msgspec.field(default_factory=SSHConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    backend: BackendConfig = msgspec.field(default_factory=BackendConfig)
    forwarding: ForwardingConfig = msgspec.field(default_factory=ForwardingConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    # ContainerSSH's configuration API: per-connection backend settings after authentication.
    configserver: ConfigServerConfig = msgspec.field(default_factory=ConfigServerConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    docker: DockerConfig = msgspec.field(default_factory=DockerConfig)  # backend.type docker
    state_dir: str = ""  # empty: see resolve_state_dir


def spec_limits(config: Config) -> dict[str, int]:
    """The values the config gives the spec's limits, by the spec's names."""
    values = {f.encode_name: getattr(section, f.name)
              for section in (config.ssh, config.limits, config.forwarding)
              for f in msgspec.structs.fields(section)}
    values["maxStartups"] = config.limits.max_startups.full  # the spec's hard limit
    return {name: values[name] for name in SPEC_LIMITS}


def default_config() -> Config:
    return Config()


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """The config in the YAML file at `path`; None or an empty file: the defaults."""
    if path is None:
        return default_config()
    file = os.fspath(path)
    try:
        with open(file, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(file, None, f"cannot read: {exc.strerror}") from None
    try:
        raw = read_yaml(text)
    except DuplicateKeyError as exc:
        raise ConfigError(file, exc.path, f"duplicate key `{exc.key}` ({exc.where})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(file, None, yaml_problem(exc)) from None
    if raw is None:
        return default_config()
    _refuse_sexagesimal(file, text)
    try:
        config = msgspec.convert(raw, Config, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise _validation_error(file, str(exc)) from None
    _check(file, config)
    return config


# Keys whose `a:b:c` form YAML 1.1 reads, unquoted, as a base-60 number
# (`10:30:60` is 37860): such a number is refused, not taken as meant.
_COLON_KEYS = (("limits", "maxStartups"), ("limits", "perSourceNetBlockSize"))


def _refuse_sexagesimal(file: str, text: bytes) -> None:
    from yaml.nodes import MappingNode, ScalarNode
    root = yaml.compose(text, Loader=yaml.SafeLoader)  # (read_yaml read it already: no error)
    for path in _COLON_KEYS:
        node = root
        for key in path:
            node = next((v for k, v in node.value if isinstance(k, ScalarNode) and k.value == key), None) \
                if isinstance(node, MappingNode) else None
        if isinstance(node, ScalarNode) and node.style is None and ":" in node.value \
                and node.tag.endswith((":int", ":float")):
            raise ConfigError(file, ".".join(path), f"YAML reads an unquoted `{node.value}` as a base-60 "
                                                    f"number: quote it, \"{node.value}\"")


_ERROR_AT = re.compile(r"(?s)(.*?)(?: - at `key` in `\$(.*)`| - at `\$(.*)`)?")
_UNKNOWN = re.compile(r"Object contains unknown field `(.*)`")
_MISSING = re.compile(r"Object missing required field `(.*)`")


def _validation_error(file: str, text: str) -> ConfigError:
    """Turn msgspec's `message - at `$.a.b[0]`` into ConfigError(file, 'a.b[0]', message)."""
    match = _ERROR_AT.fullmatch(text)
    assert match is not None  # the regex matches any text
    problem, key_of, at = match.groups()
    if key_of is not None:
        return ConfigError(file, key_of.lstrip(".") or None, f"keys must be strings ({problem})")
    path = (at or "").lstrip(".")
    if unknown := _UNKNOWN.fullmatch(problem):
        name = unknown.group(1)
        known = _keys_at(path)
        hint = difflib.get_close_matches(name, known, n=1)
        if hint:
            problem = f"unknown key (did you mean `{hint[0]}`?)"
        else:
            problem = f"unknown key (known keys: {', '.join(known)})"
        return ConfigError(file, f"{path}.{name}" if path else name, problem)
    if missing := _MISSING.fullmatch(problem):
        name = missing.group(1)
        return ConfigError(file, f"{path}.{name}" if path else name, "required key is missing")
    node = _node_at(path)
    schema = node.extra_json_schema if isinstance(node, mi.Metadata) else None
    if schema and "description" in schema and ", got `" not in problem:
        # A failed constraint: the description says more than "matching regex '...'".
        problem = f"Expected {schema['description']}"
    target = _unwrap(node)
    if isinstance(target, mi.LiteralType):
        problem += f"; expected one of: {', '.join(map(str, target.values))}"
    if not path:
        return ConfigError(file, None, f"{problem} at the top level")
    return ConfigError(file, path, problem)


def _unwrap(node: mi.Type | None) -> mi.Type | None:
    while True:
        if isinstance(node, mi.Metadata):
            node = node.type
        elif isinstance(node, mi.UnionType):  # an optional section (`X | None`): its section
            types = [t for t in node.types if not isinstance(t, mi.NoneType)]
            if len(types) != 1:
                return node
            node = types[0]
        else:
            return node


def _node_at(path: str) -> mi.Type | None:
    """The msgspec type of the key at `path` (like `auth.users[0].username`), if any."""
    node: mi.Type | None = mi.type_info(Config)
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        node = _unwrap(node)
        if name and isinstance(node, mi.StructType):
            node = next((f.type for f in node.fields if f.encode_name == name), None)
        elif index and isinstance(node, mi.VarTupleType):
            node = node.item_type
        else:
            return None
    return node


def _keys_at(path: str) -> list[str]:
    node = _unwrap(_node_at(path))
    return [f.encode_name for f in node.fields] if isinstance(node, mi.StructType) else []


def _check(file: str, config: Config) -> None:
    """What msgspec constraints cannot say: cross-field rules and formats of other modules."""
    if config.limits.login_timeout <= 0:
        # Without a deadline an unauthenticated client could hold a maxStartups slot forever.
        raise ConfigError(file, "limits.loginTimeout", "must be greater than 0")
    for key, value in (("limits.maxBufferedPerConnection", config.limits.max_buffered_per_connection),
                       ("limits.maxBufferedTotal", config.limits.max_buffered_total)):
        if value < 64 << 10:
            # Below the socket buffer's high-water mark a client that reads slowly would be cut.
            raise ConfigError(file, key, f"{value} bytes: must be at least 64KiB")
    _check_proxy_protocol(file, config.ssh.proxy_protocol)
    _check_forwarding(file, config)
    penalties = config.limits.per_source_penalties
    if penalties.max <= penalties.min:
        # Penalties add up to `max`; a source is refused past `min`: it never would be.
        raise ConfigError(file, "limits.perSourcePenalties.max",
                          f"must be greater than min ({penalties.min:g}s), or no source is ever refused")
    if config.backend.shell and not os.path.isabs(config.backend.shell):
        raise ConfigError(file, "backend.shell", f"must be an absolute path, got `{config.backend.shell}`")
    _check_docker(file, config)
    seen: dict[str, int] = {}
    for i, user in enumerate(config.auth.users):
        key = f"auth.users[{i}]"
        if user.username in seen:
            raise ConfigError(
                file,
                f"{key}.username",
                f"duplicate of auth.users[{seen[user.username]}].username `{user.username}`",
            )
        seen[user.username] = i
        if user.password_hash is None and not user.authorized_keys and not config.auth.trusted_user_ca_keys:
            raise ConfigError(file, key, "user has neither passwordHash nor authorizedKeys "
                                         "(nor a CA in auth.trustedUserCAKeys)")
        for j, principal in enumerate(user.authorized_principals):
            if re.search(r"[\s,]", principal):
                # A certificate's principal never matches "ops, dev": one name per entry.
                raise ConfigError(file, f"{key}.authorizedPrincipals[{j}]",
                                  f"`{principal}`: one principal per entry, without spaces or commas")
        if user.authorized_principals and not config.auth.trusted_user_ca_keys:
            # sshd ignores AuthorizedPrincipalsFile without TrustedUserCAKeys: say so instead.
            raise ConfigError(file, f"{key}.authorizedPrincipals",
                              "applies to certificates from auth.trustedUserCAKeys, which names no file")
        if user.password_hash is not None:
            try:
                params = parse_hash(user.password_hash)
            except ValueError as exc:
                raise ConfigError(file, f"{key}.passwordHash", str(exc)) from None
            if params.r * 2**params.ln < R * 2**LN:
                # A cheap hash is a cheap guess for whoever reads the config file.
                raise ConfigError(file, f"{key}.passwordHash",
                                  f"ln={params.ln},r={params.r} is weaker than sshspec's ln={LN},r={R}: "
                                  "hash it again with `sshspec hash-password`")
        for j, line in enumerate(user.authorized_keys):
            if problem := authorized_key_problem(line):
                raise ConfigError(file, f"{key}.authorizedKeys[{j}]", problem)
    if path := config.auth.authorized_keys_file:
        try:
            _, problems = read_authorized_keys(path)
        except OSError:
            pass  # read again at start-up, which fails naming the file (as for host keys)
        else:
            if problems:
                number, problem = problems[0]
                raise ConfigError(file, "auth.authorizedKeysFile", f"`{path}` line {number}: {problem}")
    for i, path in enumerate(config.auth.trusted_user_ca_keys):
        try:
            _, problems = read_ca_keys(path)
        except OSError:
            pass  # read again at start-up, which fails naming the file (as for authorizedKeysFile)
        else:
            if problems:
                number, problem = problems[0]
                raise ConfigError(file, f"auth.trustedUserCAKeys[{i}]",
                                  ca_file_problem(path, number, problem))
    for i, path in enumerate(config.ssh.hostkeys):
        _check_host_key(file, f"ssh.hostkeys[{i}]", path)
    _check_http_client(file, "auth.webhook", config.auth.webhook, config.auth.webhook.auth_timeout)
    _check_http_client(file, "configserver", config.configserver, config.configserver.config_timeout)
    for section in ("metrics", "health"):
        listen = getattr(config, section).listen
        if listen is not None and listen.port and listen == config.ssh.listen:
            raise ConfigError(file, f"{section}.listen", "is ssh.listen's address")
    ssh = config.ssh
    if ssh.kex or ssh.ciphers or ssh.macs or ssh.host_key_algorithms:
        # A weak or unknown algorithm is a config error like any other (exit 2), not a failed start.
        from .algorithms import resolve
        try:
            resolve(ssh.profile, kex=ssh.kex or None, ciphers=ssh.ciphers or None, macs=ssh.macs or None,
                    host_key_algs=ssh.host_key_algorithms or None)
        except ValueError as exc:
            key, _, problem = str(exc).partition(": ")
            raise ConfigError(file, key, problem) from None


def _check_forwarding(file: str, config: Config) -> None:
    forwarding = config.forwarding
    if forwarding.connect_timeout <= 0:
        raise ConfigError(file, "forwarding.connectTimeout", "must be greater than 0")
    if config.backend.type == "docker" and forwarding.agent:
        raise ConfigError(file, "forwarding.agent", "the docker backend does not forward the agent (its "
                          "programs run in containers, which cannot reach the server's socket)")
    if config.backend.type == "docker" and forwarding.tcp not in (None, "none"):
        # The server would connect from its own host, past the container's network isolation.
        raise ConfigError(file, "forwarding.tcp", f"`{forwarding.tcp}`: the docker backend does not forward "
                          "TCP (the connections would come from the server's host, not the container)")
    for i, pattern in enumerate(forwarding.permit_open):
        host, colon, port = pattern.rpartition(":")
        if not colon or not host or not (port == "*" or (port.isdigit() and 0 < int(port) < 65536)):
            raise ConfigError(file, f"forwarding.permitOpen[{i}]",
                              f"`{pattern}`: not host:port (`*` for any host or port; IPv6 in brackets)")
    for i, pattern in enumerate(forwarding.permit_listen):
        host, colon, port = pattern.rpartition(":")
        if (colon and not host) or not (port == "*" or (port.isdigit() and int(port) < 65536)):
            raise ConfigError(file, f"forwarding.permitListen[{i}]",
                              f"`{pattern}`: not [host:]port (`*` for any host or port)")


def forward_policy_allows(config: Config, *, app: tuple[bool, bool] | None = None) -> tuple[bool, bool, bool]:
    """forwarding.tcp and forwarding.agent: whether local (direct-tcpip), remote
    (tcpip-forward) and agent forwarding are allowed. Unset, the backend decides: on for
    the local backend's configured users (sshd's defaults for OS users), off for docker.
    ``app``: the server runs an application's own Handler (``--handler``, ``serve(App())``),
    and whether it defines forward_target and agent_target: unset, only what it defines is
    on (local forwarding, agent forwarding); an app that never mentions forwarding lets no
    client reach the server's network, nor bind its ports."""
    local_backend = config.backend.type == "local"
    tcp, agent = config.forwarding.tcp, config.forwarding.agent
    if app is not None and local_backend:
        routes_forwards, serves_agent = app
        tcp = ("local" if routes_forwards else "none") if tcp is None else tcp
        agent = serves_agent if agent is None else agent
    if tcp is None:
        tcp = "all" if local_backend else "none"
    return tcp in ("local", "all"), tcp in ("remote", "all"), local_backend if agent is None else agent


def _check_proxy_protocol(file: str, proxy: ProxyProtocolConfig) -> None:
    key = "ssh.proxyProtocol"
    for i, network in enumerate(proxy.trusted_networks):
        try:
            ipaddress.ip_network(network)
        except ValueError as exc:
            raise ConfigError(file, f"{key}.trustedNetworks[{i}]", f"`{network}` is not an IP network "
                              f"like `10.0.0.0/8` or `192.0.2.7` ({exc})") from None
    if proxy.enabled and not proxy.trusted_networks:
        # Nobody could send a header, and everyone would be refused for sending one: say so now.
        raise ConfigError(file, f"{key}.trustedNetworks",
                          "name at least one network (the load balancers') when proxyProtocol is enabled")
    if proxy.header_timeout <= 0:
        raise ConfigError(file, f"{key}.headerTimeout", "must be greater than 0")


def _check_http_client(file: str, key: str, client: HTTPClientConfig, deadline: float) -> None:
    """A webhook's URL and TLS files, so that a typo is exit 2 at start, not a failed login."""
    if not client.url:
        return
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(client.url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        raise ConfigError(file, f"{key}.url", f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(file, f"{key}.url", f"`{client.url}`: expected http(s)://host[:port][/path]")
    if client.timeout <= 0:
        raise ConfigError(file, f"{key}.timeout", "must be greater than 0")
    if client.timeout > deadline:
        name = "authTimeout" if key == "auth.webhook" else "configTimeout"
        raise ConfigError(file, f"{key}.timeout", f"is longer than {key}.{name} ({deadline:g}s)")
    if parts.scheme == "http":
        for name in ("cacert", "cert", "key"):
            if getattr(client, name):
                raise ConfigError(file, f"{key}.{name}", "is set but the url is http://, not https://")
        return
    if client.key and not client.cert:
        raise ConfigError(file, f"{key}.key", "is set without cert")
    import ssl
    what = "cacert"
    try:
        ssl_context = ssl.create_default_context(cafile=client.cacert or None)
        if client.cert:
            what = "cert"
            ssl_context.load_cert_chain(client.cert, client.key or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(file, f"{key}.{what}", f"cannot be used: {exc}") from None


# The labels sshspec puts on its containers (and finds them by): not the config's to set.
RESERVED_LABELS = "io.sshspec."


def _check_docker(file: str, config: Config) -> None:
    docker = config.docker
    if config.backend.type == "docker" and not docker.image:
        raise ConfigError(file, "docker.image", "required with backend.type docker")
    host = docker.host
    if host and not host.startswith(("unix:///", "tcp://", "http://", "https://")):
        raise ConfigError(file, "docker.host", f"`{host}`: expected unix:///path or tcp://host:port")
    if docker.tls is not None and host.startswith("unix:"):
        raise ConfigError(file, "docker.tls", "TLS client certificates need a tcp:// host")
    try:
        memory_bytes(docker.memory)
    except ValueError as exc:
        raise ConfigError(file, "docker.memory", str(exc)) from None
    for name in docker.labels:
        if name.startswith(RESERVED_LABELS):
            raise ConfigError(file, f"docker.labels.{name}", f"labels {RESERVED_LABELS}* are sshspec's own")
    for i, mount in enumerate(docker.mounts):
        key = f"docker.mounts[{i}]"
        if not mount.target.startswith("/"):
            raise ConfigError(file, f"{key}.target", f"must be an absolute path, got `{mount.target}`")
        if mount.type == "bind" and not mount.source.startswith("/"):
            raise ConfigError(file, f"{key}.source", "a bind mount's source is an absolute host path")
        if mount.type == "volume" and not mount.source:
            raise ConfigError(file, f"{key}.source", "a volume mount names its volume")
        if mount.type == "tmpfs" and mount.source:
            raise ConfigError(file, f"{key}.source", "a tmpfs mount has no source")
    for name, value in (("idleCommand", docker.idle_command), ("shellCommand", docker.shell_command)):
        if not value:
            raise ConfigError(file, f"docker.{name}", "must name a program")
    agent = docker.agent
    if agent is not None:
        for name, path in (("path", agent.path), ("source", agent.source), ("statusDir", agent.status_dir)):
            if (path or name != "source") and not path.startswith("/"):
                raise ConfigError(file, f"docker.agent.{name}", f"must be an absolute path, got `{path}`")


def _check_host_key(file: str, key: str, path: str) -> None:
    """A private host key must be private, as sshd requires. (One that cannot be read
    fails at start-up, naming the file: a config may be checked on another machine.)"""
    try:
        mode = os.stat(os.path.expanduser(path)).st_mode
    except OSError:
        return
    if mode & 0o077:
        raise ConfigError(file, key, f"`{path}` is accessible by group or others (mode {mode & 0o777:04o}); "
                                     "sshd refuses such a key: chmod 600 it")


_NOT_A_KEY = "not an authorized_keys line (`ssh-ed25519 AAAA... [comment]`)"


_CERT_AUTHORITY = "cert-authority"


def ca_key_problem(text: str) -> str | None:
    """Why `text` is not a CA's public key (a plain key, not a certificate), or None."""
    import asyncssh

    try:
        key = asyncssh.import_public_key(text)
    except (ValueError, asyncssh.KeyImportError):
        try:
            asyncssh.import_certificate(text)
        except (ValueError, asyncssh.KeyImportError):
            return "not a public key (`ssh-ed25519 AAAA... [comment]`)"
        return "a certificate is not a CA key: list the CA's public key (the .pub of `ssh-keygen -s`)"
    if key.algorithm == b"ssh-dss":
        return "a DSA CA signs with SHA-1 only, and SHA-1 certificates are refused"
    return None


def authority_key(line: str) -> str | None:
    """The CA key text of a `cert-authority` authorized_keys line, or None for another line."""
    parts = line.split(None, 1)
    return (parts[1].strip() if len(parts) > 1 else "") if parts and parts[0] == _CERT_AUTHORITY else None


def authorized_key_problem(line: str) -> str | None:
    """Why an authorized_keys line cannot be used, or None for a plain key or a
    `cert-authority` line (a CA trusted for the line's user or users).

    Options (`from=`, `command=`, `restrict`, `principals=`, ...) are refused, not
    ignored: sshspec does not enforce them, and a key meant to run one command or to
    come from one network would otherwise get a shell from anywhere."""
    # Imported here: asyncssh takes ~0.2 s to import and most commands never get here.
    import asyncssh

    text = line.strip()
    # One key per entry: asyncssh would accept several lines, and takes "" as no keys.
    if not text or "\n" in line:
        return _NOT_A_KEY
    try:
        asyncssh.import_public_key(text)
        return None
    except (ValueError, asyncssh.KeyImportError):
        pass
    if (ca := authority_key(text)) is not None:
        if problem := ca_key_problem(ca):
            return f"`cert-authority` line: {problem}"
        return None
    first = re.split(r"[\s,=]", text, maxsplit=1)[0]
    if first == _CERT_AUTHORITY:
        return ("options on a `cert-authority` line are not supported: write `cert-authority <CA key>`; "
                "for other principals than the user name use auth.trustedUserCAKeys with "
                "auth.users[].authorizedPrincipals")
    try:
        asyncssh.import_authorized_keys(text)
    except (ValueError, asyncssh.KeyImportError):
        return _NOT_A_KEY
    if "-cert-" in first:
        return "a certificate is not an authorized key: list the key it certifies"
    return (f"options (`{first}` ...) are not supported: sshspec would not enforce them, so the key "
            "would be allowed more than the line says; list the key without options")


def read_authorized_keys(path: str) -> tuple[list[str], list[tuple[int, str]]]:
    """The usable key lines of an authorized_keys file, and (line number, problem) for
    each line that is not one (comments and blank lines are neither). OSError if it
    cannot be read."""
    keys: list[str] = []
    problems: list[tuple[int, str]] = []
    for number, line in enumerate(Path(os.path.expanduser(path)).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if problem := authorized_key_problem(line):
            problems.append((number, problem))
        else:
            keys.append(line.strip())
    return keys, problems


def read_ca_keys(path: str) -> tuple[list[str], list[tuple[int, str]]]:
    """The CA keys of an auth.trustedUserCAKeys file (sshd's TrustedUserCAKeys: one
    public key a line, `#` comments), and (line number, problem) for each line that is
    not one. OSError if it cannot be read."""
    keys: list[str] = []
    problems: list[tuple[int, str]] = []
    for number, line in enumerate(Path(os.path.expanduser(path)).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if problem := ca_key_problem(line.strip()):
            problems.append((number, problem))
        else:
            keys.append(line.strip())
    if not keys and not problems:
        problems.append((0, "no CA key in the file"))  # (line 0: the file as a whole)
    return keys, problems


def ca_file_problem(path: str, number: int, problem: str) -> str:
    return f"`{path}` line {number}: {problem}" if number else f"`{path}`: {problem}"


def resolve_state_dir(config: Config) -> Path:
    """`stateDir`, or $XDG_STATE_HOME/sshspec, or ~/.local/state/sshspec."""
    if config.state_dir:
        return Path(config.state_dir).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec says to ignore a relative value.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "sshspec"


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, ByteSize):
        return int(obj)
    if isinstance(obj, Duration):
        return int(obj) if obj.is_integer() else float(obj)  # a plain number is seconds
    if isinstance(obj, MaxStartups):
        return str(obj) if obj.early_drop else obj.full
    if isinstance(obj, NetBlockSize | Network):
        return str(obj)
    raise NotImplementedError(type(obj))


def dump_config(config: Config) -> bytes:
    """The config as YAML that `load_config` reads back to an equal Config."""
    data = msgspec.to_builtins(config, enc_hook=_enc_hook)
    # Listen is a tuple subclass, which msgspec encodes as an array without asking a hook.
    data["ssh"]["listen"] = str(config.ssh.listen)
    for section in ("metrics", "health"):
        listen = getattr(config, section).listen
        if listen is not None:
            data[section]["listen"] = str(listen)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode("utf-8")


def _schema_hook(type_: type) -> dict[str, Any]:
    if type_ is Duration:
        return {
            "description": "seconds: `500ms`, `120s`, `2m`, `1h`, `1m30s`, or a number",
            "anyOf": [
                {"type": "string", "pattern": f"^(?:{_DURATION.pattern})$"},
                {"type": "number", "minimum": 0},
            ],
        }
    if type_ is Listen:
        return {"type": "string", "description": "host:port, IPv6 as [::1]:2222"}
    if type_ is ByteSize:
        return {
            "description": "bytes: `64KiB`, `8MiB`, `1GiB` (kB, MB, GB: powers of 1000), or a number",
            "anyOf": [
                {"type": "string", "pattern": f"^(?:{_BYTE_SIZE.pattern})$"},
                {"type": "integer", "minimum": 0},
            ],
        }
    if type_ is MaxStartups:
        return {"description": "`start:rate:full` (OpenSSH's random early drop) or the hard limit alone",
                "anyOf": [{"type": "string", "pattern": r"^\d+(:\d+:\d+)?$"},
                          {"type": "integer", "minimum": 1}]}
    if type_ is NetBlockSize:
        return {"description": "`v4bits:v6bits`, e.g. `32:64` (an int: the IPv4 bits)",
                "anyOf": [{"type": "string", "pattern": r"^\d+(:\d+)?$"}, {"type": "integer", "minimum": 0}]}
    if type_ is Network:
        return {"type": "string", "description": "a network, `10.0.0.0/8` or `2001:db8::/32`, or an address"}
    raise NotImplementedError(type_)


def config_schema() -> dict[str, Any]:
    """JSON Schema of the config file (for editors and `sshspec config --schema`)."""
    return msgspec.json.schema(Config, schema_hook=_schema_hook)
