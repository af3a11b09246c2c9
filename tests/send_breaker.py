"""Failure injection for tests: make one outgoing packet of a server connection fail.

A reach-in into asyncssh like those in adapters/asyncssh_internals.py, but used by
tests only, so it lives here. HACKS.md section 6 describes it; `REACH_INS` below
lists what it relies on and tests/test_asyncssh_internals.py checks them with the
adapter's own `check_reach_in`.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Literal

import asyncssh
from asyncssh.channel import SSHChannel
from asyncssh.packet import SSHPacketLogger

from sshspec.adapters.asyncssh_internals import ReachIn

BreakMode = Literal["raise", "lose_connection"]

REACH_INS: tuple[ReachIn, ...] = (
    # Every packet a server sends goes through the connection's send_packet, looked up
    # on the instance (so a per-connection attribute catches it) ...
    ReachIn(asyncssh.SSHServerConnection, "send_packet", ("pkttype", "args", "handler")),
    # ... channel packets too, as one payload that starts with the recipient channel.
    ReachIn(SSHChannel, "send_packet", ("pkttype", "args"),
            source_has="self._conn.send_packet(pkttype, payload, handler=self)"),
    ReachIn(SSHChannel, "send_packet", ("pkttype", "args"),
            source_has="UInt32(self._send_chan) + b''.join(args)"),
)


def break_send(
    conn: asyncssh.SSHServerConnection,
    *,
    pkttype: int,
    channel_request: str | None = None,
    mode: BreakMode = "raise",
    error: OSError | None = None,
    times: int = 1,
) -> Callable[[], None]:
    """Make the next `times` outgoing packets of `pkttype` (and, for
    MSG_CHANNEL_REQUEST, of request name `channel_request`) fail.  Returns `undo`.

    mode "raise": SSHConnection.send_packet raises `error` (nothing is sent and
    asyncssh's state is untouched), as if the transport write raised.
    mode "lose_connection": the packet is dropped and the connection is lost with
    `error`, which is what asyncio does when a socket send fails (the error then
    reaches SSHServer/SSHServerSession.connection_lost).
    """
    err = error if error is not None else BrokenPipeError(errno.EPIPE, "send broken by test")
    prefix = None
    if channel_request is not None:
        name = channel_request.encode("ascii")
        prefix = len(name).to_bytes(4, "big") + name
    had_override = "send_packet" in vars(conn)
    orig = conn.send_packet  # REACH-IN: SSHConnection.send_packet (every packet goes here)
    remaining = times
    broken = pkttype

    # asyncssh's signature, parameter names included, so it can stand in for the method.
    def send_packet(pkttype: int, *args: bytes, handler: SSHPacketLogger | None = None) -> None:
        nonlocal remaining
        if remaining > 0 and pkttype == broken and (
            prefix is None or b"".join(args)[4:].startswith(prefix)  # skip recipient channel
        ):
            remaining -= 1
            if mode == "raise":
                raise err
            conn.connection_lost(err)
            return
        orig(pkttype, *args, handler=handler)

    conn.send_packet = send_packet  # type: ignore[method-assign]  # the breakage, on this instance

    def undo() -> None:
        if had_override:
            conn.send_packet = orig  # type: ignore[method-assign]
        else:
            vars(conn).pop("send_packet", None)

    return undo
