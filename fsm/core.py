"""The sans-I/O core: every protocol decision of one server, events in, actions out.

The models are h11's `Connection`, h2's `H2Connection` and aioquic's
`QuicConnection`: no sockets, no asyncio, no clock of its own. An adapter turns
what happens (a packet's meaning, a handler's verdict, a program's end, a timer)
into an event, calls `ConnectionCore.handle(event)`, and carries out the actions
it gets back, in order. What may happen when is decided here and in the spec
tables, nowhere else:

* the connection machine and one session machine per channel, composed: a
  connection that ends closes its channels first; a draining connection
  disconnects when its last channel closes; the server machine is told when
  a connection stops counting as a startup;
* the per-channel request queue: requests are decided one at a time, in
  arrival order, and answered in that order; beyond ``maxQueuedRequests``
  a request is refused at arrival and answered in its turn;
* what a handler's verdict means, checked where it enters: anything but
  ``"ok"``, ``"bad"`` or ``"unavailable"`` is a handler error, never an event;
* the keepalive timer (`get_timer` / `handle_timer`);
* admission per source (`ServerCore.admit`, `SourceTable`): OpenSSH's
  MaxStartups random early drop, PerSourceMaxStartups and PerSourcePenalties,
  decided from the source, the time and a random draw the adapter hands in
  (no clock, no RNG here), named by the server spec's events; a connection
  feeds its source's penalties (failed attempts, how it ended before login).

The seam is typed: the events the core fires and the replies it carries out
are the enums below, and `Machines` refuses specs whose alphabets differ from
them (`SeamError`, naming the event or reply). An ``impossible`` pair (the
spec says the core never fires it there) fails closed: SSH_SPEC_VIOLATION names
machine, state and event, and the connection ends as a protocol error (a
channel's violation closes the channel).

Log records leave through the `LogSink` the adapter gives: the codes of each
step and what the step was about; the sink adds who the connection is.
"""

from __future__ import annotations

import enum
import fnmatch
import heapq
import ipaddress
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import msgspec

from sshspec.fsm.certificates import Certificate, CertificatePolicy, describe, refusal
from sshspec.fsm.machine import Machine, Step
from sshspec.fsm.spec import LoadedSpec, load_spec

# --- the seam: the alphabets the core speaks --------------------------------------------------


class ServerEvent(enum.StrEnum):
    start = "start"
    reuse_failed = "reuse_failed"
    bind_failed = "bind_failed"
    listening = "listening"
    accept = "accept"
    early_drop = "early_drop"
    source_full = "source_full"
    source_penalised = "source_penalised"
    penalty_table_full = "penalty_table_full"
    startup_done = "startup_done"
    proxy_connect = "proxy_connect"
    proxy_header = "proxy_header"
    proxy_header_invalid = "proxy_header_invalid"
    penalty = "penalty"
    penalty_active = "penalty_active"
    penalty_overflow = "penalty_overflow"
    shutdown = "shutdown"
    close_failed = "close_failed"
    drained = "drained"
    deadline = "deadline"


class ServerReply(enum.StrEnum):
    admit = "admit"
    refuse_connection = "refuse_connection"
    read_proxy_header = "read_proxy_header"
    stop_listening = "stop_listening"
    close_all = "close_all"


class ConnectionEvent(enum.StrEnum):
    connected = "connected"
    auth_begin = "auth_begin"
    none_auth = "none_auth"
    password = "password"
    publickey_query = "publickey_query"
    publickey = "publickey"
    kbdint_begin = "kbdint_begin"
    kbdint_response = "kbdint_response"
    attempt_penalised = "attempt_penalised"
    other_method = "other_method"
    auth_ok = "auth_ok"
    auth_bad = "auth_bad"
    auth_unavailable = "auth_unavailable"
    certificate_refused = "certificate_refused"
    challenge = "challenge"
    backend_accepted = "backend_accepted"
    backend_rejected = "backend_rejected"
    global_request = "global_request"
    global_request_malformed = "global_request_malformed"
    session_open = "session_open"
    session_open_failed = "session_open_failed"
    forward_open = "forward_open"
    forward_denied = "forward_denied"
    forward_closed = "forward_closed"
    listen_request = "listen_request"
    listen_denied = "listen_denied"
    listen_bound = "listen_bound"
    listen_failed = "listen_failed"
    listen_cancel = "listen_cancel"
    listen_cancel_unknown = "listen_cancel_unknown"
    forwarded_connection = "forwarded_connection"
    channel_open_unsupported = "channel_open_unsupported"
    channel_open_malformed = "channel_open_malformed"
    channel_closed = "channel_closed"
    reply_send_failed = "reply_send_failed"
    keepalive_due = "keepalive_due"
    keepalive_answered = "keepalive_answered"
    login_timeout = "login_timeout"
    protocol_error = "protocol_error"
    decompression_limit = "decompression_limit"
    untrusted_proxy_header = "untrusted_proxy_header"
    shutdown = "shutdown"
    drained = "drained"
    lost = "lost"
    abandoned = "abandoned"
    buffer_exceeded = "buffer_exceeded"


class ConnectionReply(enum.StrEnum):
    auth_failure = "auth_failure"
    pk_ok = "pk_ok"
    send_challenge = "send_challenge"
    accept_user = "accept_user"
    disconnect_auth = "disconnect_auth"
    disconnect_protocol = "disconnect_protocol"
    disconnect = "disconnect"
    request_failure = "request_failure"
    open_session = "open_session"
    open_forward = "open_forward"
    close_accepted = "close_accepted"
    bind = "bind"
    request_success = "request_success"
    unbind = "unbind"
    reject_channel = "reject_channel"
    reject_channel_type = "reject_channel_type"
    send_keepalive = "send_keepalive"
    drop = "drop"


class SessionEvent(enum.StrEnum):
    env = "env"
    pty_req = "pty_req"
    window_change = "window_change"
    signal = "signal"
    shell = "shell"
    exec = "exec"
    subsystem = "subsystem"
    agent_req = "agent_req"
    agent_denied = "agent_denied"
    not_implemented = "not_implemented"
    unknown_request = "unknown_request"
    malformed_request = "malformed_request"
    request_overflow = "request_overflow"
    request_ok = "request_ok"
    request_failed = "request_failed"
    client_eof = "client_eof"
    data_after_eof = "data_after_eof"
    program_exited = "program_exited"
    program_killed = "program_killed"
    exit_send_failed = "exit_send_failed"
    reply_send_failed = "reply_send_failed"
    close = "close"


class SessionReply(enum.StrEnum):
    success = "success"
    failure = "failure"
    close_stdin = "close_stdin"
    send_exit_status = "send_exit_status"
    send_exit_signal = "send_exit_signal"
    close = "close"


class ForwardEvent(enum.StrEnum):
    connected = "connected"
    refused = "refused"
    timed_out = "timed_out"
    unanswered = "unanswered"
    client_eof = "client_eof"
    target_eof = "target_eof"
    close = "close"


class ForwardReply(enum.StrEnum):
    confirm = "confirm"
    reject = "reject"
    eof_to_target = "eof_to_target"
    eof_to_client = "eof_to_client"
    finish = "finish"
    close = "close"


class SeamError(Exception):
    """A spec the core cannot carry out: its alphabet and the core's differ."""


def check_seam(loaded: LoadedSpec, events: type[enum.StrEnum], replies: type[enum.StrEnum]) -> None:
    """Every reply the spec names has exactly one executor here and there is none
    for a reply the spec lacks; likewise every event the core fires."""
    problems = []
    for what, spec_names, ours in (
        ("event", loaded.spec.events, events),
        ("reply", loaded.spec.replies, replies),
    ):
        for name in sorted(set(spec_names) - {m.value for m in ours}):
            problems.append(f"{loaded.file}: {what} {name!r}: the core has no {what} of that name")
        for name in sorted({m.value for m in ours} - set(spec_names)):
            problems.append(f"{loaded.file}: {what} {name!r}: the core needs it, the spec lacks it")
    if problems:
        raise SeamError("\n".join(problems))


@dataclass(frozen=True)
class Machines:
    """The three specs, compiled with the configured limits and checked against the core."""

    server: Machine
    connection: Machine
    session: Machine
    forward: Machine
    max_queued_requests: int = 32
    # Bytes waiting to be sent to one client, and to all of them (limits.maxBuffered*).
    max_buffered_per_connection: int = 8 << 20
    max_buffered_total: int = 256 << 20

    @classmethod
    def load(
        cls,
        limits: Mapping[str, int] | None = None,
        *,
        max_queued_requests: int = 32,
        max_buffered_per_connection: int = 8 << 20,
        max_buffered_total: int = 256 << 20,
        specs: Mapping[str, LoadedSpec] | None = None,
    ) -> Machines:
        loaded = {
            name: (specs or {}).get(name) or load_spec(name)
            for name in ("server", "connection", "session", "forward")
        }
        check_seam(loaded["server"], ServerEvent, ServerReply)
        check_seam(loaded["connection"], ConnectionEvent, ConnectionReply)
        check_seam(loaded["session"], SessionEvent, SessionReply)
        check_seam(loaded["forward"], ForwardEvent, ForwardReply)
        return cls(
            Machine(loaded["server"], limits),
            Machine(loaded["connection"], limits),
            Machine(loaded["session"], limits),
            Machine(loaded["forward"], limits),
            max_queued_requests,
            max_buffered_per_connection,
            max_buffered_total,
        )


class LogSink(Protocol):
    """Where a step's codes go, with what the step was about (the adapter adds who)."""

    def __call__(
        self,
        codes: tuple[str, ...],
        event: str,
        *,
        channel_id: int | None = None,
        request_type: str | None = None,
        command: str | None = None,
        method: str | None = None,
        reason: str | None = None,
        exit_code: int | None = None,
        signal: str | None = None,
    ) -> None: ...


ServerLogSink = Callable[
    [tuple[str, ...], str, str | None, str | None], None
]  # codes, event, reason, remoteAddr


def violation_reason(machine: Machine, step: Step) -> str:
    return f"{machine.name}: event {step.event!r} in state {step.source!r} is impossible ({step.where})"


# --- the server --------------------------------------------------------------------------------


class ServerCore:
    """The listening service's machine and its admission table. Its replies are
    returned to the adapter."""

    def __init__(self, machines: Machines, log: ServerLogSink, policy: AdmissionPolicy | None = None) -> None:
        self.machine = machines.server
        self.instance = self.machine.new()
        self.log = log
        self.policy = policy or AdmissionPolicy()
        self.sources = SourceTable(self.policy)
        self.full = self.machine.limits["maxStartups"]  # the spec's hard limit

    @property
    def state(self) -> str:
        return str(self.instance.state)

    def handle(
        self, event: ServerEvent, *, reason: str | None = None, remote_addr: str | None = None
    ) -> ServerReply | None:
        step = self.machine.fire(self.instance, event)
        if step.kind == "impossible":
            self.log(step.codes, event, violation_reason(self.machine, step), remote_addr)
            return None
        if step.codes:
            self.log(step.codes, event, reason, remote_addr)
        return ServerReply(step.reply) if step.reply is not None else None

    def admit(self, arrival: Arrival) -> Admission:
        """Which admission event a TCP connection is, in OpenSSH's order: a penalised
        source (or a full table in deny-all mode), then random early drop and the
        hard limit, then the source's own limit. The spec says what each means."""
        table, policy = self.sources, self.policy
        source = table.source(arrival.host, arrival.remote_addr)
        startups = self.instance.startups
        refused = table.refusal(source, arrival.now) if source is not None else None
        event, reason = refused or (ServerEvent.accept, None)
        start = policy.early_drop_start
        if event is ServerEvent.accept and start is not None and start <= startups < self.full:
            rate = policy.early_drop_rate
            p = (rate + (100 - rate) * (startups - start) / (self.full - start)) / 100
            if arrival.draw < p:
                event = ServerEvent.early_drop
                reason = (f"{startups} unauthenticated connections (maxStartups {start}:{rate}:{self.full}): "
                          f"dropped with probability {p:.0%}")
        if event is ServerEvent.accept and source is not None and policy.per_source and startups < self.full:
            have = table.startups_of(source)
            if have >= policy.per_source:
                event = ServerEvent.source_full
                reason = (f"{table.label(source)}: {have} unauthenticated connections "
                          f"(perSourceMaxStartups {policy.per_source})")
        reply = self.handle(event, reason=reason, remote_addr=arrival.remote_addr)
        if reply is not ServerReply.admit:
            return Admission(reply, None)
        table.started(source)
        return Admission(reply, source)

    def startup_done(self, source: Source | None) -> None:
        """An admitted connection authenticated or went away."""
        self.handle(ServerEvent.startup_done)
        self.sources.done(source)

    def penalise(self, source: Source, kind: Penalty, now: float) -> None:
        for event, reason in self.sources.penalise(source, kind, now):
            self.handle(event, reason=reason, remote_addr=source.remote_addr)

    def penalised(self, source: Source, now: float) -> str | None:
        """Why connections from ``source`` are refused now (None: they are not)."""
        return self.sources.penalised(source, now)


# --- what happens: the events the adapter hands the connection core ---------------------------

AUTH_VERDICTS = frozenset({"ok", "bad", "unavailable"})
# Verdicts that fail an attempt (it counts against maxAuthTries, is delayed and penalised).
_FAILED_ATTEMPTS = frozenset({ConnectionEvent.auth_bad, ConnectionEvent.certificate_refused})
START_REQUESTS = frozenset({"shell", "exec", "subsystem"})
AGENT_REQUEST = "auth-agent-req@openssh.com"
AGENT_CHANNEL = "auth-agent@openssh.com"
# Channel requests by type: the ones with an event of their own, and the known
# ones this server does not implement (SSH_NOT_IMPLEMENTED) as opposed to
# types nobody knows (unknown_request).
REQUEST_EVENTS: dict[str, SessionEvent] = {
    "env": SessionEvent.env,
    "pty-req": SessionEvent.pty_req,
    "window-change": SessionEvent.window_change,
    "signal": SessionEvent.signal,
    "shell": SessionEvent.shell,
    "exec": SessionEvent.exec,
    "subsystem": SessionEvent.subsystem,
    AGENT_REQUEST: SessionEvent.agent_req,
}
NOT_IMPLEMENTED = frozenset(
    {"x11-req", "break", "xon-xoff", "keepalive@openssh.com", "eow@openssh.com",
     "simple@putty.projects.tartarus.org", "winadj@putty.projects.tartarus.org"}
)
AUTH_METHODS: dict[str, ConnectionEvent] = {
    "password": ConnectionEvent.password,
    "keyboard-interactive": ConnectionEvent.kbdint_begin,
    "none": ConnectionEvent.none_auth,
}


class _Message(msgspec.Struct, frozen=True, gc=False):
    """An event or an action: immutable, compared by value, cheap to make (each
    connection makes a few dozen; msgspec builds them in C). Subclasses say
    frozen=True again for mypy."""


class Lost(enum.StrEnum):
    """How the transport ended."""

    lost = "lost"
    login_timeout = "login_timeout"
    protocol_error = "protocol_error"
    decompression_limit = "decompression_limit"  # a compressed packet inflated past the bound
    negotiation_failed = "negotiation_failed"  # key exchange: no common algorithm in a class


# --- forwarding policy ------------------------------------------------------------------------

_NO_CERTIFICATE_PORTS = "the certificate does not permit port forwarding (no permit-port-forwarding)"


@dataclass(frozen=True)
class ForwardPolicy:
    """forwarding.tcp and forwarding.permitOpen, as OpenSSH's AllowTcpForwarding and
    PermitOpen mean them: whether a client may forward to targets from the server
    (direct-tcpip: ssh -L, -D, -J) and which. A pattern is ``host:port``; ``*`` in
    either part matches any (the host is matched as the client names it, case
    folded, with fnmatch globs; an IPv6 host is written in brackets: ``[::1]:22``)."""

    local: bool = True
    permit_open: tuple[str, ...] = ("*:*",)
    remote: bool = True
    permit_listen: tuple[str, ...] = ("*",)  # [host:]port patterns (ssh -R); `*` for any
    gateway_ports: bool = False  # False: every listener is bound on loopback, as sshd's GatewayPorts no
    agent: bool = False  # auth-agent-req@openssh.com (ssh -A): off unless the config says (forwarding.agent)
    # forwarding.connectTimeout: for a direct-tcpip's TCP connection to its target, and for
    # the client's answer to the server's forwarded-tcpip / auth-agent channel open.
    connect_timeout: float = 10.0
    # What the user certificate the connection logged in with allows (sshd's rules: without
    # the permit-port-forwarding / permit-agent-forwarding extension, whatever the config says).
    certificate_ports: bool = True
    certificate_agent: bool = True

    def restricted_by(self, cert: Certificate) -> ForwardPolicy:
        """This policy for a connection that logged in with `cert`."""
        return replace(self, certificate_ports=cert.permit_port_forwarding,
                       certificate_agent=cert.permit_agent_forwarding)

    def agent_denial(self) -> str | None:
        """Why an auth-agent-req is denied, or None."""
        if not self.certificate_agent:
            return "the certificate does not permit agent forwarding (no permit-agent-forwarding)"
        return None if self.agent else "forwarding.agent is off"

    def listen_denial(self, host: str, port: int) -> str | None:
        """Why a tcpip-forward for ``host``:``port`` is denied, or None."""
        if not self.certificate_ports:
            return _NO_CERTIFICATE_PORTS
        if not self.remote:
            return "forwarding.tcp does not allow remote forwarding"
        name = host.lower()
        for pattern in self.permit_listen:
            want_host, colon, want_port = pattern.rpartition(":")
            if not colon:
                want_host = "*"
            want_host = want_host.lower().removeprefix("[").removesuffix("]")
            if want_port in ("*", str(port)) and fnmatch.fnmatchcase(name, want_host):
                return None
        return "no forwarding.permitListen pattern matches"

    def bind_address(self, host: str) -> str | None:
        """Where a listener for ``host`` is bound (None: every interface)."""
        if not self.gateway_ports or host.lower() in ("localhost", "127.0.0.1"):
            return "127.0.0.1"
        return None if host in ("", "*", "0.0.0.0") else host

    def denial(self, host: str, port: int) -> str | None:
        """Why a direct-tcpip to ``host``:``port`` is denied, or None."""
        if not self.certificate_ports:
            return _NO_CERTIFICATE_PORTS
        if not self.local:
            return "forwarding.tcp does not allow local forwarding"
        name = host.lower()
        for pattern in self.permit_open:
            want_host, _, want_port = pattern.rpartition(":")
            want_host = want_host.lower()
            if want_host.startswith("[") and want_host.endswith("]"):
                want_host = want_host[1:-1]
            if want_port in ("*", str(port)) and fnmatch.fnmatchcase(name, want_host):
                return None
        return "no forwarding.permitOpen pattern matches"


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- admission: the server's table of sources --------------------------------------------------


class Penalty(enum.StrEnum):
    """What earns a source a penalty (limits.perSourcePenalties' keys)."""

    authfail = "authfail"  # a failed attempt (one that counts against maxAuthTries)
    noauth = "noauth"  # ended before authentication without a failed attempt
    grace_exceeded = "grace-exceeded"  # limits.loginTimeout expired before authentication
    protocol_error = "protocol-error"  # broke the protocol before authentication


@dataclass(frozen=True)
class AdmissionPolicy:
    """The admission rules beyond the spec's hard limit (maxStartups, OpenSSH's
    `full`), as plain values: OpenSSH's MaxStartups random early drop,
    PerSourceMaxStartups, PerSourceNetBlockSize and PerSourcePenalties (9.8).
    The default admits by the spec's limit alone."""

    early_drop_start: int | None = None  # None: no random early drop
    early_drop_rate: int = 30  # percent dropped at `start`, rising to 100 at `full`
    per_source: int = 0  # unauthenticated connections per source; 0: no limit
    ipv4_bits: int = 32  # a source is its address's network block
    ipv6_bits: int = 64
    penalties: Mapping[Penalty, float] = field(default_factory=dict)  # seconds each; empty: none
    penalty_min: float = 15.0  # a source is refused once its penalties pass this
    penalty_max: float = 600.0  # penalties add up to this
    max_sources: int = 65536  # penalised sources kept, per address family
    deny_all_on_overflow: bool = False  # a full table refuses every source not exempt
    exempt: tuple[str, ...] = ()  # networks never penalised ("10.0.0.0/8", "2001:db8::/32")


class Source(_Message, frozen=True):
    """Where a connection comes from, as the admission table groups it: its
    address's network block (`block`, host bits cleared) in an address family."""

    family: int  # 4 or 6
    block: int
    remote_addr: str | None  # the connection's host:port, for the log
    exempt: bool  # in the policy's exempt networks: never penalised


class Arrival(_Message, frozen=True):
    """A TCP connection arrived (`ServerCore.admit` decides)."""

    host: str | None  # the peer's IP address; None: not an IP socket (no per-source rules)
    now: float  # the adapter's monotonic clock, in seconds
    draw: float  # uniform in [0, 1): the random early drop's draw
    remote_addr: str | None = None  # host:port, for the log


class Admission(_Message, frozen=True):
    reply: ServerReply | None
    source: Source | None  # an admitted connection's source: hand it to its core (`Connected`)


class _Penalised:
    """One penalised source: until when, whether it is refused yet, and why."""

    __slots__ = ("expiry", "active", "kind")

    def __init__(self, expiry: float, kind: Penalty) -> None:
        self.expiry = expiry
        self.active = False
        self.kind = kind


class SourceTable:
    """The per-source bookkeeping of admission, sans-I/O like the rest: the
    unauthenticated connections of each source, and the penalties.

    Bounded: a source has a startup count only while it has startups (at most the
    spec's maxStartups in all), and each address family holds at most
    ``max_sources`` penalties; a heap by expiry forgets the expired ones as time
    (handed in) passes. Penalties follow OpenSSH's srclimit.c: each adds its
    seconds to the source's expiry (at most ``penalty_max`` ahead); the source is
    refused once more than ``penalty_min`` is left, until it expires; exempt
    networks are never penalised.
    """

    def __init__(self, policy: AdmissionPolicy) -> None:
        self.policy = policy
        self.exempt = tuple(ipaddress.ip_network(n, strict=False) for n in policy.exempt)
        self.tracked = bool(policy.per_source or any(s > 0 for s in policy.penalties.values()))
        self.startups: dict[tuple[int, int], int] = {}
        self.penalties: dict[int, dict[int, _Penalised]] = {4: {}, 6: {}}
        self.heaps: dict[int, list[tuple[float, int]]] = {4: [], 6: []}

    def source(self, host: str | None, remote_addr: str | None = None) -> Source | None:
        """The source of a peer address; None when nothing is tracked per source or
        the address is not IP."""
        if host is None or not self.tracked:
            return None
        try:
            ip = ipaddress.ip_address(host.partition("%")[0])  # (an IPv6 scope id is no part of it)
        except ValueError:
            return None
        if ip.version == 6 and ip.ipv4_mapped is not None:  # a dual-stack socket's IPv4 peer
            ip = ip.ipv4_mapped
        width, bits = (32, self.policy.ipv4_bits) if ip.version == 4 else (128, self.policy.ipv6_bits)
        shift = width - bits
        return Source(ip.version, int(ip) >> shift << shift, remote_addr,
                      any(ip in net for net in self.exempt))

    def label(self, source: Source) -> str:
        return self._label(source.family, source.block)

    def _label(self, family: int, block: int) -> str:
        if family == 4:
            return f"{ipaddress.IPv4Address(block)}/{self.policy.ipv4_bits}"
        return f"{ipaddress.IPv6Address(block)}/{self.policy.ipv6_bits}"

    # -- unauthenticated connections per source

    def startups_of(self, source: Source) -> int:
        return self.startups.get((source.family, source.block), 0)

    def started(self, source: Source | None) -> None:
        if source is not None:
            key = (source.family, source.block)
            self.startups[key] = self.startups.get(key, 0) + 1

    def done(self, source: Source | None) -> None:
        if source is not None:
            key = (source.family, source.block)
            left = self.startups.get(key, 0) - 1
            if left > 0:
                self.startups[key] = left
            else:
                self.startups.pop(key, None)

    # -- penalties

    def _expire(self, family: int, now: float) -> dict[int, _Penalised]:
        table, heap = self.penalties[family], self.heaps[family]
        while heap and heap[0][0] < now:
            expiry, block = heapq.heappop(heap)
            entry = table.get(block)
            if entry is not None and entry.expiry == expiry:  # (not extended since: that is a later item)
                del table[block]
        return table

    def penalised(self, source: Source, now: float) -> str | None:
        """Why ``source`` is refused now, or None."""
        if source.exempt:
            return None
        entry = self._expire(source.family, now).get(source.block)
        if entry is None or not entry.active:
            return None
        return f"{self.label(source)} penalised for {entry.kind} ({entry.expiry - now:.0f}s left)"

    def refusal(self, source: Source, now: float) -> tuple[ServerEvent, str] | None:
        """The refusal an arriving connection from ``source`` meets, if any."""
        why = self.penalised(source, now)
        if why is not None:
            return ServerEvent.source_penalised, why
        table = self.penalties[source.family]
        if self.policy.deny_all_on_overflow and not source.exempt and len(table) >= self.policy.max_sources:
            return ServerEvent.penalty_table_full, (
                f"{len(table)} IPv{source.family} sources penalised "
                f"(maxSources {self.policy.max_sources}, overflow deny-all)")
        return None

    def penalise(self, source: Source, kind: Penalty, now: float) -> list[tuple[ServerEvent, str]]:
        """Add a penalty; the events it makes (with their reasons), in order."""
        seconds = self.policy.penalties.get(kind, 0.0)
        if source.exempt or seconds <= 0:
            return []
        policy, family, label = self.policy, source.family, self.label(source)
        table = self._expire(family, now)
        out: list[tuple[ServerEvent, str]] = []
        entry = table.get(source.block)
        if entry is None:
            if len(table) >= policy.max_sources:
                full = f"{len(table)} IPv{family} sources penalised (maxSources {policy.max_sources})"
                if policy.deny_all_on_overflow:
                    return [(ServerEvent.penalty_overflow, f"{full}: {label} {kind} not recorded (deny-all)")]
                expiry, block = self._soonest(family)
                del table[block]
                forgot = f"{self._label(family, block)} ({max(0.0, expiry - now):.0f}s left)"
                out.append((ServerEvent.penalty_overflow, f"{full}: forgot {forgot} for {label}"))
            entry = table[source.block] = _Penalised(now, kind)
        was_active = entry.active
        entry.expiry = min(entry.expiry + seconds, now + policy.penalty_max)
        entry.kind = kind
        left = entry.expiry - now
        entry.active = was_active or left > policy.penalty_min
        heap = self.heaps[family]
        heapq.heappush(heap, (entry.expiry, source.block))
        if len(heap) > 2 * len(table) + 64:  # extended entries leave stale items behind: rebuild
            self.heaps[family] = heap = [(e.expiry, b) for b, e in table.items()]
            heapq.heapify(heap)
        state = "refused" if entry.active else f"refused past {policy.penalty_min:g}s"
        reason = f"{label} {kind} +{seconds:g}s: {left:.0f}s, {state}"
        out.append((ServerEvent.penalty_active if entry.active and not was_active else ServerEvent.penalty,
                    reason))
        return out

    def _soonest(self, family: int) -> tuple[float, int]:
        """Pop the entry closest to expiry (the heap may hold stale items; the table is not empty)."""
        table, heap = self.penalties[family], self.heaps[family]
        while True:
            expiry, block = heapq.heappop(heap)
            entry = table.get(block)
            if entry is not None and entry.expiry == expiry:
                return expiry, block


# --- what happens: the events the adapter hands the connection core (continued) ----------------


class Connected(_Message, frozen=True):
    """The adapter took over the admitted socket (``source``: its `Admission`'s)."""

    source: Source | None = None


class KexDone(_Message, frozen=True):
    count: int  # the first key exchange lets authentication begin; re-keys change nothing


class AuthRequested(_Message, frozen=True):
    """A USERAUTH_REQUEST. ``signed``: publickey with a signature (None: not publickey)."""

    method: str
    signed: bool | None = None
    algorithm: str | None = None  # publickey: the key's signature algorithm as the client names it
    now: float = 0.0  # the adapter's monotonic clock (is the source penalised now?)


class Credentials(_Message, frozen=True):
    """The handler's verdict on an attempt's credentials (password, kbd-int response)."""

    verdict: object  # checked here: anything but ok/bad/unavailable is a handler error
    method: str
    reason: str | None = None
    now: float = 0.0  # the adapter's monotonic clock (a failure's penalty starts now)


class KeyChecked(_Message, frozen=True):
    """The handler's verdict on a public key (a query, or before a signature is checked)."""

    verdict: object
    reason: str | None = None


class CertificateChecked(_Message, frozen=True):
    """A publickey request (query or signed) offered an OpenSSH user certificate: the
    core decides on it from the config's trust (`CertificatePolicy`)."""

    certificate: Certificate
    username: str
    host: str | None  # the client's IP address (source-address)
    wall_clock: float  # seconds since the epoch (the validity interval)


class AuthAnswered(_Message, frozen=True):
    """The SSH layer is about to answer an auth request: success, failure, or
    superseded (a newer request came first; the old one gets no answer)."""

    outcome: str
    method: str | None
    now: float = 0.0  # the adapter's monotonic clock (a failure's penalty starts now)


class KbdintChallenge(_Message, frozen=True):
    """Whether the handler offers keyboard-interactive for this user."""

    supported: object
    reason: str | None = None


class KbdintResponse(_Message, frozen=True):
    """USERAUTH_INFO_RESPONSE to our challenge."""

    now: float = 0.0  # the adapter's monotonic clock (is the source penalised now?)


class UserVerdict(_Message, frozen=True):
    """The backend's verdict on the authenticated user."""

    accepted: object
    method: str
    reason: str | None = None


class AuthCompleted(_Message, frozen=True):
    """The SSH layer finished authentication (USERAUTH_SUCCESS went out)."""

    now: float


class GlobalRequest(_Message, frozen=True):
    name: str
    malformed: str | None = None
    overflow: bool = False  # beyond the SSH layer's queue bound: refused at arrival


class ChannelOpen(_Message, frozen=True):
    """A CHANNEL_OPEN; a direct-tcpip one names its target (``host``, ``port``) and
    the client's ``origin`` (the address ssh accepted the forwarded connection from)."""

    kind: str
    malformed: str | None = None
    host: str = ""
    port: int = 0
    origin: str = ""


class ListenRequest(_Message, frozen=True):
    """GLOBAL_REQUEST tcpip-forward (``cancel``: cancel-tcpip-forward) for ``host``:``port``."""

    host: str
    port: int
    cancel: bool = False


class ListenResult(_Message, frozen=True):
    """The bind a `Bind` asked for: the port bound (None: it failed, ``reason`` says why)."""

    port: int | None
    reason: str | None = None


class ForwardedConnection(_Message, frozen=True):
    """A listener (``host``:``port`` as the client asked for it) accepted a TCP
    connection from ``origin_host``:``origin_port``."""

    host: str
    port: int
    origin_host: str
    origin_port: int
    kind: str = "forwarded-tcpip"  # or auth-agent@openssh.com: a program's agent client (ssh -A)


class ForwardConnected(_Message, frozen=True):
    """The TCP connection to a forward's target is made."""

    channel: int


class ForwardFailed(_Message, frozen=True):
    """The TCP connection to a forward's target failed, or the client refused the server's
    channel open (``timed_out``: no answer within the action's timeout)."""

    channel: int
    timed_out: bool
    reason: str


class ForwardEof(_Message, frozen=True):
    """One direction of a forward ended: the client's CHANNEL_EOF (``from_client``)
    or the target's FIN."""

    channel: int
    from_client: bool


class ForwardClosed(_Message, frozen=True):
    """A forward's channel closed (the client closed it, or the target's connection ended)."""

    channel: int
    reason: str | None = None


class SessionOpenFailed(_Message, frozen=True):
    channel: int
    reason: str


class ChannelRequest(_Message, frozen=True):
    """A CHANNEL_REQUEST, decoded by the adapter (``payload``) or not (``malformed``).
    ``command``: the exec command or subsystem name, for the log (the request's records
    carry it, and once the program started every record of its channel)."""

    channel: int
    name: str
    want_reply: bool
    payload: object = None
    malformed: str | None = None
    command: str | None = None


class RequestDone(_Message, frozen=True):
    """The backend decided the request the core asked it about."""

    channel: int
    ok: object  # checked here: anything but a bool is a handler error (the request fails)
    reason: str | None = None


class IoStarted(_Message, frozen=True):
    """The program's I/O flows (the answer to `ProgramStarted`)."""

    channel: int


class ClientEof(_Message, frozen=True):
    channel: int


class DataAfterEof(_Message, frozen=True):
    """CHANNEL_DATA after the client's EOF: the SSH layer dropped it (``size`` bytes)."""

    channel: int
    size: int


class ProgramEnded(_Message, frozen=True):
    channel: int
    exit_code: int | None
    signal: str | None = None
    core_dumped: bool = False
    reason: str | None = None


class ExitSendFailed(_Message, frozen=True):
    channel: int
    reason: str


class ChannelReplied(_Message, frozen=True):
    """How a `ChannelReply` went: sent (``problem`` None), or why it could not be."""

    channel: int
    problem: str | None


class GlobalReplyFailed(_Message, frozen=True):
    reason: str


class ChannelClosed(_Message, frozen=True):
    channel: int
    reason: str | None = None


class KeepaliveResult(_Message, frozen=True):
    answered: bool
    now: float


class Shutdown(_Message, frozen=True):
    """The server is shutting down."""


class Backlog(_Message, frozen=True):
    """The socket's write buffer is past its high-water mark (the client is not
    reading) and the client sent more: ``connection`` bytes wait for this client,
    ``total`` for every client whose buffer is past the mark."""

    connection: int
    total: int


class ConnectionLost(_Message, frozen=True):
    how: Lost
    reason: str
    now: float = 0.0  # the adapter's monotonic clock (an end before login may earn a penalty)
    by_server: bool = False  # the server ended it (a handler error): the client earns nothing


class UntrustedProxyHeader(_Message, frozen=True):
    """A peer outside ssh.proxyProtocol.trustedNetworks began with a PROXY protocol
    header (it would name another source address); nothing of it reached the SSH layer."""

    reason: str


Event = (
    Connected
    | KexDone
    | AuthRequested
    | Credentials
    | KeyChecked
    | CertificateChecked
    | AuthAnswered
    | KbdintChallenge
    | KbdintResponse
    | UserVerdict
    | AuthCompleted
    | GlobalRequest
    | ChannelOpen
    | ListenRequest
    | ListenResult
    | ForwardedConnection
    | ForwardConnected
    | ForwardFailed
    | ForwardEof
    | ForwardClosed
    | SessionOpenFailed
    | ChannelRequest
    | RequestDone
    | IoStarted
    | ClientEof
    | DataAfterEof
    | ProgramEnded
    | ExitSendFailed
    | ChannelReplied
    | GlobalReplyFailed
    | ChannelClosed
    | KeepaliveResult
    | Shutdown
    | Backlog
    | ConnectionLost
    | UntrustedProxyHeader
)

# --- what to do: the actions the adapter carries out ------------------------------------------

# RFC 4253 11.1 / RFC 4254 5.1 reason codes: protocol facts, not I/O.
DISCONNECT_PROTOCOL_ERROR, DISCONNECT_BY_APPLICATION, DISCONNECT_NO_MORE_AUTH_METHODS = 2, 11, 14
OPEN_ADMINISTRATIVELY_PROHIBITED, OPEN_CONNECT_FAILED, OPEN_UNKNOWN_CHANNEL_TYPE = 1, 2, 3


class Disconnect(_Message, frozen=True):
    code: int
    description: str


class AuthAnswer(_Message, frozen=True):
    """How the pending auth request is answered: success, pk_ok and a challenge
    are `ok`; a failure is not."""

    reply: ConnectionReply
    # A failed attempt (one that counts) is answered no sooner than this many seconds
    # after it arrived (auth.failureDelay), and the connection's next attempt is not
    # checked before then either: pipelining attempts does not skip the delay.
    delay: float = 0.0

    @property
    def ok(self) -> bool:
        return self.reply is not ConnectionReply.auth_failure


class KeyAcceptable(_Message, frozen=True):
    """A signed publickey attempt: whether the key may sign (the SSH layer then
    checks the signature and answers; `AuthAnswered` follows)."""

    ok: bool
    delay: float = 0.0  # a refused key fails the attempt: its answer waits as `AuthAnswer.delay` says


class CheckCredentials(_Message, frozen=True):
    """Ask the handler about the credentials of the attempt being checked; answer
    with `Credentials`."""

    method: str


class AdmitUser(_Message, frozen=True):
    """Ask the backend whether the authenticated user may in; answer with `UserVerdict`."""

    method: str


class GlobalReply(_Message, frozen=True):
    ok: bool
    port: int = 0  # a tcpip-forward for port 0: the port bound, sent with the success


class Bind(_Message, frozen=True):
    """Bind a listener for a tcpip-forward (``host``:``port`` as asked; bound on
    ``address``, None: every interface); answer with `ListenResult`."""

    host: str
    port: int
    address: str | None


class Unbind(_Message, frozen=True):
    """Close a listener (its forwarded channels go on)."""

    host: str
    port: int


class OpenForwarded(_Message, frozen=True):
    """Open a forwarded-tcpip channel to the client for the connection the listener
    ``host``:``port`` accepted (answer with `ForwardConnected` or `ForwardFailed`)."""

    channel: int
    host: str
    port: int
    origin_host: str
    origin_port: int
    kind: str = "forwarded-tcpip"  # or auth-agent@openssh.com
    timeout: float = 10.0  # for the client's answer (then `ForwardFailed` with timed_out)


class OpenSession(_Message, frozen=True):
    """Make the backend's session for this channel (it fails with `SessionOpenFailed`)."""

    channel: int


class RejectOpen(_Message, frozen=True):
    code: int
    description: str


class OpenForward(_Message, frozen=True):
    """Connect to a forward's target (answer with `ForwardConnected` or `ForwardFailed`);
    the channel open waits for `ConfirmForward` or `RejectForward`."""

    channel: int
    host: str
    port: int
    timeout: float = 10.0  # for the TCP connection (then `ForwardFailed` with timed_out)


class ConfirmForward(_Message, frozen=True):
    channel: int


class RejectForward(_Message, frozen=True):
    channel: int
    code: int
    description: str


class ForwardSendEof(_Message, frozen=True):
    """Pass one direction's EOF on: to the client (CHANNEL_EOF) or to the target (FIN),
    after what is buffered for it; ``close``: then close both ends (both directions are done)."""

    channel: int
    to_client: bool
    close: bool = False


class CloseForward(_Message, frozen=True):
    """Close a forward's channel and its TCP connection (or abandon the connection attempt)."""

    channel: int


class SendKeepalive(_Message, frozen=True):
    timeout: float


class AskBackend(_Message, frozen=True):
    """Ask the session's backend about a request; answer with `RequestDone`."""

    channel: int
    request: ChannelRequest


class StartProgram(_Message, frozen=True):
    """Start the program a shell/exec/subsystem request names; answer with `RequestDone`.
    ``forced_command``: run this instead, whatever the request (a certificate's
    force-command); the request's own command goes in SSH_ORIGINAL_COMMAND, as sshd does."""

    channel: int
    request: ChannelRequest
    forced_command: str | None = None


class ChannelReply(_Message, frozen=True):
    channel: int
    ok: bool
    request_type: str | None  # None: an overflowed request's (not kept)


class ProgramStarted(_Message, frozen=True):
    """The client has the start's SUCCESS: the program's I/O and its end may flow now.
    Answer with `IoStarted` once it does: what the SSH layer held for the program
    (data, the client's EOF) arrives first, before the next request is decided."""

    channel: int


class CloseStdin(_Message, frozen=True):
    channel: int


class SendExit(_Message, frozen=True):
    """Drain the program's output, send EOF, the exit status or signal, then close."""

    channel: int
    exit_code: int | None
    signal: str | None
    core_dumped: bool


class EndProgram(_Message, frozen=True):
    """The channel is closed (or closing): end its program if it still runs."""

    channel: int


class TerminateProgram(_Message, frozen=True):
    """Shutdown: ask the program to end (SIGTERM); its exit status still goes out."""

    channel: int


class CloseChannel(_Message, frozen=True):
    """Close a channel that runs no program (shutdown, or a channel's spec violation)."""

    channel: int


class Drop(_Message, frozen=True):
    """Close the socket at once, dropping what waits to be sent: the client does not read."""


class ConnectionEnded(_Message, frozen=True):
    """The connection machine reached its final state: release everything."""


Action = (
    Disconnect
    | AuthAnswer
    | KeyAcceptable
    | CheckCredentials
    | AdmitUser
    | GlobalReply
    | OpenSession
    | RejectOpen
    | OpenForward
    | Bind
    | Unbind
    | OpenForwarded
    | ConfirmForward
    | RejectForward
    | ForwardSendEof
    | CloseForward
    | SendKeepalive
    | AskBackend
    | StartProgram
    | ChannelReply
    | ProgramStarted
    | CloseStdin
    | SendExit
    | EndProgram
    | TerminateProgram
    | CloseChannel
    | Drop
    | ConnectionEnded
)

# The actions whose effect the client sees (a reply, a channel opened or refused,
# an exit status, a close, a disconnect). A durable log writes the records of
# every step before these go out, so a server killed at any moment never leaves a
# client holding an answer its log does not have. The rest ask the adapter or the
# backend something, or end a program (its exit status, which the client sees,
# is a SendExit of its own), or release what is already gone.
REACHES_CLIENT: frozenset[type[Action]] = frozenset(
    {
        Disconnect,
        AuthAnswer,
        KeyAcceptable,
        GlobalReply,
        OpenForwarded,
        OpenSession,
        RejectOpen,
        ConfirmForward,
        RejectForward,
        ForwardSendEof,
        CloseForward,
        SendKeepalive,
        ChannelReply,
        ProgramStarted,
        SendExit,
        CloseChannel,
        Drop,
    }
)

DISCONNECTS: dict[str, Disconnect] = {
    ConnectionReply.disconnect_auth: Disconnect(
        DISCONNECT_NO_MORE_AUTH_METHODS, "Too many authentication failures"
    ),
    ConnectionReply.disconnect_protocol: Disconnect(DISCONNECT_PROTOCOL_ERROR, "Protocol error"),
    ConnectionReply.disconnect: Disconnect(DISCONNECT_BY_APPLICATION, "Disconnected by server"),
}
# A channel-open refusal's RFC 4254 reason code, by the spec's reply.
OPEN_FAILURES: dict[str, int] = {
    ConnectionReply.reject_channel: OPEN_ADMINISTRATIVELY_PROHIBITED,
    ConnectionReply.reject_channel_type: OPEN_UNKNOWN_CHANNEL_TYPE,
}
_AUTH_REPLIES = frozenset(
    {
        ConnectionReply.auth_failure,
        ConnectionReply.pk_ok,
        ConnectionReply.send_challenge,
        ConnectionReply.accept_user,
    }
)
_RUNNING = frozenset({"running", "running_pending"})
# The connection states before authentication (the spec's `preauth` group): a
# connection that ends in one of them may earn its source a penalty.
# The states a lost connection earns its source a penalty in: the spec's preauth group but
# authenticated, where the credentials were found valid and only the backend's verdict waits.
_PREAUTH = frozenset({"handshaking", "authenticating", "checking", "querying", "kbdint_round"})
# Before authentication with no attempt nor key check in progress (the spec's abandoned
# transition); with authTries 0 none failed either.
_NO_ATTEMPT = frozenset({"handshaking", "authenticating"})
_LOST_PENALTIES = {
    Lost.login_timeout: Penalty.grace_exceeded,
    Lost.protocol_error: Penalty.protocol_error,
    Lost.decompression_limit: Penalty.protocol_error,
}


# --- one session channel ---------------------------------------------------------------------


@dataclass(slots=True)
class _Overflow:
    """Consecutive overflowed want-reply requests: failures owed in their turn."""

    replies: int


class Session:
    """A session channel's machine and its request queue (the core's, not asyncssh's)."""

    __slots__ = (
        "channel",
        "instance",
        "queue",
        "held",
        "busy",
        "replying",
        "starting_io",
        "started",
        "command",
        "closed",
    )

    def __init__(self, channel: int, instance: Any) -> None:
        self.channel = channel
        self.instance = instance
        self.queue: deque[ChannelRequest | _Overflow] = deque()
        self.held = 0  # requests in the queue (overflow runs not counted)
        self.busy = False  # the head is with the backend
        # A reply is out and the adapter has not said whether it was sent: the
        # next request waits, so a failed send is reported before it (its request, its outcome).
        self.replying: tuple[ChannelRequest | None, bool] | None = None
        self.started = False  # a program started on this channel (at most once)
        self.command: str | None = None  # its exec command or subsystem name (the log's label)
        self.starting_io = False  # ProgramStarted is out, IoStarted not yet back: the queue waits
        self.closed = False

    @property
    def state(self) -> str:
        return str(self.instance.state)


# --- one forward channel ---------------------------------------------------------------------


class Forward:
    """A direct-tcpip channel's machine and what its records name."""

    __slots__ = ("channel", "instance", "target", "kind")

    def __init__(self, channel: int, instance: Any, target: str, kind: str = "direct-tcpip") -> None:
        self.channel = channel
        self.instance = instance
        self.target = target  # host:port, the reason of its records
        self.kind = kind  # direct-tcpip or forwarded-tcpip: its records' requestType

    @property
    def state(self) -> str:
        return str(self.instance.state)


# --- one connection ----------------------------------------------------------------------------


class ConnectionCore:
    """One SSH connection: the connection machine, its sessions, their queues, its timer."""

    def __init__(
        self,
        machines: Machines,
        server: ServerCore,
        log: LogSink,
        *,
        keepalive_interval: float = 0.0,
        refused_key_algorithms: frozenset[str] = frozenset(),
        failure_delay: float = 0.0,
        forwarding: ForwardPolicy | None = None,
        certificates: CertificatePolicy | None = None,
    ) -> None:
        self.machines = machines
        # Which user certificates the config trusts (auth.trustedUserCAKeys, cert-authority).
        self.certificates = certificates or CertificatePolicy()
        # The user certificate the connection logged in with: its force-command runs instead
        # of every program, and without permit-pty no pty is allocated (sshd's rules).
        self.certificate: Certificate | None = None
        self.signed_certificate: Certificate | None = None  # until the SSH layer checked the signature
        self.forwarding = forwarding or ForwardPolicy()
        self.forwards: dict[int, Forward] = {}  # the forward channels opening or open
        # The listeners (ssh -R) by the address and port the client names them with, and
        # the one being bound (global requests are answered in order: one at a time).
        self.listeners: set[tuple[str, int]] = set()
        self.binding: tuple[str, int] | None = None
        self.failure_delay = failure_delay  # auth.failureDelay: see AuthAnswer.delay
        self.source: Source | None = None  # where the connection comes from (per-source admission)
        # Public-key signature algorithms refused whatever the key (SHA-1 ssh-rsa by default).
        self.refused_key_algorithms = refused_key_algorithms
        self.key_refusal: str | None = None  # why the publickey request in progress is refused
        self.machine = machines.connection
        self.instance = self.machine.new()
        self.server = server
        self.log = log
        self.keepalive_interval = keepalive_interval
        self.sessions: dict[int, Session] = {}  # the open session channels
        # Every session with something left to do: the open ones, and closed ones
        # whose queued requests still get their (failed) turns.
        self.channels: dict[int, Session] = {}
        self.next_channel = 0
        self.startup = True  # counts against the server's maxStartups until auth or close
        self.lost = False  # the transport is gone: nothing can be sent any more
        # A signed key's verdict and its reason, until the SSH layer checked the signature.
        self.signed_verdict: tuple[ConnectionEvent, str | None] | None = None
        self.keepalive_at: float | None = None
        self.out: list[Action] = []

    @property
    def state(self) -> str:
        return str(self.instance.state)

    # -- the interface: events in, actions out; the timer

    def handle(self, event: Event) -> list[Action]:
        self.out = []
        _HANDLERS[type(event)](self, event)
        return self.out

    def get_timer(self) -> float | None:
        return self.keepalive_at

    def handle_timer(self, now: float) -> list[Action]:
        self.out = []
        if self.keepalive_at is not None and now >= self.keepalive_at:
            self.keepalive_at = None
            step = self._fire(ConnectionEvent.keepalive_due)
            if step.reply == ConnectionReply.send_keepalive:
                self.out.append(SendKeepalive(self.keepalive_interval))
        return self.out

    # -- firing

    def _fire(
        self,
        event: ConnectionEvent,
        *,
        reason: str | None = None,
        method: str | None = None,
        channel_id: int | None = None,
        request_type: str | None = None,
        now: float | None = None,
    ) -> Step:
        step = self.machine.fire(self.instance, event)
        if step.kind == "impossible":
            self.log(
                step.codes,
                event,
                reason=violation_reason(self.machine, step),
                channel_id=channel_id,
                request_type=request_type,
                method=method,
            )
            if event is not ConnectionEvent.protocol_error and self.state != "closed":
                # Fail closed: the connection ends as a protocol error.
                return self._fire(ConnectionEvent.protocol_error, reason=f"spec violation: {event}")
            return step
        closing = step.target == "closed" and step.source != "closed"
        if closing and reason is None and step.reply in DISCONNECTS:
            # A cut-off names its reason in every record it makes (SSH_AUTH_TOO_MANY_TRIES,
            # SSH_HANDSHAKE_FAILED, SSH_DISCONNECTED): the one the DISCONNECT gives.
            reason = DISCONNECTS[step.reply].description
        if closing and (self.sessions or self.forwards):
            # The connection ends: its channels end first, so SSH_DISCONNECTED
            # stays the connection's last record.
            for session in list(self.sessions.values()):
                self._close_session(session, None)
            for forward in list(self.forwards.values()):
                self._close_forward(forward, "connection closed")
        if step.codes:
            self.log(
                step.codes,
                event,
                reason=reason,
                method=method,
                channel_id=channel_id,
                request_type=request_type,
            )
        # A failed attempt that counts: its answer waits, and its source is penalised.
        failed = event in _FAILED_ATTEMPTS and step.source == "checking"
        if step.reply is not None:
            disconnect = DISCONNECTS.get(step.reply)
            if disconnect is not None:
                if not self.lost:
                    # "Too many authentication failures" says all a client needs (a penalised
                    # source is not told for how long); other reasons go out as logged.
                    fixed = step.reply == ConnectionReply.disconnect_auth
                    self.out.append(Disconnect(disconnect.code, disconnect.description if fixed
                                               else reason or disconnect.description))
            elif step.reply in _AUTH_REPLIES:
                delay = self.failure_delay if failed else 0.0
                self.out.append(AuthAnswer(ConnectionReply(step.reply), delay))
            elif step.reply == ConnectionReply.drop:
                self.out.append(Drop())
        if failed and self.source is not None and now is not None:
            self.server.penalise(self.source, Penalty.authfail, now)
        if closing:
            self.keepalive_at = None
            self._startup_done()
            self.out.append(ConnectionEnded())
        return step

    def _startup_done(self) -> None:
        if self.startup:
            self.startup = False
            self.server.startup_done(self.source)

    def _unless_penalised(self, event: ConnectionEvent, now: float) -> tuple[ConnectionEvent, str | None]:
        """An attempt the spec would check, from a source penalised since this
        connection was admitted, is attempt_penalised instead (and why)."""
        if self.source is None or self.machine.peek(self.instance, event).target != "checking":
            return event, None
        why = self.server.penalised(self.source, now)
        return (ConnectionEvent.attempt_penalised, why) if why is not None else (event, None)

    def _fire_session(
        self,
        session: Session,
        event: SessionEvent,
        *,
        reason: str | None = None,
        request_type: str | None = None,
        command: str | None = None,
        exit_code: int | None = None,
        signal: str | None = None,
    ) -> Step:
        step = self.machines.session.fire(session.instance, event)
        channel = session.channel
        if command is None:  # a request's own, else the channel's program's
            command = session.command
        if step.kind == "impossible":
            self.log(
                step.codes,
                event,
                reason=violation_reason(self.machines.session, step),
                channel_id=channel,
                request_type=request_type,
                command=command,
            )
            if not session.closed:  # fail closed: the channel ends
                self.out.append(CloseChannel(channel))
            return step
        if step.codes:
            self.log(
                step.codes,
                event,
                channel_id=channel,
                request_type=request_type,
                command=command,
                reason=reason,
                exit_code=exit_code,
                signal=signal,
            )
        return step

    # -- the connection's events

    def _connected(self, event: Connected) -> None:
        self.source = event.source
        self._fire(ConnectionEvent.connected)

    def _kex_done(self, event: KexDone) -> None:
        if event.count == 1:
            self._fire(ConnectionEvent.auth_begin)

    def _auth_requested(self, event: AuthRequested) -> None:
        self.signed_verdict = None  # a new request abandons the one in progress
        self.signed_certificate = None
        self.key_refusal = None
        if event.algorithm is not None and event.algorithm in self.refused_key_algorithms:
            self.key_refusal = f"{event.algorithm} signatures (SHA-1) are refused"
        if event.method == "publickey" and event.signed is not None:
            name = ConnectionEvent.publickey if event.signed else ConnectionEvent.publickey_query
        else:
            name = AUTH_METHODS.get(event.method, ConnectionEvent.other_method)
        name, why = self._unless_penalised(name, event.now)
        self._fire(name, method=event.method, reason=why or self._while_admitting())

    def _while_admitting(self) -> str | None:
        """Why a request for authentication ends the connection while the backend decides."""
        if self.state == "authenticated":
            return "authentication request while the backend decides on valid credentials"
        return None

    def _verdict_event(
        self, verdict: object, what: str, reason: str | None
    ) -> tuple[ConnectionEvent, str | None]:
        if isinstance(verdict, str) and verdict in AUTH_VERDICTS:
            return ConnectionEvent(f"auth_{verdict}"), reason
        return ConnectionEvent.auth_unavailable, reason or (
            f"handler error: {what} returned {verdict!r}, not 'ok', 'bad' or 'unavailable'"
        )

    def _credentials(self, event: Credentials) -> None:
        name, reason = self._verdict_event(event.verdict, "check_password", event.reason)
        self._attempt_verdict(name, event.method, reason, event.now)

    def _attempt_verdict(self, name: ConnectionEvent, method: str, reason: str | None, now: float) -> None:
        step = self._fire(name, method=method, reason=reason, now=now)
        if step.target == "authenticated" and step.source != "authenticated":
            self.out.append(AdmitUser(method))

    def _user_verdict(self, event: UserVerdict) -> None:
        accepted, reason = _boolean(event.accepted, "accept_user", event.reason)
        name = ConnectionEvent.backend_accepted if accepted else ConnectionEvent.backend_rejected
        self._fire(name, method=event.method, reason=reason)

    def _key_checked(self, event: KeyChecked) -> None:
        name, reason = self._verdict_event(event.verdict, "check_publickey", event.reason)
        self._key_verdict(name, reason, None)

    def _certificate_checked(self, event: CertificateChecked) -> None:
        cert = event.certificate
        refused = refusal(self.certificates, cert, event.username, event.host, event.wall_clock)
        if refused is None:
            self._key_verdict(ConnectionEvent.auth_ok, None, cert)
        else:
            self._key_verdict(ConnectionEvent.certificate_refused, refused[1], None)

    @property
    def forced_command(self) -> str | None:
        return self.certificate.force_command if self.certificate is not None else None

    def _key_verdict(self, name: ConnectionEvent, reason: str | None,
                     certificate: Certificate | None) -> None:
        if self.key_refusal is not None:  # whatever the handler says of the key itself
            name, reason = ConnectionEvent.auth_unavailable, self.key_refusal
        if self.state == "querying":
            self._fire(name, method="publickey", reason=reason)
        elif self.state == "checking":
            # The signature is checked after the key: the attempt's verdict is
            # fired when the SSH layer answers (AuthAnswered).
            self.signed_verdict = (name, reason)
            self.signed_certificate = certificate
            delay = self.failure_delay if name in _FAILED_ATTEMPTS else 0.0  # fails, and counts
            self.out.append(KeyAcceptable(name == ConnectionEvent.auth_ok, delay))
        else:
            self._fire(name, method="publickey", reason=reason)  # the connection moved on

    def _auth_answered(self, event: AuthAnswered) -> None:
        if self.state not in ("checking", "querying"):
            return  # the answer to a request the machine already settled
        signed, self.signed_verdict = self.signed_verdict, None
        if signed is not None:
            verdict, reason = signed
            if event.outcome == "success":
                self.certificate = cert = self.signed_certificate
                if cert is not None:
                    self.forwarding = self.forwarding.restricted_by(cert)
                self._attempt_verdict(verdict, "publickey", describe(cert) if cert else None, event.now)
            elif verdict == ConnectionEvent.auth_ok:
                self._fire(ConnectionEvent.auth_bad, method=event.method, reason="bad signature",
                           now=event.now)
            else:
                self._fire(verdict, method=event.method, reason=reason, now=event.now)
        elif event.outcome == "failure":
            # The SSH layer answered without asking a handler (an undecodable key).
            self._fire(ConnectionEvent.auth_bad, method=event.method, reason="rejected by the SSH layer",
                       now=event.now)

    def _kbdint_challenge(self, event: KbdintChallenge) -> None:
        if self.state != "checking":
            return  # no attempt is being checked: nothing to challenge
        supported, reason = _boolean(event.supported, "kbdint_supported", event.reason)
        self._fire(
            ConnectionEvent.challenge if supported else ConnectionEvent.auth_unavailable,
            method="keyboard-interactive",
            reason=reason,
        )

    def _kbdint_response(self, event: KbdintResponse) -> None:
        name, why = self._unless_penalised(ConnectionEvent.kbdint_response, event.now)
        step = self._fire(name, method="keyboard-interactive", reason=why or self._while_admitting())
        if step.target == "checking":
            self.out.append(CheckCredentials("keyboard-interactive"))

    def _auth_completed(self, event: AuthCompleted) -> None:
        self._startup_done()
        if self.keepalive_interval > 0:
            self.keepalive_at = event.now + self.keepalive_interval

    def _keepalive_result(self, event: KeepaliveResult) -> None:
        if event.answered:
            self._fire(ConnectionEvent.keepalive_answered)
        if self.state in ("established", "draining"):
            self.keepalive_at = event.now + self.keepalive_interval

    def _global_request(self, event: GlobalRequest) -> None:
        if event.malformed is not None:
            self._fire(
                ConnectionEvent.global_request_malformed, request_type=event.name, reason=event.malformed
            )
        else:
            self._fire(
                ConnectionEvent.global_request,
                request_type=event.name,
                reason="too many pending global requests" if event.overflow else None,
            )
        if not event.overflow:  # (an overflowed one is answered by the SSH layer's queue, in its turn)
            # No global request is served yet: whatever the step, the answer is a failure.
            self.out.append(GlobalReply(False))

    def _listen_request(self, event: ListenRequest) -> None:
        key, where = (event.host, event.port), hostport(event.host, event.port)
        if event.cancel:
            if key in self.listeners:
                step = self._fire(ConnectionEvent.listen_cancel, request_type="cancel-tcpip-forward",
                                  reason=where)
                if step.reply == ConnectionReply.unbind:
                    self.listeners.discard(key)
                    self.out.append(Unbind(*key))
                    self.out.append(GlobalReply(True))
                    return
            else:
                self._fire(ConnectionEvent.listen_cancel_unknown, request_type="cancel-tcpip-forward",
                           reason=f"{where}: no such listener")
            self.out.append(GlobalReply(False))
            return
        denial = self.forwarding.listen_denial(event.host, event.port)
        if denial is not None:
            self._fire(ConnectionEvent.listen_denied, request_type="tcpip-forward",
                       reason=f"{where}: {denial}")
            self.out.append(GlobalReply(False))
            return
        address = self.forwarding.bind_address(event.host)
        about = f"{where}, bound on {hostport(address or '*', event.port)}"
        peek = self.machine.peek(self.instance, ConnectionEvent.listen_request)
        if peek.reply == ConnectionReply.request_failure and peek.target == "established":
            limit = self.machine.limits["maxListenersPerConnection"]
            about = f"{where}: {limit} listeners (forwarding.maxListenersPerConnection)"
        step = self._fire(ConnectionEvent.listen_request, request_type="tcpip-forward", reason=about)
        if step.reply == ConnectionReply.bind:
            self.binding = key
            self.out.append(Bind(event.host, event.port, address))
            return  # answered when the bind is done (ListenResult)
        self.out.append(GlobalReply(False))

    def _listen_result(self, event: ListenResult) -> None:
        if self.binding is None:
            return
        host, asked = self.binding
        self.binding = None
        if event.port is None:
            self._fire(ConnectionEvent.listen_failed, request_type="tcpip-forward",
                       reason=f"{hostport(host, asked)}: {event.reason}")
            self.out.append(GlobalReply(False))
            return
        step = self._fire(ConnectionEvent.listen_bound, request_type="tcpip-forward",
                          reason=hostport(host, event.port))
        if step.reply == ConnectionReply.request_success:
            self.listeners.add((host, event.port))
            self.out.append(GlobalReply(True, event.port if asked == 0 else 0))
        else:  # (draining: a listener that is not kept)
            self.out.append(Unbind(host, event.port))
            self.out.append(GlobalReply(False))

    def _forwarded_connection(self, event: ForwardedConnection) -> None:
        if event.kind == AGENT_CHANNEL:
            target = f"agent of {event.origin_host}"
        else:
            origin = hostport(event.origin_host, event.origin_port)
            target = f"{hostport(event.host, event.port)} from {origin}"
        channel = self.next_channel
        self.next_channel += 1
        about = f"{event.kind} for {target}"
        peek = self.machine.peek(self.instance, ConnectionEvent.forwarded_connection)
        if peek.reply == ConnectionReply.close_accepted and peek.target == "established":
            limit = self.machine.limits["maxForwardsPerConnection"]
            about = f"{about}: {limit} open (forwarding.maxForwardsPerConnection)"
        step = self._fire(ConnectionEvent.forwarded_connection, channel_id=channel,
                          request_type=event.kind, reason=about)
        if step.reply == ConnectionReply.open_forward:
            self.forwards[channel] = Forward(channel, self.machines.forward.new(), target, event.kind)
            self.out.append(OpenForwarded(channel, event.host, event.port, event.origin_host,
                                          event.origin_port, event.kind, self.forwarding.connect_timeout))

    def _channel_open(self, event: ChannelOpen) -> None:
        if event.malformed is not None:
            step = self._fire(
                ConnectionEvent.channel_open_malformed, request_type=event.kind, reason=event.malformed
            )
            text = "Malformed channel open"
        elif event.kind == "direct-tcpip":
            self._forward_open(event)
            return
        elif event.kind != "session":
            step = self._fire(ConnectionEvent.channel_open_unsupported, request_type=event.kind)
            text = f"Unsupported channel type {event.kind!r}"
        else:
            channel = self.next_channel
            self.next_channel += 1
            step = self._fire(ConnectionEvent.session_open, channel_id=channel, request_type="session")
            if step.reply == ConnectionReply.open_session:
                self.sessions[channel] = self.channels[channel] = Session(
                    channel, self.machines.session.new()
                )
                self.out.append(OpenSession(channel))
                return
            text = "Session refused"
        self._reject_open(step, text)

    def _reject_open(self, step: Step, text: str) -> None:
        # Whatever the spec said, nothing opens: a refusal it did not name still refuses.
        self.out.append(RejectOpen(OPEN_FAILURES.get(step.reply or "", OPEN_CONNECT_FAILED), text))

    def _forward_open(self, event: ChannelOpen) -> None:
        target = hostport(event.host, event.port)
        about = f"direct-tcpip to {target} from {event.origin}"
        denial = self.forwarding.denial(event.host, event.port)
        if denial is not None:
            step = self._fire(ConnectionEvent.forward_denied, request_type=event.kind,
                              reason=f"{about}: {denial}")
            self._reject_open(step, f"Port forwarding to {target} not permitted")
            return
        channel = self.next_channel
        self.next_channel += 1
        peek = self.machine.peek(self.instance, ConnectionEvent.forward_open)
        if peek.reply == ConnectionReply.reject_channel:
            limit = self.machine.limits["maxForwardsPerConnection"]
            about = f"{about}: {limit} open (forwarding.maxForwardsPerConnection)"
        step = self._fire(ConnectionEvent.forward_open, channel_id=channel, request_type=event.kind,
                          reason=about)
        if step.reply == ConnectionReply.open_forward:
            self.forwards[channel] = Forward(channel, self.machines.forward.new(), target)
            self.out.append(OpenForward(channel, event.host, event.port, self.forwarding.connect_timeout))
            return
        self._reject_open(step, "Too many forwards")

    def _fire_forward(self, forward: Forward, event: ForwardEvent, reason: str | None = None) -> Step:
        machine = self.machines.forward
        step = machine.fire(forward.instance, event)
        if step.kind == "impossible":
            self.log(step.codes, event, reason=violation_reason(machine, step), channel_id=forward.channel,
                     request_type=forward.kind)
            self._close_forward(forward, f"spec violation: {event}")  # fail closed: the channel ends
            return step
        if step.codes:
            self.log(step.codes, event, channel_id=forward.channel, request_type=forward.kind,
                     reason=f"{forward.target}: {reason}" if reason else forward.target)
        return step

    def _forward_connected(self, event: ForwardConnected) -> None:
        forward = self.forwards.get(event.channel)
        if forward is None:
            return
        if self._fire_forward(forward, ForwardEvent.connected).reply == ForwardReply.confirm:
            self.out.append(ConfirmForward(event.channel))

    def _forward_failed(self, event: ForwardFailed) -> None:
        forward = self.forwards.get(event.channel)
        if forward is None:
            return
        if not event.timed_out:
            failed = ForwardEvent.refused
        elif forward.kind == "direct-tcpip":
            failed = ForwardEvent.timed_out  # the target did not accept in time
        else:
            failed = ForwardEvent.unanswered  # the client did not answer the server's open in time
        step = self._fire_forward(forward, failed, event.reason)
        if step.reply == ForwardReply.reject:
            self.out.append(RejectForward(event.channel, OPEN_CONNECT_FAILED, event.reason))
        if forward.state == "closed":
            self._forward_gone(forward)

    def _forward_eof(self, event: ForwardEof) -> None:
        forward = self.forwards.get(event.channel)
        if forward is None:
            return
        step = self._fire_forward(forward,
                                  ForwardEvent.client_eof if event.from_client else ForwardEvent.target_eof)
        if step.reply in (ForwardReply.eof_to_target, ForwardReply.eof_to_client, ForwardReply.finish):
            self.out.append(ForwardSendEof(event.channel, to_client=not event.from_client,
                                           close=step.reply == ForwardReply.finish))

    def _forward_closed(self, event: ForwardClosed) -> None:
        forward = self.forwards.get(event.channel)
        if forward is not None:
            self._close_forward(forward, event.reason)

    def _close_forward(self, forward: Forward, reason: str | None) -> None:
        if forward.state != "closed":
            step = self._fire_forward(forward, ForwardEvent.close, reason)
            if step.reply == ForwardReply.close:
                self.out.append(CloseForward(forward.channel))
        self._forward_gone(forward)

    def _forward_gone(self, forward: Forward) -> None:
        if self.forwards.pop(forward.channel, None) is not None:
            self._fire(ConnectionEvent.forward_closed, channel_id=forward.channel)

    def _session_open_failed(self, event: SessionOpenFailed) -> None:
        self.sessions.pop(event.channel, None)
        self.channels.pop(event.channel, None)
        step = self._fire(ConnectionEvent.session_open_failed, channel_id=event.channel, reason=event.reason)
        self._reject_open(step, "Session refused by backend")

    def _global_reply_failed(self, event: GlobalReplyFailed) -> None:
        self._fire(ConnectionEvent.reply_send_failed, reason=event.reason)

    def _shutdown(self, event: Shutdown) -> None:
        step = self._fire(ConnectionEvent.shutdown, reason="server shutdown")
        if step.target != "draining" or step.source == "draining":
            return
        # A forward has no program to finish: it is closed at once, as sshd's are.
        for forward in list(self.forwards.values()):
            self._close_forward(forward, "server shutdown")
        if not self.sessions:
            self._fire(ConnectionEvent.drained, reason="server shutdown")
            return
        for session in list(self.sessions.values()):
            if session.state in _RUNNING:
                self.out.append(TerminateProgram(session.channel))
            elif session.state != "exited":
                self.out.append(CloseChannel(session.channel))

    def _backlog(self, event: Backlog) -> None:
        # The bounds are bytes the adapter measures, not counters a spec guard compares:
        # the core compares, the spec says what exceeding one does.
        machines = self.machines
        if event.connection > machines.max_buffered_per_connection:
            reason = (
                f"{event.connection} bytes wait for this client "
                f"(limits.maxBufferedPerConnection {machines.max_buffered_per_connection})"
            )
        elif event.total > machines.max_buffered_total:
            reason = (
                f"{event.total} bytes wait for clients that do not read, {event.connection} of them "
                f"for this one (limits.maxBufferedTotal {machines.max_buffered_total})"
            )
        else:
            return
        self._fire(ConnectionEvent.buffer_exceeded, reason=reason)

    def _connection_lost(self, event: ConnectionLost) -> None:
        if self.lost:
            return
        self.lost = True
        for session in list(self.sessions.values()):
            self._close_session(session, event.reason)
        for forward in list(self.forwards.values()):
            self._close_forward(forward, event.reason)
        how = event.how
        if how is Lost.login_timeout and self.state in ("established", "draining"):
            how = Lost.lost  # the login timer fired as authentication went through
        penalty = None
        if self.state in _PREAUTH and not event.by_server:
            # Failed attempts were penalised as they failed; leaving without one is noauth.
            penalty = _LOST_PENALTIES.get(how) or (Penalty.noauth if not self.instance.authTries else None)
        # A key exchange with nothing in common is a failure like a loss after one (lost),
        # never an abandon: the reason says which class had nothing in common.
        name = ConnectionEvent.lost if how is Lost.negotiation_failed else ConnectionEvent(how.value)
        if (how is Lost.lost and not event.by_server and not self.instance.authTries
                and self.state in _NO_ATTEMPT):
            name = ConnectionEvent.abandoned  # a probe or a client that gave up: nothing failed
        self._fire(name, reason=event.reason)
        if penalty is not None and self.source is not None:
            self.server.penalise(self.source, penalty, event.now)

    def _untrusted_proxy_header(self, event: UntrustedProxyHeader) -> None:
        self._fire(ConnectionEvent.untrusted_proxy_header, reason=event.reason)

    # -- the sessions' events

    def _channel_request(self, event: ChannelRequest) -> None:
        session = self.sessions.get(event.channel)
        if session is None:
            return  # the channel is closed: the SSH layer refuses what follows a close
        if session.held >= self.machines.max_queued_requests:
            # Not kept: refused now, its failure owed in its turn (memory stays bounded).
            self._fire_session(
                session,
                SessionEvent.request_overflow,
                request_type=event.name,
                command=event.command,
                reason="too many pending requests",
            )
            if event.want_reply:
                tail = session.queue[-1] if session.queue else None
                if isinstance(tail, _Overflow):
                    tail.replies += 1
                else:
                    session.queue.append(_Overflow(1))
            return
        session.queue.append(event)
        session.held += 1
        self._pump(session)

    def _pump(self, session: Session) -> None:
        while session.queue and not session.busy and session.replying is None and not session.starting_io:
            head = session.queue[0]
            if isinstance(head, _Overflow):
                head.replies -= 1
                if not head.replies:
                    session.queue.popleft()
                session.replying = (None, False)
                self.out.append(ChannelReply(session.channel, False, None))
                return
            session.busy = True
            self._decide(session, head)
        if (
            session.closed
            and not session.queue
            and not session.busy
            and session.replying is None
            and not session.starting_io
        ):
            self.channels.pop(session.channel, None)

    def _decide(self, session: Session, req: ChannelRequest) -> None:
        name = req.name
        if req.malformed is not None:
            step = self._fire_session(
                session, SessionEvent.malformed_request, request_type=name, reason=req.malformed,
                command=req.command,
            )
        else:
            event = REQUEST_EVENTS.get(name)
            agent_denial = self.forwarding.agent_denial() if event is SessionEvent.agent_req else None
            if agent_denial is not None:
                event = SessionEvent.agent_denied
            if event is None:
                event = (
                    SessionEvent.not_implemented if name in NOT_IMPLEMENTED else SessionEvent.unknown_request
                )
            step = self._fire_session(session, event, request_type=name, command=req.command,
                                      reason=agent_denial)
            if step.kind == "transition" and step.reply is None and step.target != step.source:
                if name == "pty-req" and self.certificate is not None and not self.certificate.permit_pty:
                    # The certificate's restriction answers for the backend, as sshd's
                    # "PTY allocation disabled": the request fails, the session goes on.
                    self._request_done(RequestDone(session.channel, False,
                                                   "the certificate does not permit a pty (no permit-pty)"))
                    return
                # The spec hands the request to the backend.
                self.out.append(
                    StartProgram(session.channel, req, self.forced_command)
                    if name in START_REQUESTS
                    else AskBackend(session.channel, req)
                )
                return
        self._finish(session, req, step.reply == SessionReply.success)

    def _request_done(self, event: RequestDone) -> None:
        session = self.channels.get(event.channel)
        if session is None or not session.busy:
            return
        req = session.queue[0]
        assert isinstance(req, ChannelRequest)
        ok, reason = _boolean(event.ok, "the backend", event.reason)
        step = self._fire_session(
            session,
            SessionEvent.request_ok if ok else SessionEvent.request_failed,
            request_type=req.name,
            command=req.command,
            reason=reason,
        )
        if session.closed and ok and req.name in START_REQUESTS:
            # The channel closed while the program was starting: the close's
            # "end the program" could not reach a program that did not exist yet.
            self.out.append(EndProgram(session.channel))
        self._finish(session, req, step.reply == SessionReply.success)
        self._pump(session)

    def _finish(self, session: Session, req: ChannelRequest, ok: bool) -> None:
        session.queue.popleft()
        session.held -= 1
        session.busy = False
        if req.want_reply:
            session.replying = (req, ok)
            self.out.append(ChannelReply(session.channel, ok, req.name))
            return  # the rest when the adapter says how the send went (ChannelReplied)
        self._answered(session, req, ok)

    def _channel_replied(self, event: ChannelReplied) -> None:
        session = self.channels.get(event.channel)
        if session is None or session.replying is None:
            return
        (req, ok), session.replying = session.replying, None
        if event.problem is not None:
            self._fire_session(
                session,
                SessionEvent.reply_send_failed,
                reason=event.problem,
                request_type=req.name if req is not None else None,
            )
        if req is not None:
            self._answered(session, req, ok)
        self._pump(session)

    def _answered(self, session: Session, req: ChannelRequest, ok: bool) -> None:
        if ok and req.name in START_REQUESTS and not session.started and not session.closed:
            session.started = True
            session.command = self.forced_command or req.command  # what runs
            if session.state in _RUNNING:
                session.starting_io = True
                self.out.append(ProgramStarted(session.channel))

    def _io_started(self, event: IoStarted) -> None:
        session = self.channels.get(event.channel)
        if session is not None and session.starting_io:
            session.starting_io = False
            self._pump(session)

    def _client_eof(self, event: ClientEof) -> None:
        session = self.sessions.get(event.channel)
        if (
            session is not None
            and self._fire_session(session, SessionEvent.client_eof).reply == SessionReply.close_stdin
        ):
            self.out.append(CloseStdin(session.channel))

    def _data_after_eof(self, event: DataAfterEof) -> None:
        session = self.sessions.get(event.channel)
        if session is not None:
            self._fire_session(session, SessionEvent.data_after_eof, reason=f"{event.size} bytes dropped")

    def _program_ended(self, event: ProgramEnded) -> None:
        session = self.channels.get(event.channel)
        if session is None:
            return  # the channel closed and is done: its status can no longer be sent
        if event.signal is not None:
            step = self._fire_session(
                session, SessionEvent.program_killed, signal=event.signal, reason=event.reason
            )
        else:
            step = self._fire_session(session, SessionEvent.program_exited, exit_code=event.exit_code)
        if step.reply in (SessionReply.send_exit_status, SessionReply.send_exit_signal):
            self.out.append(SendExit(session.channel, event.exit_code, event.signal, event.core_dumped))

    def _exit_send_failed(self, event: ExitSendFailed) -> None:
        session = self.channels.get(event.channel)
        if session is not None:
            self._fire_session(session, SessionEvent.exit_send_failed, reason=event.reason)

    def _channel_closed(self, event: ChannelClosed) -> None:
        session = self.sessions.get(event.channel)
        if session is not None:
            self._close_session(session, event.reason)

    def _close_session(self, session: Session, reason: str | None) -> None:
        session.closed = True
        step = self._fire_session(session, SessionEvent.close, reason=reason)
        if step.reply == SessionReply.close:
            self.out.append(EndProgram(session.channel))
        del self.sessions[session.channel]
        if not session.queue:
            del self.channels[session.channel]
        self._fire(ConnectionEvent.channel_closed, channel_id=session.channel)
        if not self.sessions and self.state == "draining" and not self.lost:
            # (A transport that is gone ends the connection with its own event, which
            # `_connection_lost` fires once the channels are closed: the loss, a
            # protocol error, a compression bomb, not a drain.)
            self._fire(ConnectionEvent.drained, reason="server shutdown")


def _boolean(answer: object, what: str, reason: str | None) -> tuple[bool, str | None]:
    """A handler's yes/no, checked where it enters: anything but a bool is a handler
    error, answered as no (the reason says so, unless the handler raised)."""
    if isinstance(answer, bool):
        return answer, reason
    return False, reason or f"handler error: {what} returned {answer!r}, not a bool"


_HANDLERS: dict[type, Callable[[ConnectionCore, Any], None]] = {
    Connected: ConnectionCore._connected,
    KexDone: ConnectionCore._kex_done,
    AuthRequested: ConnectionCore._auth_requested,
    Credentials: ConnectionCore._credentials,
    KeyChecked: ConnectionCore._key_checked,
    CertificateChecked: ConnectionCore._certificate_checked,
    AuthAnswered: ConnectionCore._auth_answered,
    KbdintChallenge: ConnectionCore._kbdint_challenge,
    KbdintResponse: ConnectionCore._kbdint_response,
    UserVerdict: ConnectionCore._user_verdict,
    AuthCompleted: ConnectionCore._auth_completed,
    GlobalRequest: ConnectionCore._global_request,
    ChannelOpen: ConnectionCore._channel_open,
    ListenRequest: ConnectionCore._listen_request,
    ListenResult: ConnectionCore._listen_result,
    ForwardedConnection: ConnectionCore._forwarded_connection,
    ForwardConnected: ConnectionCore._forward_connected,
    ForwardFailed: ConnectionCore._forward_failed,
    ForwardEof: ConnectionCore._forward_eof,
    ForwardClosed: ConnectionCore._forward_closed,
    SessionOpenFailed: ConnectionCore._session_open_failed,
    ChannelRequest: ConnectionCore._channel_request,
    RequestDone: ConnectionCore._request_done,
    IoStarted: ConnectionCore._io_started,
    ClientEof: ConnectionCore._client_eof,
    DataAfterEof: ConnectionCore._data_after_eof,
    ProgramEnded: ConnectionCore._program_ended,
    ExitSendFailed: ConnectionCore._exit_send_failed,
    ChannelReplied: ConnectionCore._channel_replied,
    GlobalReplyFailed: ConnectionCore._global_reply_failed,
    ChannelClosed: ConnectionCore._channel_closed,
    KeepaliveResult: ConnectionCore._keepalive_result,
    Shutdown: ConnectionCore._shutdown,
    Backlog: ConnectionCore._backlog,
    ConnectionLost: ConnectionCore._connection_lost,
    UntrustedProxyHeader: ConnectionCore._untrusted_proxy_header,
}
