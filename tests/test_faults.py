"""Faults: clients that die at every phase, and backends that fail.

Every client goes through `Proxy`, a TCP relay in the test, so a fault is
injected on the relay's socket to the server and never under a client library:
`close` (FIN), `rst` (SO_LINGER 0, the kernel sends RST) and `vanish` (the
relay stops forwarding in both directions and keeps both sockets open, as a
peer behind a dead NAT). The server is then watched from the outside only: its
log (every connection ends with SSH_DISCONNECTED and `sshspec check --complete`
replays it), its open file descriptors and its child processes (/proc). Asyncio
tasks are not visible from outside the process; the server has no debug
endpoint for them on purpose, and a leaked task that holds anything shows up
as a leaked fd or child.

The helpers at the top (`Proxy`, /proc readers, `LogTail`, handler apps served
with `--handler test_faults:...`) are shared with test_limits.py and
test_hostile.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import paramiko
import pytest

from conftest import PASSWORD, TEST_LOGS, USERNAME, LiveServer
from sshspec.adapters.backend_local import LocalBackend
from sshspec.adapters.handlers import (
    AuthVerdict,
    ConnectionHandler,
    ConnectionInfo,
    Handler,
    LocalSession,
    SessionHandler,
    SessionIO,
)

HOST = "127.0.0.1"

# --------------------------------------------------------------------------- shared: polling


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.02) -> Any:
    """Poll `predicate` (bounded); returns its first truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- shared: /proc


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> set[int]:
    """Direct children of `pid` (every thread's list)."""
    out: set[int] = set()
    with contextlib.suppress(OSError):  # gone meanwhile: ENOENT, or ESRCH mid-exit
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out |= {int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()}
    return out


def is_guard(pid: int) -> bool:
    """The server's guard (adapters/guard.py), a child for as long as the server lives."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(arg.endswith(b"/adapters/guard.py") for arg in argv)


def descendants(pid: int) -> set[int]:
    """The session programs of server `pid` and their children (not its guard)."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in out and not is_guard(child):
                out.add(child)
                todo.append(child)
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def cpu_ns(pid: int) -> int:
    """CPU time of one process in ns (/proc/PID/schedstat; clock ticks from
    /proc/PID/stat are too coarse for a program as cheap as `yes`)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def written(pid: int) -> int:
    """Bytes the process has written so far (/proc/PID/io wchar)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar")


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def stderr_problems(live: LiveServer) -> list[str]:
    """Lines of the server's stderr that look like a crash or an unhandled error."""
    bad = ("Traceback", "Error", "exception", "Exception")
    return [line for line in live.stderr_lines if any(word in line for word in bad)]


# --------------------------------------------------------------------------- shared: the log


class LogTail:
    """Reads a server's JSON log incrementally (the tests that send thousands of
    requests must not re-read the whole file every time)."""

    def __init__(self, live: LiveServer) -> None:
        self.live = live
        self.offset = 0
        self.records: list[dict[str, Any]] = []
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        import json
        if not self.live.log.exists():
            return []
        with open(self.live.log, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        new = [json.loads(line) for line in lines if line.strip()]
        self.records.extend(new)
        return new

    def wait(self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float = 10.0,
             what: str = "log condition") -> Any:
        def check() -> Any:
            self.poll()
            return predicate(self.records)
        return wait_until(check, timeout, what, interval=0.005)


def connection_of(records: list[dict[str, Any]], remote_addr: str) -> str | None:
    """The connectionId the server gave the TCP connection from `remote_addr`."""
    for r in records:
        if r["code"] == "SSH_CONNECTED" and r["labels"].get("remoteAddr") == remote_addr:
            return str(r["labels"]["connectionId"])
    return None


def codes_of(records: list[dict[str, Any]], cid: str) -> list[str]:
    return [r["code"] for r in records if r["labels"].get("connectionId") == cid]


def by_connection(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        cid = r["labels"].get("connectionId")
        if cid:
            out.setdefault(cid, []).append(r)
    return out


def limited(factory: Callable[..., LiveServer], config: dict[str, Any], limits: dict[str, int],
            **kwargs: Any) -> LiveServer:
    """A server whose spec limits differ from the specs' defaults (`limits`, by their
    spec names, must say the same as `config`). Its log goes to
    `.test-logs/limits/<name=value,...>/`: `make test` replays `.test-logs/*.jsonl`
    with the default limits, which such a log would not satisfy."""
    log_dir = TEST_LOGS / "limits" / ",".join(f"{k}={v}" for k, v in sorted(limits.items()))
    log_dir.mkdir(parents=True, exist_ok=True)
    live = factory(config, log_dir=log_dir, **kwargs)
    live.spec_limits = dict(limits)  # type: ignore[attr-defined]
    return live


def check_log(live: LiveServer, **limits: int) -> None:
    """Stop the server (SIGTERM: it must exit 0), then `sshspec check --complete` on
    its log with the limits it ran with."""
    import io

    from sshspec.adapters.check import check_logs
    limits = {**getattr(live, "spec_limits", {}), **limits}
    assert live.stop() == 0
    out = io.StringIO()
    status = check_logs([str(live.log)], limits=limits, complete=True, out=out, err=out)
    assert status == 0, out.getvalue()


def check_all_disconnected(records: list[dict[str, Any]]) -> None:
    for cid, recs in by_connection(records).items():
        codes = [r["code"] for r in recs]
        assert codes.count("SSH_CONNECTED") == 1 and codes.count("SSH_DISCONNECTED") == 1, (cid, codes)
        assert codes[-1] == "SSH_DISCONNECTED", (cid, codes)


# --------------------------------------------------------------------------- shared: the relay

FAULTS = ("close", "rst", "vanish")


@dataclass(eq=False)
class Link:
    """One relayed connection: `client` (the test's client) <-> `upstream` (the server)."""

    client: socket.socket
    upstream: socket.socket
    client_port: int  # the client's local port, to find the link
    server_side: str  # "127.0.0.1:port" of the upstream socket: the server's remoteAddr label
    to_server: int = 0  # bytes relayed client -> server
    to_client: int = 0
    buf_up: bytearray = field(default_factory=bytearray)
    buf_down: bytearray = field(default_factory=bytearray)
    frozen: bool = False
    closed: bool = False
    upstream_eof: bool = False  # the server closed its side


class Proxy:
    """A TCP relay on 127.0.0.1 with faults on demand (one thread, non-blocking)."""

    HIGH = 256 * 1024  # stop reading a side while this much is waiting for the other

    def __init__(self, target_port: int) -> None:
        self.target = (HOST, target_port)
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(512)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.links: list[Link] = []
        self.cond = threading.Condition()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._ops: list[Callable[[], None]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="test-proxy")
        self._thread.start()

    # -- for the tests

    def link_for(self, client_port: int, timeout: float = 10.0) -> Link:
        def find() -> Link | None:
            with self.cond:
                return next((lk for lk in self.links if lk.client_port == client_port), None)
        return wait_until(find, timeout, f"the relay to accept port {client_port}")

    def wait(self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "relay") -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}")
                self.cond.wait(left)

    def fault(self, link: Link, mode: str) -> None:
        """Inject `mode` on `link` (from any thread); returns once it is done."""
        done = threading.Event()

        def op() -> None:
            if mode == "vanish":
                link.frozen = True
                self._update(link)
            else:
                self._close(link, rst=mode == "rst")
            done.set()
        self._call(op)
        assert done.wait(5), "relay did not apply the fault"

    def close(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(5)
        for link in self.links:
            for s in (link.client, link.upstream):
                with contextlib.suppress(OSError):
                    s.close()
        self.listener.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the relay thread

    def _call(self, op: Callable[[], None]) -> None:
        with self.cond:
            self._ops.append(op)
        self._wake_w.send(b"x")

    def _run(self) -> None:
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        while not self._stop:
            for key, events in self._sel.select(1.0):
                sock = key.fileobj
                if sock is self.listener:
                    self._accept()
                elif sock is self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                    with self.cond:
                        ops, self._ops = self._ops, []
                    for op in ops:
                        op()
                else:
                    link: Link = key.data
                    if not link.closed and not link.frozen:
                        self._service(link, sock, events)  # type: ignore[arg-type]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except BlockingIOError:
                return
            upstream = socket.create_connection(self.target, timeout=5)
            for s in (client, upstream):
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            host, port = upstream.getsockname()[:2]
            link = Link(client, upstream, client.getpeername()[1], f"{host}:{port}")
            with self.cond:
                self.links.append(link)
                self.cond.notify_all()
            self._sel.register(client, selectors.EVENT_READ, link)
            self._sel.register(upstream, selectors.EVENT_READ, link)

    def _update(self, link: Link) -> None:
        """Interest: read a side unless frozen or the other direction is backed up;
        write a side while data waits for it."""
        for sock, inbound, outbound in ((link.client, link.buf_up, link.buf_down),
                                        (link.upstream, link.buf_down, link.buf_up)):
            events = 0
            if not link.frozen:
                if len(inbound) < self.HIGH and not (sock is link.upstream and link.upstream_eof):
                    events |= selectors.EVENT_READ
                if outbound:
                    events |= selectors.EVENT_WRITE
            try:
                if events:
                    self._sel.modify(sock, events, link)
                else:
                    self._sel.unregister(sock)
            except KeyError:
                if events:
                    self._sel.register(sock, events, link)
            except ValueError:
                pass

    def _service(self, link: Link, sock: socket.socket, events: int) -> None:
        to_upstream = sock is link.client
        other = link.upstream if to_upstream else link.client
        inbound = link.buf_up if to_upstream else link.buf_down
        outbound = link.buf_down if to_upstream else link.buf_up
        try:
            if events & selectors.EVENT_READ:
                data = sock.recv(65536)
                if not data:
                    if to_upstream:  # the client closed: pass the FIN on
                        with contextlib.suppress(OSError):
                            other.shutdown(socket.SHUT_WR)
                        self._close(link, rst=False)
                        return
                    link.upstream_eof = True
                else:
                    inbound += data
                    with self.cond:
                        if to_upstream:
                            link.to_server += len(data)
                        else:
                            link.to_client += len(data)
                        self.cond.notify_all()
            if events & selectors.EVENT_WRITE and outbound:
                sent = sock.send(outbound)
                del outbound[:sent]
            if inbound:
                with contextlib.suppress(BlockingIOError):
                    sent = other.send(inbound)
                    del inbound[:sent]
            if link.upstream_eof and not link.buf_down:
                self._close(link, rst=False)  # the server closed and all of it was delivered
                return
        except (ConnectionError, OSError):
            self._close(link, rst=False)
            return
        self._update(link)

    def _close(self, link: Link, *, rst: bool) -> None:
        if link.closed:
            return
        link.closed = True
        for s in (link.upstream, link.client):
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            if rst:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                s.close()
        with self.cond:
            self.cond.notify_all()


@contextlib.contextmanager
def relay(live: LiveServer) -> Iterator[Proxy]:
    proxy = Proxy(live.port)
    try:
        yield proxy
    finally:
        proxy.close()


# --------------------------------------------------------------------------- shared: clients


def asyncssh_options(**kwargs: Any) -> dict[str, Any]:
    return {"username": USERNAME, "password": PASSWORD, "known_hosts": None, "client_keys": None,
            "preferred_auth": "password", **kwargs}


def paramiko_transport(port: int, *, timeout: float = 10.0) -> paramiko.Transport:
    """A paramiko transport after key exchange, not authenticated."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    transport = paramiko.Transport(sock)
    transport.banner_timeout = timeout
    transport.start_client(timeout=timeout)
    return transport


MSG_GLOBAL_REQUEST, MSG_REQUEST_SUCCESS, MSG_REQUEST_FAILURE = 80, 81, 82
MSG_CHANNEL_OPEN, MSG_CHANNEL_OPEN_CONFIRMATION, MSG_CHANNEL_OPEN_FAILURE = 90, 91, 92
MSG_CHANNEL_REQUEST, MSG_CHANNEL_SUCCESS, MSG_CHANNEL_FAILURE = 98, 99, 100


def ssh_string(data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return struct.pack(">I", len(raw)) + raw


class RawClient:
    """A paramiko transport used as a protocol-level client: packets are built by
    hand and sent with `transport._send_user_message`, and the replies to channel
    and global requests are recorded in arrival order (paramiko's own handlers
    would close a channel on CHANNEL_FAILURE and drop unexpected replies)."""

    def __init__(self, transport: paramiko.Transport) -> None:
        self.transport = transport
        self.cond = threading.Condition()
        self.channel_replies: list[tuple[int, bool]] = []  # (our channel id, success)
        self.global_replies: list[bool] = []
        self.raw_channels: set[int] = set()  # ours; replies on other channels go to paramiko
        table = dict(transport._channel_handler_table)
        orig_success, orig_failure = table[MSG_CHANNEL_SUCCESS], table[MSG_CHANNEL_FAILURE]
        table[MSG_CHANNEL_SUCCESS] = lambda chan, m: self._record_channel(chan, True, orig_success, m)
        table[MSG_CHANNEL_FAILURE] = lambda chan, m: self._record_channel(chan, False, orig_failure, m)
        transport._channel_handler_table = table  # type: ignore[misc]
        transport._handler_table[MSG_REQUEST_SUCCESS] = lambda m: self._record_global(True)
        transport._handler_table[MSG_REQUEST_FAILURE] = lambda m: self._record_global(False)

    @classmethod
    def login(cls, port: int) -> RawClient:
        transport = paramiko_transport(port)
        transport.auth_password(USERNAME, PASSWORD)
        return cls(transport)

    def _record_channel(self, chan: paramiko.Channel, ok: bool, orig: Any, m: paramiko.Message) -> None:
        if chan.get_id() not in self.raw_channels:
            orig(chan, m)
            return
        with self.cond:
            self.channel_replies.append((chan.get_id(), ok))
            self.cond.notify_all()

    def _record_global(self, ok: bool) -> None:
        with self.cond:
            self.global_replies.append(ok)
            self.cond.notify_all()

    def open_session(self) -> paramiko.Channel:
        """A session channel whose request replies are recorded (not seen by paramiko)."""
        chan = self.transport.open_session(timeout=10)
        self.raw_channels.add(chan.get_id())
        return chan

    def send(self, payload: bytes) -> None:
        """One packet: message type byte + fields, as bytes."""
        m = paramiko.Message()
        m.add_bytes(payload)
        self.transport._send_user_message(m)

    def channel_request(self, chan: paramiko.Channel, name: bytes | str, payload: bytes = b"",
                        want_reply: bool = True) -> None:
        self.send(bytes([MSG_CHANNEL_REQUEST]) + struct.pack(">I", chan.remote_chanid)
                  + ssh_string(name) + bytes([want_reply]) + payload)

    def global_request(self, name: bytes | str, payload: bytes = b"", want_reply: bool = True) -> None:
        self.send(bytes([MSG_GLOBAL_REQUEST]) + ssh_string(name) + bytes([want_reply]) + payload)

    def wait_replies(self, channel: int = 0, glob: int = 0, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.channel_replies) < channel or len(self.global_replies) < glob:
                left = deadline - time.monotonic()
                if left <= 0 or not self.transport.is_active():
                    raise AssertionError(
                        f"replies: {len(self.channel_replies)}/{channel} channel, "
                        f"{len(self.global_replies)}/{glob} global; active={self.transport.is_active()}")
                self.cond.wait(min(left, 0.2))

    def close(self) -> None:
        self.transport.close()


# --------------------------------------------------------------------------- shared: handler apps
# Served with `sshspec serve --handler test_faults:<name>` (tests/ is on the server's PYTHONPATH).


class _Password(Handler):
    """alice / PASSWORD, checked in constant time like the configured handler."""

    async def check_password(self, username: str, password: bytes) -> AuthVerdict:
        import hmac
        ok = hmac.compare_digest(username.encode(), USERNAME.encode()) & \
            hmac.compare_digest(password, PASSWORD.encode())
        return "ok" if ok else "bad"

    def kbdint_supported(self, username: str) -> bool:
        return True


class ShellApp(_Password):
    """The local backend with /bin/sh as the login shell. The fault tests kill
    programs right after they start; with bash as root's shell, a session sources
    ~/.bashrc (bash does so under sshd, seeing SSH_CLIENT), and a `pyenv rehash`
    there killed half-way leaves a lock that stalls every later bash session for
    60 s. Nothing else differs from the configured handler's sessions."""

    def __init__(self) -> None:
        self.backend = LocalBackend(shell="/bin/sh")

    def session(self, conn: ConnectionInfo) -> SessionHandler:
        return LocalSession(self.backend)


class StartRaises(SessionHandler):
    async def start(self, io: SessionIO) -> None:
        raise RuntimeError("the backend blew up in start")


class Flaky(SessionHandler):
    """A session whose every backend call raises, except the program start."""

    def set_env(self, name: str, value: str) -> bool:
        raise RuntimeError("set_env blew up")

    def set_pty(self, pty: Any) -> bool:
        raise RuntimeError("set_pty blew up")

    def signal(self, name: str) -> bool:
        raise RuntimeError("signal blew up")

    async def run(self, io: SessionIO) -> int:
        io.write(b"flaky ran\n")
        await io.stdin.read()  # until the client's EOF
        return 3


class WaitRaises(SessionHandler):
    """The program runs, but its status cannot be obtained."""

    async def run(self, io: SessionIO) -> int:
        io.write(b"about to fail\n")
        raise RuntimeError("wait blew up")


class BrokenApp(_Password):
    """Each session picks its failure by the exec command's first word (see _Dispatch)."""

    def session(self, conn: ConnectionInfo) -> SessionHandler:
        return _Dispatch()


class _Dispatch(SessionHandler):
    """Routes by the exec command's first word: "start" (start raises), "wait" (the
    status cannot be obtained), "noshell" (the local backend with a missing login
    shell), "cat" (the local backend, working), anything else Flaky (env, pty and
    signal raise). Env and pty requests always raise."""

    def __init__(self) -> None:
        super().__init__()
        self._inner: SessionHandler | None = None

    # env and pty before the program: fail like Flaky
    def set_env(self, name: str, value: str) -> bool:
        raise RuntimeError("set_env blew up")

    def set_pty(self, pty: Any) -> bool:
        raise RuntimeError("set_pty blew up")

    def signal(self, name: str) -> bool:
        if self._inner is not None:
            return self._inner.signal(name)
        raise RuntimeError("signal blew up")

    async def start(self, io: SessionIO) -> None:
        kind = (io.command or "").split()[0] if io.command else ""
        if kind == "noshell":
            # The local backend with a login shell that does not exist.
            self._inner = LocalSession(LocalBackend(shell="/nonexistent/shell"))
        elif kind == "cat":
            self._inner = LocalSession(LocalBackend())  # a working program, for the good sessions
        elif kind == "start":
            self._inner = StartRaises()
        elif kind == "wait":
            self._inner = WaitRaises()
        else:
            self._inner = Flaky()
        await self._inner.start(io)

    def started(self) -> None:
        assert self._inner is not None
        self._inner.started()

    async def wait(self) -> Any:
        assert self._inner is not None
        return await self._inner.wait()

    def stdin_data(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.stdin_data(data)

    def stdin_eof(self) -> None:
        if self._inner is not None:
            self._inner.stdin_eof()

    def pause_output(self) -> None:
        if self._inner is not None:
            self._inner.pause_output()

    def resume_output(self) -> None:
        if self._inner is not None:
            self._inner.resume_output()

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()


class ConnectionRaises(_Password):
    """`Handler.connection` itself raises for every other connection."""

    calls = 0

    def connection(self, info: ConnectionInfo) -> ConnectionHandler:
        ConnectionRaises.calls += 1
        if ConnectionRaises.calls % 2 == 0:
            raise RuntimeError("connection() blew up")
        return super().connection(info)

    def session(self, conn: ConnectionInfo) -> SessionHandler:
        return Flaky()


class AuthRaises(_Password):
    """Credential checks raise for the user "boom"."""

    async def check_password(self, username: str, password: bytes) -> AuthVerdict:
        if username == "boom":
            raise RuntimeError("check_password blew up")
        return await super().check_password(username, password)

    def check_publickey(self, username: str, key: object) -> AuthVerdict:
        if username == "boom":
            raise RuntimeError("check_publickey blew up")
        return "bad"

    def kbdint_supported(self, username: str) -> bool:
        if username == "boom":
            raise RuntimeError("kbdint_supported blew up")
        return True

    def accept_user(self, username: str) -> bool:
        return True

    def session(self, conn: ConnectionInfo) -> SessionHandler:
        return Flaky()




# =========================================================================== the tests

VERSION_LINE = b"SSH-2.0-sshspec\r\n"
PHASES = ("version", "kex", "auth", "channel", "request", "streaming")
PREAUTH = ("version", "kex", "auth")


class BackgroundLoop:
    """An asyncio loop in a thread, for asyncssh clients driven from synchronous test code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-loop")
        self._thread.start()

    def submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            self.run(cancel_all(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Driven:
    """A client brought to a phase: its relay link and how to dispose of it."""

    link: Link
    cleanup: Callable[[], None]


class _StallInChallenge(asyncssh.SSHClient):
    def __init__(self, challenged: threading.Event) -> None:
        self.challenged = challenged

    def kbdint_auth_requested(self) -> str:
        return ""

    async def kbdint_challenge_received(self, name: str, instructions: str, lang: str,
                                        prompts: Any) -> list[str]:
        self.challenged.set()
        await asyncio.Event().wait()  # never answers
        return []


def _new_link(proxy: Proxy, before: int) -> Link:
    proxy.wait(lambda: len(proxy.links) > before, 10, "the relay to accept")
    return proxy.links[before]


def drive(phase: str, proxy: Proxy, bg: BackgroundLoop) -> Driven:
    """Bring a fresh client (through `proxy`) to `phase` and return its link."""
    if phase in ("version", "kex"):
        sock = socket.create_connection((HOST, proxy.port))
        link = proxy.link_for(sock.getsockname()[1])
        if phase == "version":
            sock.sendall(b"SSH-2.0-Hal")  # half a version line
            proxy.wait(lambda: link.to_server >= 11 and link.to_client >= len(VERSION_LINE))
        else:
            sock.sendall(b"SSH-2.0-Stall\r\n")  # the server's KEXINIT follows its version
            proxy.wait(lambda: link.to_client > len(VERSION_LINE) and link.to_server >= 15)
        return Driven(link, sock.close)
    if phase == "auth":
        challenged = threading.Event()
        before = len(proxy.links)

        async def stall() -> None:
            await asyncssh.connect(
                HOST, proxy.port, known_hosts=None, client_keys=None, username=USERNAME,
                preferred_auth="keyboard-interactive", client_factory=lambda: _StallInChallenge(challenged))
        fut = bg.submit(stall())
        link = _new_link(proxy, before)
        assert challenged.wait(10), "no keyboard-interactive challenge"
        return Driven(link, fut.cancel)
    if phase in ("channel", "request"):
        client = RawClient.login(proxy.port)
        link = proxy.link_for(client.transport.sock.getsockname()[1])  # type: ignore[union-attr]
        chan = client.open_session()  # confirmed: the server has the channel
        if phase == "request":
            sent = link.to_server
            client.channel_request(chan, "exec", ssh_string("sleep 1000"))
            proxy.wait(lambda: link.to_server > sent)
        return Driven(link, client.close)
    assert phase == "streaming"

    async def stream() -> tuple[asyncssh.SSHClientConnection, int]:
        conn = await asyncssh.connect(HOST, proxy.port, **asyncssh_options())
        proc = await conn.create_process("yes", encoding=None)
        got = 0
        while got < 1024 * 1024:
            got += len(await proc.stdout.read(65536))
        return conn, conn.get_extra_info("sockname")[1]
    conn, port = bg.run(stream())
    return Driven(proxy.link_for(port), lambda: bg.loop.call_soon_threadsafe(conn.abort))


class GoodSession:
    """A session of a well-behaved client, directly to the server, that keeps
    echoing lines while the others fail around it."""

    def __init__(self, live: LiveServer, bg: BackgroundLoop) -> None:
        self.bg = bg

        async def open_() -> tuple[asyncssh.SSHClientConnection, asyncssh.SSHClientProcess]:
            conn = await asyncssh.connect(HOST, live.port, **asyncssh_options())
            return conn, await conn.create_process("cat")
        self.conn, self.proc = bg.run(open_())

    def echo(self, line: str) -> None:
        async def go() -> str:
            self.proc.stdin.write(line + "\n")
            return str(await asyncio.wait_for(self.proc.stdout.readline(), 10))
        assert self.bg.run(go()) == line + "\n"

    def finish(self) -> int | None:
        async def go() -> int | None:
            self.proc.stdin.write_eof()
            await self.proc.wait_closed()
            self.conn.close()
            await self.conn.wait_closed()
            return self.proc.exit_status
        return self.bg.run(go())


def _baseline(live: LiveServer, bg: BackgroundLoop) -> int:
    """Log in once and out again (lazy start-up costs: executor threads...), then
    count the server's fds."""
    async def once() -> None:
        async with asyncssh.connect(HOST, live.port, **asyncssh_options()) as conn:
            await conn.run("true", check=True)
    bg.run(once())
    live.wait_for_code("SSH_DISCONNECTED")
    wait_until(lambda: not descendants(live.process.pid), 10, "no children")
    return fd_count(live.process.pid)


def test_clients_killed_at_every_phase(server_factory) -> None:  # type: ignore[no-untyped-def]
    """6 phases x 3 faults, a well-behaved session running throughout."""
    live: LiveServer = server_factory({"limits": {"loginTimeout": "2s"},
                                       "ssh": {"clientAliveInterval": "300ms"}},
                                      handler="test_faults:ShellApp")
    bg = BackgroundLoop()
    pid = live.process.pid
    try:
        fds = _baseline(live, bg)
        good = GoodSession(live, bg)
        injected: dict[tuple[str, str], str] = {}  # (phase, fault) -> server-side address
        cleanups = []
        with relay(live) as proxy:
            for phase in PHASES:
                for mode in FAULTS:
                    driven = drive(phase, proxy, bg)
                    proxy.fault(driven.link, mode)
                    injected[(phase, mode)] = driven.link.server_side
                    cleanups.append(driven.cleanup)
                    good.echo(f"{phase} {mode}")  # the server keeps serving the others
            # Every faulty connection ends: at once (close, rst), at the login timeout
            # or when keepalives go unanswered (vanish).
            records = live.wait_for(lambda rs: sum(r["code"] == "SSH_DISCONNECTED" for r in rs)
                                    >= 1 + len(injected), 20)
            for cleanup in cleanups:
                cleanup()
        assert good.finish() == 0
        records = live.wait_for(lambda rs: sum(r["code"] == "SSH_DISCONNECTED" for r in rs)
                                >= 2 + len(injected), 10)
        for (phase, mode), addr in injected.items():
            cid = connection_of(records, addr)
            assert cid is not None, (phase, mode)
            codes = codes_of(records, cid)
            assert codes[-1] == "SSH_DISCONNECTED", (phase, mode, codes)
            assert codes.count("SSH_DISCONNECTED") == 1, (phase, mode, codes)
            if phase in PREAUTH:
                # A client killed before it tried to log in (version, kex) left without an
                # attempt; in "auth" its keyboard-interactive challenge was out.
                abandoned = mode != "vanish" and phase != "auth"
                expected = "SSH_HANDSHAKE_ABANDONED" if abandoned else "SSH_HANDSHAKE_FAILED"
                assert codes[-2] == expected, (phase, mode, codes)
                if mode == "vanish":
                    assert "SSH_LOGIN_TIMEOUT" in codes, (phase, mode, codes)
            else:
                assert "SSH_NEW_CHANNEL" in codes and "SSH_CHANNEL_CLOSED" in codes, (phase, mode, codes)
                if mode == "vanish":
                    assert "SSH_KEEPALIVE_NORESP" in codes, (phase, mode, codes)
        check_all_disconnected(records)
        # Nothing leaks: fds and child processes return to the baseline.
        wait_until(lambda: not descendants(pid), 10, "the sessions' programs to be gone")
        wait_until(lambda: fd_count(pid) <= fds, 10, f"fds back to {fds} (now {fd_count(pid)})")
        print(f"faults: {len(injected)} injected ({len(PHASES)} phases x {len(FAULTS)}); "
              f"server fds {fds} -> {fd_count(pid)}, children {len(descendants(pid))}")
    finally:
        bg.close()
    assert not stderr_problems(live), live.stderr_lines
    check_log(live)


# --------------------------------------------------------------------------- backend failures


def _no_tracebacks(live: LiveServer) -> None:
    assert not stderr_problems(live), live.stderr_lines
    assert b"Traceback" not in live.log.read_bytes()


def test_backend_failures_become_failure_replies(server_factory) -> None:  # type: ignore[no-untyped-def]
    live: LiveServer = server_factory(handler="test_faults:BrokenApp")
    bg = BackgroundLoop()
    try:
        good = GoodSession(live, bg)

        async def main() -> None:
            async with asyncssh.connect(HOST, live.port, **asyncssh_options()) as conn:
                with pytest.raises(asyncssh.ChannelOpenError, match="request failed"):
                    await conn.run("start")  # the handler's start raises
                with pytest.raises(asyncssh.ChannelOpenError, match="request failed"):
                    await conn.run("noshell echo hi")  # the login shell does not exist
                with pytest.raises(asyncssh.ChannelOpenError, match="PTY request failed"):
                    await conn.run("flaky", term_type="xterm")  # set_pty raises
                # set_env raises: the env request fails, the program still runs.
                proc = await conn.create_process("flaky", env={"SSHSPEC_X": "1"})
                assert await proc.stdout.readline() == "flaky ran\n"
                proc.send_signal("USR1")  # signal raises: a failure, the program goes on
                await asyncio.to_thread(live.wait_for, lambda rs: any(
                    r["code"] == "SSH_CHANNEL_REQUEST_FAILED" and r["labels"].get("requestType") == "signal"
                    for r in rs))
                proc.stdin.write_eof()
                await proc.wait_closed()
                assert proc.exit_status == 3
                # The program's status cannot be obtained: an abnormal end is reported.
                result = await conn.run("wait")
                assert result.stdout == "about to fail\n" and result.exit_signal is not None
                assert result.exit_signal[0] == "ABRT"
                assert (await conn.run("cat", input="same connection\n")).stdout == "same connection\n"
        asyncio.run(main())
        good.echo("the other connection was never disturbed")
        assert good.finish() == 0
    finally:
        bg.close()
    records = live.wait_for_code("SSH_DISCONNECTED", 2)
    failed = {(r["labels"].get("requestType"), r["labels"].get("reason", "").split(":")[0])
              for r in records if r["code"] == "SSH_CHANNEL_REQUEST_FAILED"}
    assert failed == {("exec", "handler error"), ("exec", "cannot start command with '/nonexistent/shell'"),
                      ("pty-req", "handler error"), ("env", "handler error"), ("signal", "handler error")}
    killed = [r for r in records if r["code"] == "SSH_EXIT_SIGNAL"]
    assert [r["labels"]["reason"] for r in killed] == ["handler error: RuntimeError('wait blew up')"]
    _no_tracebacks(live)
    check_log(live)


def test_connection_handler_raising_ends_only_that_connection(server_factory) -> None:  # type: ignore[no-untyped-def]
    """`Handler.connection` raises for every other connection: each of those is
    logged and closed, and frees its maxStartups slot."""
    live = limited(server_factory, {"limits": {"maxStartups": 2}}, {"maxStartups": 2},
                   handler="test_faults:ConnectionRaises")

    async def main() -> list[bool]:
        outcomes = []
        for _ in range(10):
            try:
                async with asyncssh.connect(HOST, live.port, **asyncssh_options()) as conn:
                    result = await asyncio.wait_for(conn.run("flaky", input="\n"), 20)
                    outcomes.append(result.exit_status == 3)
            except (OSError, asyncssh.Error):
                outcomes.append(False)
        return outcomes
    assert asyncio.run(main()) == [True, False] * 5
    records = live.wait_for_code("SSH_DISCONNECTED", 10)
    codes = [r["code"] for r in records]
    assert "SSH_STARTUPS_EXCEEDED" not in codes
    broken = [cid for cid, recs in by_connection(records).items()
              if [r["code"] for r in recs] == ["SSH_CONNECTED", "SSH_HANDSHAKE_FAILED", "SSH_DISCONNECTED"]]
    assert len(broken) == 5
    assert all("handler error" in r["labels"]["reason"] for r in records
               if r["code"] == "SSH_DISCONNECTED" and r["labels"]["connectionId"] in broken)
    _no_tracebacks(live)
    check_log(live)


def test_auth_handler_raising_is_a_failure_reply(server_factory) -> None:  # type: ignore[no-untyped-def]
    live: LiveServer = server_factory(handler="test_faults:AuthRaises")

    async def attempt(method: str) -> None:
        keys = [asyncssh.generate_private_key("ssh-ed25519")] if method == "publickey" else None
        async with asyncssh.connect(HOST, live.port, **asyncssh_options(
                username="boom", preferred_auth=method, client_keys=keys)):
            pass

    async def main() -> None:
        for method in ("password", "keyboard-interactive", "publickey"):
            with pytest.raises(asyncssh.PermissionDenied):  # an answer, not a lost connection
                await attempt(method)
        async with asyncssh.connect(HOST, live.port, **asyncssh_options()) as conn:
            assert (await asyncio.wait_for(conn.run("flaky", input="\n"), 20)).exit_status == 3
    asyncio.run(main())
    records = live.wait_for_code("SSH_DISCONNECTED", 4)
    unavailable = [(r["labels"]["method"], r["labels"]["reason"]) for r in records
                   if r["code"] == "SSH_AUTH_UNAVAILABLE"]
    assert unavailable == [
        ("password", "handler error: RuntimeError('check_password blew up')"),
        ("keyboard-interactive", "handler error: RuntimeError('kbdint_supported blew up')"),
        ("publickey", "handler error: RuntimeError('check_publickey blew up')"),
    ]
    _no_tracebacks(live)
    check_log(live)


# --- no orphans: programs end when the server dies, however it dies ---------------------------


def _marked(marker: str) -> list[int]:
    """Pids of live processes whose environment holds SSHSPEC_MARK=<marker> (zombies have none)."""
    needle = f"SSHSPEC_MARK={marker}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path(entry.path, "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def _clean_up(marker: str, clients: list[subprocess.Popen[bytes]]) -> None:
    """Whatever a failed test left: the marked programs, then the ssh clients."""
    for pid in _marked(marker):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for client in clients:
        client.kill()
        client.wait()


def _poll(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_programs_and_their_children_end_when_the_server_is_sigkilled(server_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of the server: every program, and every child of theirs (background
    jobs in the program's group, or in groups of their own inside its session, on
    pipes and on a pty), is SIGKILLed by the server's guard within a bounded time."""

    live: LiveServer = server_factory(log_dir=tmp_path)  # a SIGKILLed server's log ends mid-way
    marker = f"{os.getpid()}-{time.monotonic_ns()}"
    mark = f"export SSHSPEC_MARK={marker}; "
    commands = [  # (ssh options, command, marked processes it makes)
        *[((), mark + "exec sleep 60", 1)] * 4,
        *[((), mark + "sh -c 'sleep 60 & sleep 60'", 3)] * 2,  # the inner sh and both sleeps
        (("-tt",), mark + "sleep 60 & sleep 60", 2),
        (("-tt",), mark + "set -m; sleep 60 & sleep 60", 2),  # job control: own process group
    ]
    clients = [subprocess.Popen([*live.ssh_args(*opts), command], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for opts, command, _ in commands]
    expected = sum(n for _, _, n in commands)
    try:
        assert _poll(lambda: len(_marked(marker)) >= expected, 20), _marked(marker)
        live.process.send_signal(signal.SIGKILL)
        live.process.wait(10)
        assert _poll(lambda: not _marked(marker), 5), f"left running: {_marked(marker)}"
    finally:
        _clean_up(marker, clients)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_a_killed_guard_is_replaced_and_knows_the_running_programs(server_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A program can kill the guard (same user): the server starts a new one at its
    next session change and tells it every program still running."""

    live: LiveServer = server_factory(log_dir=tmp_path)
    marker = f"{os.getpid()}-{time.monotonic_ns()}"
    first = subprocess.Popen([*live.ssh_args(), f"SSHSPEC_MARK={marker} exec sleep 60"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _poll(lambda: len(_marked(marker)) == 1, 20)
        # The guard may show up in /proc a moment after the program it watches.
        assert _poll(lambda: len([p for p in children(live.process.pid) if is_guard(p)]) == 1, 5)
        guards = [p for p in children(live.process.pid) if is_guard(p)]
        os.kill(guards[0], signal.SIGKILL)
        # The next program start finds the pipe broken and starts a new guard.
        done = subprocess.run([*live.ssh_args(), "echo ok"], capture_output=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        assert done.stdout == b"ok\n"
        assert _poll(lambda: [p for p in children(live.process.pid) if is_guard(p)] not in ([], guards), 5)
        live.process.send_signal(signal.SIGKILL)
        live.process.wait(10)
        assert _poll(lambda: not _marked(marker), 5), f"left running: {_marked(marker)}"
    finally:
        _clean_up(marker, [first])


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_a_sigkilled_worker_takes_its_programs_along(tmp_path: Path) -> None:
    """--workers: each forked worker has a guard of its own (not its parent's)."""

    from conftest import start_server
    live = start_server(tmp_path, "workers-orphans", extra_args=["--workers", "2"], log_dir=tmp_path)
    marker = f"{os.getpid()}-{time.monotonic_ns()}"
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    clients = [subprocess.Popen([*live.ssh_args(), f"SSHSPEC_MARK={marker} exec sleep 60"], **quiet)
               for _ in range(4)]
    try:
        assert _poll(lambda: len(_marked(marker)) == 4, 20), _marked(marker)
        workers = children(live.process.pid)
        assert len(workers) == 2
        for worker in workers:
            os.kill(worker, signal.SIGKILL)
        assert _poll(lambda: not _marked(marker), 5), f"left running: {_marked(marker)}"
    finally:
        _clean_up(marker, clients)
        live.stop()


def _sessions_then_sigkill(live: LiveServer, count: int) -> list[asyncssh.SSHCompletedProcess]:
    """`count` sessions, each `exit N` on a connection of its own, all at once; the
    server is SIGKILLed the moment the last client has its exit status."""

    async def main() -> list[asyncssh.SSHCompletedProcess]:
        async def one(n: int) -> asyncssh.SSHCompletedProcess:
            async with asyncssh.connect(HOST, live.port, **asyncssh_options()) as conn:
                return await conn.run(f"exit {n}")

        results = await asyncio.gather(*(one(n) for n in range(count)))
        live.process.send_signal(signal.SIGKILL)
        return list(results)

    results = asyncio.run(main())
    live.process.wait(10)
    return results


def test_a_sigkill_loses_no_record_of_what_the_clients_saw(server_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """log.durable (the default): every auth answer, channel open, request outcome
    and exit status a client holds is in the log, though the server was killed right
    after and its 100 ms batch never came."""
    live: LiveServer = server_factory(log_dir=tmp_path)  # a SIGKILLed server's log ends mid-way
    results = _sessions_then_sigkill(live, 20)
    assert sorted(r.exit_status for r in results) == list(range(20))
    records = live.records()
    exits = sorted(r["labels"]["exitCode"] for r in records if r["code"] == "SSH_EXIT")
    assert exits == list(range(20)), exits
    codes = [r["code"] for r in records]
    for code in ("SSH_AUTH_SUCCESSFUL", "SSH_NEW_CHANNEL", "SSH_CHANNEL_REQUEST_SUCCESSFUL"):
        assert codes.count(code) >= 20, (code, codes.count(code))


def test_a_sigkill_loses_batched_records_when_log_is_not_durable(server_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The opt-out, and what the test above guards against: with `log.durable: false`
    the records wait for the batch (here 60 s), and a SIGKILL loses them."""
    live: LiveServer = server_factory({"log": {"durable": False, "flushInterval": "60s"}}, log_dir=tmp_path)
    results = _sessions_then_sigkill(live, 20)
    assert sorted(r.exit_status for r in results) == list(range(20))
    assert not [r for r in live.records() if r["code"] == "SSH_EXIT"]
