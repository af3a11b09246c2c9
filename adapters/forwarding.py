"""TCP forwarding's I/O: one direct-tcpip channel's two ends, the SSH channel and the
TCP connection to the target, with bytes copied both ways under back-pressure.

What happens to the channel (connected, refused, an EOF either way, a close) goes to
the core as an event; what the server does about it (confirm, refuse, pass an EOF
on, close) comes back as the core's actions, carried out here (`Forwarder`'s
methods). Nothing here decides protocol order.

Back-pressure, so that neither side makes the server buffer without bound:
* target -> client: the channel's send buffer has high-water 0, so the target is
  not read while anything waits for the client's window; nor while the SSH
  socket's buffer is past its mark (a client that grants a window and does not
  read: `transport_paused`).
* client -> target: while the target's socket buffer is past its mark, the
  channel is not read (asyncssh then stops adjusting its window): at most one
  window (2 MiB) per forward waits in the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
from typing import TYPE_CHECKING, Any

import asyncssh

from sshspec.adapters import asyncssh_internals as internals
from sshspec.adapters.handlers import ForwardServer, ForwardTarget
from sshspec.fsm import core

if TYPE_CHECKING:
    from sshspec.adapters.server import SpecConnection


class Forwarder(asyncssh.SSHTCPSession[bytes]):
    """One direct-tcpip channel: this is asyncssh's session for it (the channel's side);
    `_Target` is the TCP connection's protocol."""

    def __init__(self, conn: SpecConnection, channel: int) -> None:
        self.conn = conn
        self.channel = channel
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        # The core's verdict on the open (ConfirmForward / RejectForward / CloseForward):
        # asyncssh holds CHANNEL_OPEN_CONFIRMATION until it is set.
        self.decided: asyncio.Future[None] = loop.create_future()
        self.connecting: asyncio.Task[None] | None = None
        self.serving: asyncio.Task[None] | None = None  # a handler serving the forward in-process
        self.started = False  # asyncssh opened the channel: the target may be read ...
        self.confirmed = False  # ... once the core confirmed it
        self.abandoned = False  # the server's open to the client timed out, or the forward closed first
        self.chan_full = False  # something waits for the client's window
        self.socket_full = False  # the SSH socket's buffer is past its mark

    # -- the open

    def connect(self, target: ForwardTarget, timeout: float, refusal: str | None = None) -> None:
        """direct-tcpip: connect to the target the handler named (or serve it in-process);
        None: the handler refused it (``refusal``: why, when it raised)."""
        self.connecting = asyncio.get_running_loop().create_task(self._connect(target, timeout, refusal))

    async def _connect(self, target: ForwardTarget, timeout: float, refusal: str | None) -> None:
        loop = asyncio.get_running_loop()
        event: core.Event
        try:
            if target is None:
                raise OSError(f"refused by the handler: {refusal}" if refusal else "refused by the handler")
            if callable(target):
                transport = await self._serve_in_process(target)
            else:
                host, port = target
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(lambda: _Target(self), host, port), timeout)
        except TimeoutError:
            event = core.ForwardFailed(self.channel, True, f"no connection within {timeout:g}s "
                                                           "(forwarding.connectTimeout)")
        except OSError as exc:
            event = core.ForwardFailed(self.channel, False, exc.strerror or str(exc))
        else:
            self.transport = transport
            event = core.ForwardConnected(self.channel)
        self.connecting = None
        self.conn.handle(event)
        if not self.confirmed:
            self._close_target()  # refused, or the channel closed meanwhile

    async def _serve_in_process(self, serve: ForwardServer) -> asyncio.Transport:
        """The handler serves the forward itself: its end of a socket pair is its reader
        and writer (the kernel's buffers give both directions their back-pressure)."""
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=theirs)
        self.serving = asyncio.get_running_loop().create_task(self._serve(serve, reader, writer))
        transport, _ = await asyncio.get_running_loop().create_connection(lambda: _Target(self), sock=ours)
        return transport

    @staticmethod
    async def _serve(serve: ForwardServer, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            await serve(reader, writer)
        finally:
            writer.close()

    def open_to_client(self, conn: asyncssh.SSHServerConnection, host: str, port: int,
                       origin_host: str, origin_port: int, timeout: float) -> None:
        """forwarded-tcpip: the channel to the client for the connection a listener accepted
        (`attach` gives it first)."""
        self.connecting = asyncio.get_running_loop().create_task(
            self._open_to_client(conn, host, port, origin_host, origin_port, timeout))

    def open_agent(self, conn: asyncssh.SSHServerConnection, timeout: float) -> None:
        """auth-agent@openssh.com: the channel to the client's agent for an agent client of a session."""
        self.connecting = asyncio.get_running_loop().create_task(
            self._open_to_client(conn, None, 0, "", 0, timeout))

    async def _open_to_client(self, conn: asyncssh.SSHServerConnection, host: str | None, port: int,
                              origin_host: str, origin_port: int, timeout: float) -> None:
        # The open goes on by itself (shielded): the client's answer may come after the
        # timeout, or after the channel was closed; `_answered` closes such a channel.
        opening = asyncio.get_running_loop().create_task(
            self._open_channel(conn, host, port, origin_host, origin_port))
        opening.add_done_callback(self._answered)
        event: core.Event
        try:
            await asyncio.wait_for(asyncio.shield(opening), timeout)
        except TimeoutError:
            self.abandoned = True
            event = core.ForwardFailed(self.channel, True, f"the client did not answer the channel open "
                                                           f"within {timeout:g}s (forwarding.connectTimeout)")
        except asyncssh.ChannelOpenError as exc:
            event = core.ForwardFailed(self.channel, False, f"the client refused the channel: {exc.reason}")
        else:
            event = core.ForwardConnected(self.channel)
        self.connecting = None
        self.conn.handle(event)
        if not self.confirmed:
            self._close_target()

    async def _open_channel(self, conn: asyncssh.SSHServerConnection, host: str | None, port: int,
                            origin_host: str, origin_port: int) -> None:
        if host is None:
            await internals.open_agent_channel(conn, self)
        else:
            await conn.create_connection(lambda: self, host, port, origin_host, origin_port)

    def _answered(self, opening: asyncio.Task[None]) -> None:
        """The client answered the server's open: a channel nobody waits for any more (its
        open timed out, or it was closed meanwhile) is closed as soon as it opens."""
        if opening.cancelled() or opening.exception() is not None:
            return  # refused, or the connection ended: nothing is open
        if self.abandoned and self.chan is not None:
            self.chan.close()

    def attach(self, transport: asyncio.Transport, protocol: _Target) -> None:
        """The accepted connection of a forwarded-tcpip channel."""
        self.transport = transport
        protocol.forwarder = self

    async def opened(self) -> Forwarder:
        """What asyncssh awaits before it confirms the channel (a ChannelOpenError refuses it)."""
        await self.decided
        return self

    def confirm(self) -> None:
        self.confirmed = True
        if not self.decided.done():
            self.decided.set_result(None)
        self._pace_target()

    def reject(self, code: int, description: str) -> None:
        if not self.decided.done():
            self.decided.set_exception(asyncssh.ChannelOpenError(code, description))

    # -- the core's actions

    def send_eof(self, to_client: bool, close: bool) -> None:
        if to_client:
            if self.chan is not None and not self.chan.is_closing():
                self.chan.write_eof()
        else:
            transport = self.transport
            if transport is not None and not transport.is_closing() and transport.can_write_eof():
                transport.write_eof()
        if close:
            self.close()

    def close(self) -> None:
        """Close both ends after what is buffered went out (or abandon the attempt)."""
        self.abandoned = True
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        self.reject(asyncssh.OPEN_CONNECT_FAILED, "Channel closed")
        if self.serving is not None and self.transport is None:
            self.serving.cancel()  # (with its connection open, it sees the EOF and ends itself)
        if self.chan is not None:
            self.chan.close()
        self._close_target()

    def _close_target(self) -> None:
        if self.transport is not None:
            self.transport.close()  # (flushes what the client sent first)

    # -- back-pressure: the target is read only while the client can take more

    def _pace_target(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.started and self.confirmed and not (self.chan_full or self.socket_full):
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def transport_paused(self, paused: bool) -> None:
        self.socket_full = paused
        self._pace_target()

    # -- asyncssh's callbacks: the channel's side

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self.chan = chan
        # high-water 0: asyncssh says the moment anything waits for the client's window.
        chan.set_write_buffer_limits(high=0, low=0)

    def session_started(self) -> None:
        self.started = True
        self._pace_target()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def eof_received(self) -> bool:
        self.conn.handle(core.ForwardEof(self.channel, from_client=True))
        return True  # half-close: the target's bytes may still flow

    def pause_writing(self) -> None:
        self.chan_full = True
        self._pace_target()

    def resume_writing(self) -> None:
        self.chan_full = False
        self._pace_target()

    def connection_lost(self, exc: Exception | None) -> None:
        chan, self.chan = self.chan, None
        if chan is not None and internals.connection_gone(chan):
            # The whole connection ended: the core's ConnectionLost closes every channel.
            self._close_target()
            return
        self.conn.handle(core.ForwardClosed(self.channel, f"channel closed: {exc}" if exc else
                                            "channel closed by the client"))

    # -- the target's side (called by _Target)

    def target_data(self, data: bytes) -> None:
        if self.chan is not None:
            self.chan.write(data)

    def target_eof(self) -> None:
        self.conn.handle(core.ForwardEof(self.channel, from_client=False))

    def target_full(self, full: bool) -> None:
        if self.chan is not None:
            if full:
                self.chan.pause_reading()
            else:
                self.chan.resume_reading()

    def target_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.connecting is None and self.confirmed:  # (a channel being opened reports itself)
            self.conn.handle(core.ForwardClosed(self.channel, f"target: {exc}" if exc else "target closed"))


class _Target(asyncio.Protocol):
    """The TCP connection to a forward's target (or, for forwarded-tcpip, the one
    its listener accepted). Not read before the channel is open."""

    def __init__(self, forwarder: Forwarder | None) -> None:
        self.forwarder = forwarder

    def connection_made(self, transport: Any) -> None:
        transport.pause_reading()  # until the channel is open (Forwarder._pace_target)

    def data_received(self, data: bytes) -> None:
        if self.forwarder is not None:
            self.forwarder.target_data(data)

    def eof_received(self) -> bool:
        if self.forwarder is not None:
            self.forwarder.target_eof()
        return True  # half-close: the client's bytes may still flow to the target

    def pause_writing(self) -> None:
        if self.forwarder is not None:
            self.forwarder.target_full(True)

    def resume_writing(self) -> None:
        if self.forwarder is not None:
            self.forwarder.target_full(False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.forwarder is not None:
            self.forwarder.target_lost(exc)


class Listener:
    """A tcpip-forward listener (ssh -R): where the client asked for it (``host``, and
    the port bound), and the server that accepts."""

    def __init__(self, conn: SpecConnection, host: str) -> None:
        self.conn = conn
        self.host = host
        self.port = 0  # known once bound
        self.server: asyncio.Server | None = None

    def protocol(self) -> _Accepted:
        return _Accepted(self)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class AgentSocket:
    """A session's agent socket (ssh -A): SSH_AUTH_SOCK, in a directory only the
    server's user may enter (mkdtemp: 0700), removed when the session ends. Each
    connection to it is an agent client: a channel to the client's agent."""

    def __init__(self, conn: SpecConnection, channel: int, serve: ForwardServer | None = None) -> None:
        self.conn = conn
        self.channel = channel
        self.serve = serve  # the handler's own agent (agent_target); None: the client's
        self.clients: set[asyncio.Task[None]] = set()  # agent clients the handler serves
        self.directory = tempfile.mkdtemp(prefix="sshspec-agent-")
        self.path = os.path.join(self.directory, "agent")
        self.server: asyncio.Server | None = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            sock.listen(16)
            sock.setblocking(False)
        except OSError:
            sock.close()
            self._remove()
            raise
        # Bound and listening now: an agent client that connects before the server
        # serves waits in the backlog.
        self.sock: socket.socket | None = sock
        self.serving = asyncio.get_running_loop().create_task(self._serve(sock))

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        if self.serve is not None:
            self.server = await asyncio.start_unix_server(self._serve_in_process, sock=sock)
        else:
            self.server = await loop.create_unix_server(lambda: _AgentClient(self), sock=sock)
        self.sock = None  # the server owns it

    async def _serve_in_process(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """An agent client the handler serves itself (its agent_target)."""
        assert self.serve is not None
        task = asyncio.current_task()
        assert task is not None
        self.clients.add(task)
        try:
            await Forwarder._serve(self.serve, reader, writer)
        finally:
            self.clients.discard(task)

    def close(self) -> None:
        self.serving.cancel()
        for client in self.clients:
            client.cancel()
        if self.server is not None:
            self.server.close()
        if self.sock is not None:
            self.sock.close()
        self._remove()

    def _remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)


class _AgentClient(_Target):
    """A program's connection to its session's agent socket."""

    def __init__(self, agent: AgentSocket) -> None:
        super().__init__(None)
        self.agent = agent

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.agent.conn.agent_client(self.agent, transport, self)


class _Accepted(_Target):
    """A connection a listener accepted: the core decides whether a forwarded-tcpip
    channel is opened for it (else it is closed)."""

    def __init__(self, listener: Listener) -> None:
        super().__init__(None)
        self.listener = listener

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.listener.conn.accepted(self.listener, transport, self)
