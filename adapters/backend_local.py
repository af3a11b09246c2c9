"""The ``local`` session backend: a session's program as a subprocess of the server's user.

Pure asyncio + stdlib; the SSH adapter wires a :class:`LocalProcess` to a channel.

Program
    ``command=None`` starts the user's login shell (``pw_shell``, ``/bin/sh`` when the
    field is empty) with ``-`` prepended to argv[0], as login(1) and sshd do. A command
    string runs as ``<shell> -c <command>`` with argv[0] the shell's basename, like
    OpenSSH. The working directory is the home directory (``/`` if it does not exist).

Environment
    Built from scratch, never inherited from the server: the client's variables that
    pass :meth:`LocalBackend.env_allowed` (at most ``max_env`` of them), then the base
    sshd sets (``HOME USER LOGNAME SHELL PATH``, ``TERM`` with a pty) *over* them, as
    OpenSSH does, so a client cannot change who it is or where programs come from.
    ``server_env`` (trusted: ``SSH_CONNECTION``, ``SSH_TTY`` ...) goes on top unfiltered.

Deny list
    :data:`DEFAULT_ENV_DENY` holds what makes *any* program, even a forced command,
    load or run code the client chose: every ``LD_*`` (glibc/musl/Solaris loaders:
    ``LD_PRELOAD``, ``LD_LIBRARY_PATH``, ``LD_AUDIT`` ...), every ``DYLD_*`` (macOS),
    ``GLIBC_TUNABLES`` (parsed by ld.so itself; CVE-2023-4911) and ``GCONV_PATH``
    (glibc dlopen()s iconv modules from it). A pattern ending in ``*`` is a prefix.

Process group and signals
    Always a new session (``setsid``), so the program leads its own process group;
    :meth:`LocalProcess.send_signal` and :meth:`LocalProcess.kill` signal the whole
    group. The leader is reaped only at the very end, so while it is a zombie its pid
    (the group id) cannot be reused and no signal can hit an unrelated group.

Signals a program starts with
    Their defaults, as under sshd, whatever the server inherited, and with no code run
    in the child: a ``preexec_fn`` makes ``subprocess`` fork the whole server and run
    Python there instead of taking its vfork path. :func:`adopt_inherited_signals`
    (``sshspec serve`` calls it at start-up) turns signals inherited ignored (``nohup``,
    ``cmd &`` from a script: HUP, INT, QUIT) into caught-and-ignored ones, which exec
    resets to their defaults. A server that did not adopt them (the backend used as a
    library) still resets them, through a preexec function. A pty session always has
    one (``TIOCSCTTY``), so pty starts stay on the slow path.

No orphans: the guard
    Programs end when the server process dies, however it dies (SIGKILL included).
    At the first program a process starts a guard (``guard.py``, via ``posix_spawn``
    in a session of its own, about 10 MB of RSS) and tells it, through a pipe of which
    the server holds the only write end, each program's session id as it starts and
    before its leader is reaped (two small writes per session, ~2.6 us). When the
    server is gone the kernel closes that end; at end of file the guard SIGKILLs every
    session still listed: its process group, then every process /proc shows with that
    session id (an interactive shell's jobs have groups of their own), scanning until
    none is left. The alternatives fall short: ``PR_SET_PDEATHSIG`` must be set in the
    child before exec (a ``preexec_fn`` or a compiled wrapper), fires when the forking
    *thread* exits, and covers only the direct child, not ``sh -c 'sleep 60 & ...'``'s
    background job; a subreaper hands orphans to init once the server itself is
    SIGKILLed; process-group bookkeeping in the server alone has nobody left to act.
    Limits: a process that calls ``setsid()`` (a daemon, ``setsid cmd``) leaves the
    session and is not ended; a program forked in the instant between ``fork`` and the
    write of its id escapes if the server dies right then; the guard runs as the same
    user, so a program can kill it (the server starts a new one at its next write, and
    until then a server death orphans programs), as can whatever kills server and guard
    together (``kill -9 -1``, the OOM killer choosing both). For containment nothing
    can escape, run the server in its own cgroup (systemd's ``KillMode=control-group``).

Pty
    ``os.openpty``; the slave is the child's stdin/stdout/stderr and controlling
    terminal (``TIOCSCTTY`` after ``setsid``), window size and RFC 4254 modes applied
    before the program starts. Output comes as one stream, through ``on_stdout``.

End of output (the rule that keeps :meth:`LocalProcess.wait` from hanging)
    Output is read until EOF (EIO on a pty master) like sshd does, *but* once the
    program (the group leader) has exited, each stream is only drained of what is
    already there: read until the kernel says "would block", at most the pipe's
    capacity (1 MiB for a pty), then closed. Everything the program wrote before it
    exited fits in that capacity, so none of it is lost; a background child that
    still holds the stream open cannot keep the session alive (it gets EPIPE/SIGPIPE
    or a hung-up tty on its next write, as after a terminal closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import os
import pwd
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "DEFAULT_ENV_DENY",
    "DEFAULT_PATH",
    "SSH_SIGNALS",
    "BackendError",
    "ExitStatus",
    "LocalBackend",
    "LocalProcess",
    "PtyRequest",
    "adopt_inherited_signals",
    "apply_modes",
]

log = logging.getLogger(__name__)

DEFAULT_ENV_DENY: frozenset[str] = frozenset({"LD_*", "DYLD_*", "GLIBC_TUNABLES", "GCONV_PATH"})
# sshd gives a fixed PATH rather than its own: the server may run from a venv or with
# a PATH nobody reviewed for sessions.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Linux refuses one argv/env string over 128 KiB (MAX_ARG_STRLEN); staying well below
# keeps a few large values from making the exec fail with E2BIG.
MAX_ENV_NAME = 256
MAX_ENV_VALUE = 32 * 1024
# Names a shell can export and expand; anything else is surely not meant for a program.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# RFC 4254 section 6.10: the signal names a client may send. OpenSSH accepts exactly
# these too; STOP/CONT/WINCH and friends would let a client confuse job control.
SSH_SIGNALS: Mapping[str, signal.Signals] = {
    name: signal.Signals["SIG" + name]
    for name in (
        "ABRT", "ALRM", "FPE", "HUP", "ILL", "INT", "KILL",
        "PIPE", "QUIT", "SEGV", "TERM", "USR1", "USR2",
    )
}  # fmt: skip

_READ_CHUNK = 64 * 1024
# A program that fills its output pipe (a read took a whole _READ_CHUNK) is streaming:
# its pipe grows to _STREAM_PIPE and reads take up to as much, so an event-loop turn
# carries four times the data. A turn costs the interpreter ~10 us whatever it
# carries, and a producer on the server's CPU fills at most its pipe before the
# server reads: a 1 GiB download took ~16,000 turns, and ~4,000 after (issue #17;
# README, Performance). 256 KiB measured best (128 KiB and 1 MiB cost more CPU per GB);
# a pipe's size is kernel memory of the server's user, bounded by fs.pipe-max-size
# and fs.pipe-user-pages-*: a refused grow leaves the pipe and the reads as they were.
_STREAM_PIPE = 256 * 1024
# At most this many grown pipes at once (16 MiB of pipe buffers beyond the default
# 64 KiB each): past it, a streaming program keeps the default pipe. Clients choose
# how many programs stream and can stop reading them, so the pipes they make the
# server hold are bounded, and a non-root server stays well under the kernel's
# per-user soft limit (fs.pipe-user-pages-soft, 64 MiB), past which every new pipe
# of that user gets a few KiB.
MAX_STREAM_PIPES = 64
_streaming = 0  # pipes grown to _STREAM_PIPE now (the event loop's thread only)
# Stdin buffered beyond the high-water mark asks the adapter to stop reading the
# channel (on_stdin_flow(True)); it resumes below the low-water mark.
_STDIN_HIGH_WATER = 64 * 1024
_STDIN_LOW_WATER = 16 * 1024
# After exit, a pty is drained of at most this much: the tty layer buffers far less
# (n_tty 4 KiB + flip buffers 64 KiB), and it bounds a background writer.
_PTY_DRAIN_LIMIT = 1024 * 1024
# After a killed session's leader exits: how long the rest of its process group
# has to act on the SIGHUP before the SIGKILL.
_HUP_GRACE = 0.3


@dataclass(frozen=True, slots=True)
class PtyRequest:
    """A "pty-req": terminal type, size, and RFC 4254 encoded modes (opcode -> value)."""

    term: str
    cols: int
    rows: int
    width_px: int = 0
    height_px: int = 0
    modes: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How the program ended: ``code`` when it exited, ``signal`` (no "SIG") if killed.

    Both are None only if the status was lost (another part of the process reaped
    the child, e.g. an asyncio child watcher doing ``waitpid(-1)``).
    """

    code: int | None
    signal: str | None
    core_dumped: bool = False


class BackendError(Exception):
    """The program could not be started; the message says what and why."""


# --- terminal modes ------------------------------------------------------------------

# RFC 4254 section 8 (+ RFC 8160 for IUTF8). termios lacks names the platform lacks
# (VDSUSP, VSTATUS on Linux); those opcodes are skipped like unknown ones.
_CC_OPCODES = {
    1: "VINTR", 2: "VQUIT", 3: "VERASE", 4: "VKILL", 5: "VEOF", 6: "VEOL", 7: "VEOL2",
    8: "VSTART", 9: "VSTOP", 10: "VSUSP", 11: "VDSUSP", 12: "VREPRINT", 13: "VWERASE",
    14: "VLNEXT", 15: "VFLUSH", 16: "VSWTCH", 17: "VSTATUS", 18: "VDISCARD",
}  # fmt: skip
# opcode -> (index in the tcgetattr list: 0 iflag, 1 oflag, 2 cflag, 3 lflag; flag name)
_FLAG_OPCODES = {
    30: (0, "IGNPAR"), 31: (0, "PARMRK"), 32: (0, "INPCK"), 33: (0, "ISTRIP"),
    34: (0, "INLCR"), 35: (0, "IGNCR"), 36: (0, "ICRNL"), 37: (0, "IUCLC"),
    38: (0, "IXON"), 39: (0, "IXANY"), 40: (0, "IXOFF"), 41: (0, "IMAXBEL"),
    42: (0, "IUTF8"),
    50: (3, "ISIG"), 51: (3, "ICANON"), 52: (3, "XCASE"), 53: (3, "ECHO"),
    54: (3, "ECHOE"), 55: (3, "ECHOK"), 56: (3, "ECHONL"), 57: (3, "NOFLSH"),
    58: (3, "TOSTOP"), 59: (3, "IEXTEN"), 60: (3, "ECHOCTL"), 61: (3, "ECHOKE"),
    62: (3, "PENDIN"),
    70: (1, "OPOST"), 71: (1, "OLCUC"), 72: (1, "ONLCR"), 73: (1, "OCRNL"),
    74: (1, "ONOCR"), 75: (1, "ONLRET"),
    92: (2, "PARENB"), 93: (2, "PARODD"),
}  # fmt: skip
_CSIZE_OPCODES = {90: "CS7", 91: "CS8"}
_SPEED_OPCODES = {128: 4, 129: 5}  # TTY_OP_ISPEED, TTY_OP_OSPEED -> index
# Python's termios module (3.11) has no IUTF8; this is Linux's value for it.
_EXTRA_FLAGS = {"IUTF8": 0o040000} if sys.platform.startswith("linux") else {}
_POSIX_VDISABLE = 0  # Linux; RFC 4254 encodes "disabled" as 255


def _termios_const(name: str) -> int | None:
    value = getattr(termios, name, None)
    return value if value is not None else _EXTRA_FLAGS.get(name)


def apply_modes(attrs: list, modes: Mapping[int, int]) -> None:
    """Apply RFC 4254 encoded modes to a ``termios.tcgetattr`` list in place.

    Unknown opcodes and ones this platform lacks are ignored (RFC 4254: "Parsing ...
    stops at the first opcode in 160..255"; we simply skip what we cannot map).
    """
    for opcode, value in modes.items():
        if opcode in _CC_OPCODES:
            index = _termios_const(_CC_OPCODES[opcode])
            if index is not None and 0 <= value <= 255:
                char = _POSIX_VDISABLE if value == 255 else value
                attrs[6][index] = bytes([char])
        elif opcode in _FLAG_OPCODES:
            where, name = _FLAG_OPCODES[opcode]
            bit = _termios_const(name)
            if bit is not None:
                attrs[where] = attrs[where] | bit if value else attrs[where] & ~bit
        elif opcode in _CSIZE_OPCODES:
            # CS7/CS8 are values of the CSIZE field, not independent bits (OpenSSH ORs
            # them in, which turns CS7 into CS8): set the field when asked, else leave.
            if value:
                size = getattr(termios, _CSIZE_OPCODES[opcode])
                attrs[2] = (attrs[2] & ~termios.CSIZE) | size
        elif opcode in _SPEED_OPCODES:
            speed = getattr(termios, f"B{value}", None)
            if speed is not None:
                attrs[_SPEED_OPCODES[opcode]] = speed


def _set_winsize(fd: int, cols: int, rows: int, width_px: int, height_px: int) -> None:
    def clamp(n: int) -> int:
        return max(0, min(int(n), 0xFFFF))

    winsize = struct.pack("HHHH", clamp(rows), clamp(cols), clamp(width_px), clamp(height_px))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, winsize)


def _configure_tty(fd: int, pty: PtyRequest) -> None:
    try:
        attrs = termios.tcgetattr(fd)
        apply_modes(attrs, pty.modes)
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except (termios.error, OSError, TypeError, ValueError) as exc:
        # Odd modes from a client must not cost it the session: keep the defaults.
        log.warning("could not apply pty modes %r: %s", dict(pty.modes), exc)
    _set_winsize(fd, pty.cols, pty.rows, pty.width_px, pty.height_px)


# --- child setup -----------------------------------------------------------------------


def _child_setup(take_ctty: bool, reset_signals: tuple[int, ...]) -> None:
    """Runs in the child between fork and exec (after setsid and the dup2s to 0-2).

    Kept tiny on purpose: code run after fork in a threaded server must not need a
    lock another thread could have held at fork time (no logging, no imports).
    """
    for signum in reset_signals:
        signal.signal(signum, signal.SIG_DFL)
    if take_ctty:
        # A new session has no controlling terminal; the slave on fd 0 becomes it.
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)


# Signals whose inherited SIG_IGN adopt_inherited_signals() turns into "caught, and
# nothing done": the server still survives them (nohup keeps its meaning), while exec
# resets a caught signal to its default, so programs get them at their defaults
# without any code run in the child. Their default action ends a process; the stop
# signals (TSTP, TTIN, TTOU) are left alone, since catching them changes what a
# terminal does to the server. (WINCH and URG ignored are their defaults; CHLD
# inherited ignored, which makes the kernel reap children itself, is not handled.)
_ADOPTABLE = (
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
    signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM,
)  # fmt: skip


def _do_nothing(signum: int, frame: object) -> None:
    pass


def adopt_inherited_signals() -> tuple[int, ...]:
    """Call once at server start-up, in the main thread (``sshspec serve`` does).

    A server started under ``nohup`` or with ``cmd &`` from a script inherits SIGHUP,
    or SIGINT and SIGQUIT, ignored, and an ignored disposition survives exec. Those
    of :data:`_ADOPTABLE` get a handler that does nothing instead (same effect on the
    server), which exec resets to the default: programs start with default signals
    and :meth:`LocalBackend.start` needs no ``preexec_fn``, so ``subprocess`` keeps
    its vfork fast path (with a preexec function it forks the whole server and runs
    Python in the child: at 3b70f5b, 1.46x the server CPU per connection).
    Returns the signals adopted.
    """
    adopted = []
    for sig in _ADOPTABLE:
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, _do_nothing)
                adopted.append(int(sig))
    return tuple(adopted)


def _inherited_ignored_signals() -> tuple[int, ...]:
    # An ignored disposition survives exec. Popen's restore_signals only resets the
    # ones Python itself ignores (PIPE, XFSZ); a server started under nohup would also
    # hand SIGHUP-ignored to every session, making kill()'s SIGHUP and `trap ... HUP`
    # useless. After adopt_inherited_signals() the tuple is empty (unless a stop
    # signal was inherited ignored), and no preexec function is needed.
    ignored = []
    for sig in signal.Signals:
        if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE, signal.SIGXFSZ):
            continue
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(sig) == signal.SIG_IGN:
                ignored.append(int(sig))
    return tuple(ignored)


# --- the guard: no orphans ---------------------------------------------------------------

_GUARD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guard.py")


class _Guard:
    """This process's guard (``guard.py``): it SIGKILLs every session still running
    when this process is gone, however it went (SIGKILL included).

    One per process, started at the first program (a forked ``--workers`` worker
    starts its own). It learns each program's session id through a pipe whose only
    write end is here; end of file is its signal. Started with ``os.posix_spawn``
    (vfork, no Python in the child) in a session of its own, so signals for the
    server's process group (a terminal's ^C, ``kill -- -PGID``) do not reach it.
    """

    def __init__(self) -> None:
        self._owner = 0  # the pid the guard belongs to
        self._fd = -1
        self._pid = 0
        self._sids: set[int] = set()
        self._warned = False

    def add(self, sid: int) -> None:
        self._own()
        self._sids.add(sid)
        self._send(b"+%d\n" % sid)

    def discard(self, sid: int) -> None:
        # Before the leader is reaped: after that, its pid may name something else.
        if self._owner == os.getpid() and sid in self._sids:
            self._sids.discard(sid)
            self._send(b"-%d\n" % sid)

    def _own(self) -> None:
        if self._owner != os.getpid():
            # First use, or a forked worker: what the parent listed is the parent's,
            # and so is its pipe (kept open here, its guard would outlive it).
            self._sids.clear()
            self._start(restart=False)

    def _send(self, line: bytes) -> None:
        try:
            os.write(self._fd, line)
            return
        except BlockingIOError:
            self._warn("the guard is not reading its pipe; a session went unrecorded")
            return
        except OSError:  # EPIPE: the guard died (killed?); a new one gets the whole list
            pass
        self._start(restart=True)

    def _start(self, *, restart: bool) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._pid and restart:  # our dead guard: reap it
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._pid, os.WNOHANG)
        self._owner = os.getpid()
        self._pid = 0
        read_end, write_end = os.pipe()  # both close-on-exec; the spawn dup2s one to 0
        try:
            self._pid = os.posix_spawn(
                sys.executable, [sys.executable, "-I", "-S", _GUARD_SCRIPT], {},
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, read_end, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                ],
                setsid=True,
                setsigdef=_ADOPTABLE,
            )
        except OSError as exc:
            os.close(write_end)
            self._warn(f"cannot start the guard ({exc}): programs outlive a killed server")
            write_end = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        finally:
            os.close(read_end)
        if self._sids:
            # A new guard: it learns every program still running (blocking: the list
            # may exceed the pipe's buffer, and the guard is starting to read it).
            with contextlib.suppress(OSError):
                os.write(write_end, b"".join(b"+%d\n" % sid for sid in self._sids))
        os.set_blocking(write_end, False)
        self._fd = write_end

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s", message)


_GUARD = _Guard()


class _User(NamedTuple):
    name: str
    home: str
    shell: str


def _current_user() -> _User:
    uid = os.getuid()
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        # Containers run with uids that have no passwd entry; do what a shell would.
        return _User(os.environ.get("USER") or str(uid), os.environ.get("HOME") or "/", "/bin/sh")
    # An empty shell field means /bin/sh (passwd(5)).
    return _User(pw.pw_name, pw.pw_dir or "/", pw.pw_shell or "/bin/sh")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name.removeprefix("SIG")
    except ValueError:
        # Real-time signals have no name of their own; the adapter maps this further.
        return str(signum)


def _status_from_waitid(result: os.waitid_result | None) -> ExitStatus:
    if result is None:
        return ExitStatus(code=None, signal=None)
    if result.si_code == os.CLD_EXITED:
        return ExitStatus(code=result.si_status, signal=None)
    return ExitStatus(
        code=None,
        signal=_signal_name(result.si_status),
        core_dumped=result.si_code == os.CLD_DUMPED,
    )


# --- streams ---------------------------------------------------------------------------


class _Reader:
    """Reads one output fd into a callback; can pause, and drain-then-stop after exit."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        deliver: Callable[[bytes], None],
        on_done: Callable[[_Reader], None],
        drain_limit: int,
    ) -> None:
        self.fd = fd
        self.done = False
        self._loop = loop
        self._deliver_cb = deliver
        self._on_done = on_done
        self._drain_limit = drain_limit
        self._paused = False
        self._draining = False
        self._drained = 0
        self._step_pending = False
        self._chunk = _READ_CHUNK  # _STREAM_PIPE once streaming
        self._may_stream = True  # until the first full read tries to grow the pipe
        loop.add_reader(fd, self._on_readable)

    def _read(self) -> bytes | None:
        """One chunk; b"" at EOF, None when nothing is there now."""
        try:
            data = os.read(self.fd, self._chunk)
            if len(data) == _READ_CHUNK and self._may_stream:
                self._stream()
            return data
        except BlockingIOError:
            return None
        except OSError as exc:
            # EIO is how a pty master says every slave fd is closed: that is its EOF.
            if exc.errno != errno.EIO:
                log.warning("reading session output failed: %s", exc)
            return b""

    def _stream(self) -> None:
        """The program streams: its pipe grows, reads take more (_STREAM_PIPE). Tried
        once; not a pipe (a pty), MAX_STREAM_PIPES grown already or over the user's
        pipe limit, it stays as it was."""
        global _streaming
        self._may_stream = False
        if _streaming >= MAX_STREAM_PIPES:
            return
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, _STREAM_PIPE)
        except OSError:
            return
        self._chunk = _STREAM_PIPE
        _streaming += 1

    def _deliver(self, data: bytes) -> None:
        # A failing callback must not wedge the session's lifecycle (wait() would hang).
        try:
            self._deliver_cb(data)
        except Exception:
            log.exception("session output callback failed")

    def _on_readable(self) -> None:
        data = self._read()
        if data is None:
            return
        if not data:
            self._finish()
            return
        self._deliver(data)

    def pause(self) -> None:
        if self.done or self._paused:
            return
        self._paused = True
        if not self._draining:
            self._loop.remove_reader(self.fd)

    def resume(self) -> None:
        if self.done or not self._paused:
            return
        self._paused = False
        if self._draining:
            self._schedule_step()
        else:
            self._loop.add_reader(self.fd, self._on_readable)

    def drain(self) -> None:
        """The program exited: read what is there (bounded), then finish."""
        if self.done or self._draining:
            return
        self._draining = True
        if not self._paused:
            self._loop.remove_reader(self.fd)
            self._schedule_step()

    def _schedule_step(self) -> None:
        if not self._step_pending:
            self._step_pending = True
            self._loop.call_soon(self._step)

    def _step(self) -> None:
        # One chunk per loop iteration, so a large remainder does not stall the loop
        # and the callback can pause us in between.
        self._step_pending = False
        if self.done or self._paused:
            return
        data = self._read()
        if not data:  # "would block" or EOF: either way all of it is delivered
            self._finish()
            return
        self._drained += len(data)
        self._deliver(data)
        if self.done:
            return
        if self._drained >= self._drain_limit:
            self._finish()
        else:
            self._schedule_step()

    def stop(self) -> None:
        """Stop without delivering anything more (kill); does not report done."""
        global _streaming
        if not self.done:
            self.done = True
            self._loop.remove_reader(self.fd)
            if self._chunk == _STREAM_PIPE:
                _streaming -= 1

    def _finish(self) -> None:
        self.stop()
        self._on_done(self)


class _Writer:
    """Buffered non-blocking writes to the child's stdin (pipe or pty master)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        close_fd: Callable[[], None] | None,
        on_flow: Callable[[bool], None] | None,
    ) -> None:
        self.fd = fd
        self._loop = loop
        self._close_fd = close_fd  # None: the fd is shared (pty master), not ours to close
        self._on_flow = on_flow
        self._buf = bytearray()
        self._closed = False
        self._eof = False  # no more writes accepted; close once flushed (pipe)
        self._flow_paused = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def write(self, data: bytes) -> None:
        if self._closed or self._eof or not data:
            return
        self._put(data)

    def _put(self, data: bytes) -> None:
        if not self._buf:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._broken(exc)
                return
            data = data[n:]
            if not data:
                return
            self._loop.add_writer(self.fd, self._on_writable)
        self._buf += data
        if not self._flow_paused and len(self._buf) > _STDIN_HIGH_WATER:
            self._flow_paused = True
            self._notify_flow(True)

    def _on_writable(self) -> None:
        try:
            n = os.write(self.fd, self._buf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._broken(exc)
            return
        del self._buf[:n]
        if not self._buf:
            self._loop.remove_writer(self.fd)
            if self._eof:
                self.stop()
                return
        self._check_resume()

    def write_eof(self, last: bytes = b"") -> None:
        """No more input: send ``last`` (the pty's EOF char), close a pipe once flushed."""
        if self._closed or self._eof:
            return
        if last:
            self._put(last)
            if self._closed:
                return
        self._eof = True
        if not self._buf and self._close_fd is not None:
            self.stop()

    def _broken(self, exc: OSError) -> None:
        # EPIPE/EIO: the program closed its stdin or is gone; an SSH client sending to
        # an exiting program is normal, so the data is silently dropped.
        if exc.errno not in (errno.EPIPE, errno.EIO):
            log.warning("writing session input failed: %s", exc)
        self.stop()

    def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buf.clear()
        self._loop.remove_writer(self.fd)
        if self._close_fd is not None:
            self._close_fd()
        self._check_resume()

    def release(self) -> None:
        """Stopped for good: let go of the close callback (the process's own method)."""
        if self._closed:
            self._close_fd = None

    def _check_resume(self) -> None:
        if self._flow_paused and len(self._buf) <= _STDIN_LOW_WATER:
            self._flow_paused = False
            self._notify_flow(False)

    def _notify_flow(self, paused: bool) -> None:
        if self._on_flow is None:
            return
        try:
            self._on_flow(paused)
        except Exception:
            log.exception("stdin flow callback failed")


# --- process ---------------------------------------------------------------------------


class LocalProcess:
    """A running session program. Create it with :meth:`LocalBackend.start`.

    All methods must be called from the event loop's thread; callbacks run there too.
    """

    pid: int

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        popen: subprocess.Popen[bytes],
        stdin_fd: int,
        stdout_fd: int,
        stderr_fd: int | None,
        on_stdout: Callable[[bytes], None],
        on_stderr: Callable[[bytes], None],
        on_stdin_flow: Callable[[bool], None] | None,
        kill_grace: float,
    ) -> None:
        self.pid = popen.pid
        self._loop = loop
        # Kept so the child is reaped through Popen (returncode set, no ResourceWarning,
        # and subprocess never adopts it into its own reaping list).
        self._popen = popen
        self._pty = stderr_fd is None
        self._kill_grace = kill_grace
        self._fds: set[int] = {stdin_fd, stdout_fd} | ({stderr_fd} if stderr_fd is not None else set())
        self._status: ExitStatus | None = None
        self._killed = False
        self._kill_timer: asyncio.TimerHandle | None = None
        self._finished: asyncio.Future[ExitStatus] = loop.create_future()
        self._pidfd: int | None = None
        # Pty only: the last input byte, to tell whether close_stdin comes mid-line.
        self._last_input = b"\n"

        if stderr_fd is None:  # self._pty, said so that mypy knows stderr_fd below
            self._writer = _Writer(loop, stdin_fd, None, on_stdin_flow)
            self._readers = [_Reader(loop, stdout_fd, on_stdout, self._reader_done, _PTY_DRAIN_LIMIT)]
        else:
            self._writer = _Writer(
                loop, stdin_fd, functools.partial(self._close_fd, stdin_fd), on_stdin_flow
            )
            self._readers = [
                _Reader(loop, fd, cb, self._reader_done, _pipe_capacity(fd))
                for fd, cb in ((stdout_fd, on_stdout), (stderr_fd, on_stderr))
            ]
        self._watch_exit()

    # -- public API --

    def write_stdin(self, data: bytes) -> None:
        """Queue input for the program; dropped silently once it cannot take any more."""
        if self._pty and data:
            self._last_input = data[-1:]
        self._writer.write(data)

    @property
    def stdin_buffered(self) -> int:
        """Bytes of input not yet taken by the program."""
        return self._writer.buffered

    def close_stdin(self) -> None:
        """EOF from the client. A pipe is closed once flushed; a pty gets its VEOF char.

        On a pty, one VEOF only ends the input when it comes at the start of a line
        (otherwise it just hands the partial line to the reader), so after a partial
        line it is sent twice. In raw mode (no ICANON) the program just sees the char.
        The master itself stays open: closing it would hang up the terminal.
        """
        if not self._pty:
            self._writer.write_eof()
            return
        if self._writer.fd not in self._fds:
            return  # closed (its number may belong to another file by now)
        eof = b""
        with contextlib.suppress(termios.error, OSError):
            attrs = termios.tcgetattr(self._writer.fd)
            eof = _cc_bytes(attrs[6][termios.VEOF])
            if eof == bytes([_POSIX_VDISABLE]):
                eof = b""
            if eof and attrs[3] & termios.ICANON:
                ends_line = {b"\n", eof}
                ends_line |= {_cc_bytes(attrs[6][termios.VEOL]), _cc_bytes(attrs[6][termios.VEOL2])}
                if attrs[0] & termios.ICRNL and not attrs[0] & termios.IGNCR:
                    ends_line.add(b"\r")
                if self._last_input not in ends_line - {bytes([_POSIX_VDISABLE])}:
                    eof *= 2
        self._writer.write_eof(eof)

    def resize(self, cols: int, rows: int, width_px: int = 0, height_px: int = 0) -> None:
        """New window size (the kernel sends SIGWINCH); ignored without a pty."""
        if not self._pty or self._writer.fd not in self._fds:
            return
        try:
            _set_winsize(self._writer.fd, cols, rows, width_px, height_px)
        except OSError as exc:
            log.debug("resize failed: %s", exc)

    def send_signal(self, name: str) -> None:
        """Send an SSH signal name (no "SIG") to the program's process group."""
        sig = SSH_SIGNALS.get(name)
        if sig is None:
            raise ValueError(f"unknown SSH signal name {name!r}; known: {sorted(SSH_SIGNALS)}")
        if not self._finished.done():
            self._killpg(sig)

    def pause_output(self) -> None:
        """Stop reading output; the program blocks once the pipe/pty buffer is full."""
        for reader in self._readers:
            reader.pause()

    def resume_output(self) -> None:
        for reader in self._readers:
            reader.resume()

    async def wait(self) -> ExitStatus:
        """The exit status, once the program exited and all its output was delivered.

        Blocks while output is paused (the output is still owed). See the module
        docstring for when output counts as "all".
        """
        return await asyncio.shield(self._finished)

    def kill(self) -> None:
        """The client went away: discard output, SIGHUP the group, SIGKILL it later.

        SIGKILL follows as soon as the leader has exited (taking along members that
        ignore SIGHUP) or after ``kill_grace`` seconds, whichever is first. Does not
        block; reaping happens on the event loop and :meth:`wait` reports it.
        """
        if self._killed or self._finished.done():
            return
        self._killed = True
        # Nobody is left to read: closing the streams also hangs up a pty (the kernel
        # then SIGHUPs the terminal's foreground job, whatever its group).
        for reader in self._readers:
            reader.stop()
        self._writer.stop()
        for fd in list(self._fds):
            self._close_fd(fd)
        self._killpg(signal.SIGHUP)
        grace = _HUP_GRACE if self._status is not None else self._kill_grace
        self._kill_timer = self._loop.call_later(grace, self._final_kill)

    def _final_kill(self) -> None:
        self._kill_timer = None
        self._killpg(signal.SIGKILL)
        self._maybe_finish()

    # -- internals --

    def _killpg(self, sig: int) -> None:
        # Safe even after the leader exited: it stays an unreaped zombie until
        # _maybe_finish, so its pid (= the group id) is not reused meanwhile.
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as exc:  # a member became setuid; nothing we can do
            log.debug("killpg(%d, %d): %s", self.pid, sig, exc)

    def _close_fd(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.discard(fd)
            os.close(fd)

    def _reader_done(self, reader: _Reader) -> None:
        if self._pty:
            # The master is shared with the writer; after EOF/EIO input is pointless.
            self._writer.stop()
        self._close_fd(reader.fd)
        self._maybe_finish()

    def _watch_exit(self) -> None:
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            # No pidfd (kernel < 5.3, not Linux): a thread per process blocks in waitid.
            threading.Thread(
                target=self._wait_in_thread, name=f"backend-local-wait-{self.pid}", daemon=True
            ).start()
            return
        self._pidfd = pidfd
        self._loop.add_reader(pidfd, self._on_pidfd)

    def _on_pidfd(self) -> None:
        try:
            # WNOWAIT: learn the status but leave the zombie, pinning the group id.
            result = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            result = None  # someone else reaped it; status lost
        else:
            if result is None:
                return
        assert self._pidfd is not None
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self._on_exit(result)

    def _wait_in_thread(self) -> None:
        try:
            result = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            result = None
        with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile
            self._loop.call_soon_threadsafe(self._on_exit, result)

    def _on_exit(self, result: os.waitid_result | None) -> None:
        self._status = _status_from_waitid(result)
        if self._killed:
            # The leader is gone; the rest of its group gets a moment to act on the
            # SIGHUP (cleanup traps, lock files: a `pyenv rehash` killed mid-way
            # leaves a lock that stalls every later bash for 60 s) before the
            # SIGKILL that takes along whoever ignores it.
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            self._kill_timer = self._loop.call_later(_HUP_GRACE, self._final_kill)
        else:
            for reader in self._readers:
                reader.drain()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._finished.done() or self._status is None:
            return
        if not self._killed and not all(reader.done for reader in self._readers):
            return
        if self._killed and self._kill_timer is not None:
            return  # the group's SIGKILL is still due: the leader's pid must not be reaped yet
        self._writer.stop()
        for fd in list(self._fds):
            self._close_fd(fd)
        _GUARD.discard(self.pid)  # before the reap frees the pid for reuse
        # The leader is a zombie (waitid saw it exit), so this returns at once.
        self._popen.wait()
        self._finished.set_result(self._status)
        # Done, every fd closed: what refers back to this process (each reader's on_done,
        # the writer's close) goes, so that reference counting frees it and what its
        # callbacks hold (the session's channel) instead of the cyclic collector.
        self._readers = []
        self._writer.release()


def _cc_bytes(value: bytes | int) -> bytes:
    # tcgetattr gives bytes for control chars, but ints at VMIN/VTIME in raw mode.
    return value if isinstance(value, bytes) else bytes([value])


def _pipe_capacity(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except (AttributeError, OSError):
        return _PTY_DRAIN_LIMIT


# --- backend ---------------------------------------------------------------------------


class LocalBackend:
    """Starts session programs as the server's own user."""

    def __init__(
        self,
        *,
        env_deny: Iterable[str] = DEFAULT_ENV_DENY,
        shell: str | None = None,
        max_env: int = 64,
        path: str = DEFAULT_PATH,
        kill_grace: float = 1.0,
    ) -> None:
        if isinstance(env_deny, str):
            raise TypeError("env_deny must be an iterable of patterns, not one string")
        patterns = list(env_deny)
        if any("*" in p[:-1] for p in patterns):
            raise ValueError("env_deny: '*' is only allowed at the end of a pattern")
        self._deny_exact = frozenset(p for p in patterns if not p.endswith("*"))
        self._deny_prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))
        if max_env < 0:
            raise ValueError("max_env must be >= 0")
        if shell is not None and not os.path.isabs(shell):
            raise ValueError(f"shell must be an absolute path, got {shell!r}")
        self._shell = shell
        self._max_env = max_env
        self._path = path
        self._kill_grace = kill_grace

    def env_allowed(self, name: str, value: str) -> bool:
        """May a client set ``name=value``? Deny list, name syntax, size limits."""
        if len(name) > MAX_ENV_NAME or not _ENV_NAME.match(name):
            return False
        if len(value) > MAX_ENV_VALUE or "\0" in value:
            return False
        return name not in self._deny_exact and not name.startswith(self._deny_prefixes)

    def child_env(
        self,
        env: Mapping[str, str],
        *,
        term: str | None = None,
        server_env: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """The environment a program gets (see the module docstring for the order)."""
        user = _current_user()
        result: dict[str, str] = {}
        for name, value in env.items():
            if not self.env_allowed(name, value):
                log.debug("dropping client environment variable %r", name)
            elif len(result) >= self._max_env:
                log.debug("dropping client environment variable %r: over max_env", name)
            else:
                result[name] = value
        result.update(
            HOME=user.home,
            USER=user.name,
            LOGNAME=user.name,
            SHELL=self._shell or user.shell,
            PATH=self._path,
        )
        if term and self.env_allowed("TERM", term):
            result["TERM"] = term
        if server_env:
            result.update(server_env)
        return result

    async def start(
        self,
        *,
        command: str | None,
        env: Mapping[str, str],
        pty: PtyRequest | None,
        on_stdout: Callable[[bytes], None],
        on_stderr: Callable[[bytes], None],
        server_env: Mapping[str, str] | None = None,
        on_stdin_flow: Callable[[bool], None] | None = None,
        shell: str | None = None,
    ) -> LocalProcess:
        """Start ``command`` (None: login shell), with a pty when ``pty`` is given;
        ``shell`` (absolute) replaces the backend's shell for this program.

        ``on_stdin_flow(True)`` means input is piling up (stop reading the channel),
        ``on_stdin_flow(False)`` that it drained. Raises :class:`BackendError`.
        """
        loop = asyncio.get_running_loop()
        user = _current_user()
        shell = shell or self._shell or user.shell
        if not os.path.isabs(shell):
            raise BackendError(f"cannot start a session: login shell {shell!r} is not absolute")
        name = os.path.basename(shell)
        argv = [f"-{name}"] if command is None else [name, "-c", command]
        child_env = self.child_env(env, term=pty.term if pty else None, server_env=server_env)
        child_env["SHELL"] = shell
        # sshd falls back to / when the home directory is missing; so do we.
        cwd = user.home if os.path.isdir(user.home) else "/"
        reset = _inherited_ignored_signals()

        parent_fds: list[int] = []
        child_fds: list[int] = []
        try:
            if pty is None:
                for child_reads in (True, False, False):
                    r, w = os.pipe()  # both ends close-on-exec until Popen dup2s them
                    (child_fds if child_reads else parent_fds).append(r)
                    (parent_fds if child_reads else child_fds).append(w)
                stdin, stdout, stderr = child_fds
            else:
                master, slave = os.openpty()
                parent_fds.append(master)
                child_fds.append(slave)
                _configure_tty(slave, pty)
                stdin = stdout = stderr = slave
            preexec = None
            if pty is not None or reset:
                preexec = functools.partial(_child_setup, pty is not None, reset)
            popen = subprocess.Popen(
                argv,
                executable=shell,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                env=child_env,
                cwd=cwd,
                close_fds=True,
                restore_signals=True,
                start_new_session=True,
                preexec_fn=preexec,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            for fd in parent_fds:
                os.close(fd)
            what = "login shell" if command is None else "command"
            raise BackendError(f"cannot start {what} with {shell!r}: {exc}") from exc
        finally:
            # The child has its copies now (or there is no child); holding the slave
            # would also keep a pty master from ever seeing EIO.
            for fd in child_fds:
                os.close(fd)

        _GUARD.add(popen.pid)
        for fd in parent_fds:
            os.set_blocking(fd, False)
        if pty is None:
            stdin_fd, stdout_fd, stderr_fd = parent_fds
            return LocalProcess(
                loop=loop, popen=popen, stdin_fd=stdin_fd, stdout_fd=stdout_fd,
                stderr_fd=stderr_fd, on_stdout=on_stdout, on_stderr=on_stderr,
                on_stdin_flow=on_stdin_flow, kill_grace=self._kill_grace,
            )  # fmt: skip
        # One master for both directions; LocalProcess closes it once, at the end.
        return LocalProcess(
            loop=loop, popen=popen, stdin_fd=parent_fds[0], stdout_fd=parent_fds[0],
            stderr_fd=None, on_stdout=on_stdout, on_stderr=on_stderr,
            on_stdin_flow=on_stdin_flow, kill_grace=self._kill_grace,
        )  # fmt: skip
