"""The local session backend, against real subprocesses (sh, tput, yes, head, sleep).

No sleeps stand in for synchronisation: tests wait for output with events, and for
kernel-side facts (a pipe filled up, a process died) by polling /proc under a deadline.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import shutil
import termios
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from sshspec.adapters import backend_local
from sshspec.adapters.backend_local import (
    DEFAULT_ENV_DENY,
    BackendError,
    ExitStatus,
    LocalBackend,
    LocalProcess,
    PtyRequest,
)

TIMEOUT = 10.0
SH = "/bin/sh"

needs_tput = pytest.mark.skipif(
    shutil.which("tput") is None, reason="tput not installed (Debian: apt-get install ncurses-bin)"
)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    # Every test is bounded: a hang is a failure, not a stuck CI job.
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


class Sink:
    """Collects one output stream; lets a test await a pattern appearing in it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._changed = asyncio.Event()

    def __call__(self, chunk: bytes) -> None:
        self.data += chunk
        self._changed.set()

    async def wait_for(self, pattern: bytes | re.Pattern[bytes]) -> re.Match[bytes] | None:
        def found() -> re.Match[bytes] | None | bool:
            if isinstance(pattern, bytes):
                return pattern in self.data
            return pattern.search(self.data)

        while not (result := found()):
            self._changed.clear()
            await self._changed.wait()
        return result if isinstance(result, re.Match) else None

    async def wait_len(self, n: int) -> None:
        while len(self.data) < n:
            self._changed.clear()
            await self._changed.wait()


async def start(
    command: str | None,
    *,
    backend: LocalBackend | None = None,
    env: dict[str, str] | None = None,
    pty: PtyRequest | None = None,
) -> tuple[LocalProcess, Sink, Sink]:
    out, err = Sink(), Sink()
    proc = await (backend or LocalBackend(shell=SH)).start(
        command=command, env=env or {}, pty=pty, on_stdout=out, on_stderr=err
    )
    return proc, out, err


async def run_command(command: str, **kwargs: Any) -> tuple[ExitStatus, bytes, bytes]:
    proc, out, err = await start(command, **kwargs)
    status = await proc.wait()
    return status, bytes(out.data), bytes(err.data)


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll a kernel-side condition that gives no event to wait on."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)
    assert condition(), what


def proc_state(pid: int) -> str | None:
    """State letter from /proc/<pid>/stat, None when the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def not_running(pid: int) -> bool:
    # The test runs under a pid 1 that may not reap orphans: a zombie counts as dead.
    return proc_state(pid) in (None, "Z")


def reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# --- exec without a pty --------------------------------------------------------------


def test_exec_echo_hello_world() -> None:
    status, out, err = run(run_command('echo "Hello world!"'))
    assert (status, out, err) == (ExitStatus(code=0, signal=None), b"Hello world!\n", b"")


def test_exit_code() -> None:
    status, _, _ = run(run_command("exit 42"))
    assert status == ExitStatus(code=42, signal=None)


def test_stdout_and_stderr_apart() -> None:
    status, out, err = run(run_command("echo out; echo err >&2; echo out2"))
    assert (status.code, out, err) == (0, b"out\nout2\n", b"err\n")


def test_stdin_roundtrip_and_eof() -> None:
    async def main() -> tuple[ExitStatus, bytes]:
        proc, out, _ = await start("cat; echo done")
        proc.write_stdin(b"abc")
        proc.write_stdin(b"def\n")
        proc.close_stdin()
        return await proc.wait(), bytes(out.data)

    assert run(main()) == (ExitStatus(0, None), b"abcdef\ndone\n")


def test_large_stdin_is_buffered_and_flow_controlled() -> None:
    # 1 MiB into a program that reads nothing until we say so: the writer must buffer
    # without blocking the loop and ask the adapter to stop reading the channel.
    size = 1024 * 1024

    async def main() -> tuple[list[bool], bytes]:
        flow: list[bool] = []
        out = Sink()
        proc = await LocalBackend(shell=SH).start(
            command="read -r go; wc -c", env={}, pty=None, on_stdout=out,
            on_stderr=Sink(), on_stdin_flow=flow.append,
        )  # fmt: skip
        proc.write_stdin(b"go\n" + b"x" * size)
        assert flow == [True] and proc.stdin_buffered > 0
        proc.close_stdin()
        await proc.wait()
        return flow, bytes(out.data)

    flow, out = run(main())
    assert flow == [True, False]
    assert int(out) == size


def test_command_runs_in_home_directory() -> None:
    status, out, _ = run(run_command('pwd; echo "$HOME"'))
    cwd, home = out.decode().splitlines()
    assert status.code == 0
    assert cwd == (home if os.path.isdir(home) else "/")


def test_login_shell_without_pty_gets_dash_argv0() -> None:
    async def main() -> bytes:
        proc, out, _ = await start(None)
        proc.write_stdin(b'echo "argv0=$0"\nexit 3\n')
        status = await proc.wait()
        assert status == ExitStatus(3, None)
        return bytes(out.data)

    assert b"argv0=-sh\n" in run(main())


def test_missing_shell_raises_backend_error_without_leaking_fds() -> None:
    async def main() -> None:
        before = open_fds()
        with pytest.raises(BackendError, match="/nonexistent/shell"):
            await start("true", backend=LocalBackend(shell="/nonexistent/shell"))
        assert open_fds() == before

    run(main())


# --- environment ----------------------------------------------------------------------


def test_client_env_reaches_program() -> None:
    status, out, _ = run(run_command('echo "$FOO"', env={"FOO": "bar"}))
    assert (status.code, out) == (0, b"bar\n")


def test_ld_preload_refused_and_never_reaches_child() -> None:
    backend = LocalBackend(shell=SH)
    assert not backend.env_allowed("LD_PRELOAD", "/tmp/evil.so")
    assert not backend.env_allowed("LD_AUDIT", "x")
    assert not backend.env_allowed("DYLD_INSERT_LIBRARIES", "x")
    assert not backend.env_allowed("GLIBC_TUNABLES", "x")
    assert backend.env_allowed("FOO", "bar")
    assert backend.env_allowed("LANG", "C.UTF-8")
    assert {"LD_*", "DYLD_*"} <= DEFAULT_ENV_DENY

    # Passed anyway (an adapter bug): start() filters again. A nonexistent preload
    # would also make ld.so complain on stderr.
    env = {"LD_PRELOAD": "/nonexistent/evil.so", "LD_LIBRARY_PATH": "/tmp", "FOO": "1"}
    status, out, err = run(run_command("env", env=env))
    names = {line.split("=", 1)[0] for line in out.decode().splitlines()}
    assert status.code == 0 and err == b""
    assert "FOO" in names
    assert not {n for n in names if n.startswith("LD_")}


def test_env_name_and_size_limits() -> None:
    backend = LocalBackend()
    assert not backend.env_allowed("", "x")
    assert not backend.env_allowed("A=B", "x")
    assert not backend.env_allowed("1ABC", "x")
    assert not backend.env_allowed("A", "x\0y")
    assert not backend.env_allowed("A", "x" * (backend_local.MAX_ENV_VALUE + 1))
    assert not backend.env_allowed("A" * (backend_local.MAX_ENV_NAME + 1), "x")
    custom = LocalBackend(env_deny=["SECRET", "X_*"])
    assert not custom.env_allowed("SECRET", "1") and custom.env_allowed("SECRETS", "1")
    assert not custom.env_allowed("X_Y", "1") and custom.env_allowed("LD_PRELOAD", "1")
    with pytest.raises(ValueError):
        LocalBackend(env_deny=["A*B"])


def test_base_env_server_env_and_no_leak_from_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSHSPEC_SERVER_ONLY_CANARY", "1")
    backend = LocalBackend(shell=SH, max_env=2)
    client = {"USER": "mallory", "PATH": "/evil", "A": "1", "B": "2", "C": "3"}
    env = backend.child_env(client, server_env={"SSH_CONNECTION": "1 2 3 4"})
    assert "SSHSPEC_SERVER_ONLY_CANARY" not in env
    # The first max_env allowed client vars are kept, but the base wins over them.
    assert env["USER"] != "mallory" and env["PATH"] == backend_local.DEFAULT_PATH
    assert "A" not in env and "TERM" not in env
    assert env["SSH_CONNECTION"] == "1 2 3 4"
    assert set(env) >= {"HOME", "USER", "LOGNAME", "SHELL", "PATH"}
    assert env["SHELL"] == SH

    status, out, _ = run(run_command("env", backend=LocalBackend(shell=SH), env={"Q": "1"}))
    assert b"SSHSPEC_SERVER_ONLY_CANARY" not in out and b"\nQ=1\n" in b"\n" + out


# --- pty --------------------------------------------------------------------------------


@needs_tput
def test_pty_term_and_size() -> None:
    pty = PtyRequest(term="xterm", cols=80, rows=25)
    status, out, err = run(
        run_command('printf "%s %s %s\\n" "$TERM" "$(tput cols)" "$(tput lines)"', pty=pty)
    )
    assert status == ExitStatus(0, None)
    assert out == b"xterm 80 25\r\n" and err == b""


def test_pty_merges_stderr_and_is_controlling_terminal() -> None:
    status, out, err = run(
        # /dev/tty opens only for a process that has a controlling terminal.
        run_command("echo err >&2; tty -s && echo tty; (exec </dev/tty) 2>/dev/null && echo ctty",
                    pty=PtyRequest("xterm", 80, 25))
    )  # fmt: skip
    assert status.code == 0 and err == b""
    assert out == b"err\r\ntty\r\nctty\r\n"


@needs_tput
def test_resize_seen_by_running_program() -> None:
    async def main() -> bytes:
        proc, out, _ = await start(
            "trap 'tput cols; exit 0' WINCH; echo ready; while :; do sleep 0.05; done",
            pty=PtyRequest("xterm", 80, 25),
        )
        await out.wait_for(b"ready")
        proc.resize(120, 25)
        assert await proc.wait() == ExitStatus(0, None)
        return bytes(out.data)

    assert run(main()).endswith(b"120\r\n")


@needs_tput
def test_interactive_login_shell_on_pty() -> None:
    async def main() -> ExitStatus:
        proc, out, _ = await start(None, pty=PtyRequest("xterm", 80, 25))
        proc.write_stdin(b'echo "cols=$(tput cols) argv0=$0"\n')
        await out.wait_for(b"cols=80 argv0=-sh\r\n")
        proc.resize(120, 40)
        proc.write_stdin(b'echo "cols=$(tput cols) lines=$(tput lines)"\n')
        await out.wait_for(b"cols=120 lines=40\r\n")
        proc.write_stdin(b"exit 0\n")
        return await proc.wait()

    assert run(main()) == ExitStatus(0, None)


def test_pty_close_stdin_sends_eof_even_after_partial_line() -> None:
    async def main(data: bytes) -> tuple[ExitStatus, bytes]:
        proc, out, _ = await start("cat; echo END", pty=PtyRequest("xterm", 80, 25))
        proc.write_stdin(data)
        proc.close_stdin()
        return await proc.wait(), bytes(out.data)

    # A full line: one ^D ends cat's input. Echo + cat's copy = the line twice.
    status, out = run(main(b"line\n"))
    assert status == ExitStatus(0, None) and out.count(b"line") == 2 and out.endswith(b"END\r\n")
    # A partial line: the first ^D hands "part" to cat, the second is EOF.
    status, out = run(main(b"part"))
    assert status == ExitStatus(0, None) and out.count(b"part") == 2 and out.endswith(b"END\r\n")


def test_pty_modes_applied() -> None:
    # RFC 4254 opcodes: 53 ECHO off, 1 VINTR = ^G, 72 ONLCR off, 200 unknown (ignored).
    pty = PtyRequest("xterm", 80, 25, modes={53: 0, 1: 7, 72: 0, 200: 1})
    status, out, _ = run(run_command("stty -a", pty=pty))
    assert status.code == 0
    assert re.search(rb"(^|\s)-echo(\s|$)", out)
    assert b"intr = ^G" in out
    assert re.search(rb"(^|\s)-onlcr(\s|$)", out)
    assert b"\r\n" not in out  # ONLCR off really took effect


def test_apply_modes_unit() -> None:
    attrs = [0, 0, termios.CS8, termios.ECHO, termios.B38400, termios.B38400, [b"\0"] * 32]
    backend_local.apply_modes(
        attrs, {53: 0, 51: 1, 5: 255, 90: 1, 128: 9600, 129: 12345, 36: 1, 999: 1}
    )
    assert attrs[3] == termios.ICANON
    assert attrs[0] == termios.ICRNL
    assert attrs[2] & termios.CSIZE == termios.CS7
    assert attrs[4] == termios.B9600 and attrs[5] == termios.B38400  # 12345 is no speed
    assert attrs[6][termios.VEOF] == b"\0"  # 255 = disabled


# --- signals and exit status ------------------------------------------------------------


def test_signal_usr1_trapped() -> None:
    async def main() -> tuple[ExitStatus, bytes]:
        proc, out, _ = await start(
            "trap 'echo got; exit 7' USR1; echo ready; while :; do sleep 0.1; done"
        )
        await out.wait_for(b"ready\n")
        proc.send_signal("USR1")
        return await proc.wait(), bytes(out.data)

    status, out = run(main())
    assert status == ExitStatus(code=7, signal=None)
    assert out == b"ready\ngot\n"


def test_killed_by_term() -> None:
    async def main() -> ExitStatus:
        proc, out, _ = await start("echo ready; while :; do sleep 0.1; done")
        await out.wait_for(b"ready\n")
        with pytest.raises(ValueError):
            proc.send_signal("BOGUS")
        with pytest.raises(ValueError):
            proc.send_signal("SIGTERM")  # SSH names have no SIG prefix
        proc.send_signal("TERM")
        return await proc.wait()

    assert run(main()) == ExitStatus(code=None, signal="TERM", core_dumped=False)


# --- output delivery and back-pressure --------------------------------------------------


def test_all_output_delivered_before_wait_returns() -> None:
    mib = 1024 * 1024

    async def main() -> tuple[ExitStatus, int, int, int]:
        proc, out, err = await start(f"head -c {mib} /dev/zero; head -c {mib // 2} /dev/zero >&2")
        status = await proc.wait()
        # Nothing may trickle in after wait() returned.
        counts = len(out.data), len(err.data)
        for _ in range(5):
            await asyncio.sleep(0)
        assert (len(out.data), len(err.data)) == counts
        return status, *counts, out.data.count(0)

    status, n_out, n_err, zeros = run(main())
    assert status == ExitStatus(0, None)
    assert (n_out, n_err, zeros) == (mib, mib // 2, mib)


def test_all_pty_output_delivered_before_wait_returns() -> None:
    size = 256 * 1024

    async def main() -> tuple[ExitStatus, int]:
        proc, out, _ = await start(f"head -c {size} /dev/zero", pty=PtyRequest("xterm", 80, 25))
        return await proc.wait(), len(out.data)

    assert run(main()) == (ExitStatus(0, None), size)


def test_background_child_holding_stdout_does_not_hang_wait() -> None:
    async def main() -> tuple[ExitStatus, bytes]:
        proc, out, _ = await start("sleep 30 & echo $!; echo main-done")
        status = await proc.wait()
        return status, bytes(out.data)

    status, out = run(main())
    bg_pid = int(out.split()[0])
    try:
        assert status == ExitStatus(0, None)
        assert out.endswith(b"main-done\n")
    finally:
        os.kill(bg_pid, 9)


def _pipe_fill(pid: int) -> tuple[int, int]:
    """(bytes queued, capacity) of the pipe that is the process's stdout."""
    fd = os.open(f"/proc/{pid}/fd/1", os.O_RDONLY | os.O_NONBLOCK)
    try:
        queued = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4), "little")
        return queued, fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    finally:
        os.close(fd)


def test_pause_output_bounds_buffering_then_resume_and_kill() -> None:
    async def main() -> ExitStatus:
        proc, out, _ = await start("exec yes")
        await out.wait_len(1)
        proc.pause_output()
        paused_at = len(out.data)
        # yes keeps writing until the pipe is full, then blocks in the kernel; nothing
        # of that reaches us (or any buffer of ours) while paused.
        await until(
            lambda: _pipe_fill(proc.pid)[0] >= _pipe_fill(proc.pid)[1] // 2, "pipe filled up"
        )
        assert len(out.data) == paused_at
        proc.resume_output()
        await out.wait_len(paused_at + 64 * 1024)
        proc.kill()
        return await proc.wait()

    status = run(main())
    # yes dies of SIGHUP, or of SIGPIPE writing to the pipe kill() closed.
    assert status.code is None and status.signal in {"HUP", "PIPE"}


async def _read_from_a_full_pipe(proc: LocalProcess) -> int:
    """Output paused until the program fills its 64 KiB pipe, then resumed: the first
    read takes a whole chunk whatever the machine's speed. The pipe's size before."""
    proc.pause_output()
    await until(lambda: _pipe_fill(proc.pid)[0] >= 64 * 1024, "pipe filled up")
    size = _pipe_fill(proc.pid)[1]
    proc.resume_output()
    return size


def test_a_program_that_fills_its_pipe_streams_through_a_bigger_one_every_byte_in_order() -> None:
    """Issue #17: a read that takes a whole 64 KiB chunk (the program writes faster than
    the server reads) grows the program's pipe, so a loop turn carries more; output
    that comes a little at a time keeps the default pipe."""
    expected = b"".join(b"%d\n" % n for n in range(1, 300_001))

    async def main() -> tuple[bytes, int, int, int]:
        proc, out, _ = await start("seq 1 300000; exec sleep 30")
        before = await _read_from_a_full_pipe(proc)
        await out.wait_len(len(expected))
        after = _pipe_fill(proc.pid)[1]
        quiet, said, _ = await start("echo hi; exec sleep 30")
        await said.wait_for(b"hi\n")
        quiet_size = _pipe_fill(quiet.pid)[1]
        for p in (proc, quiet):
            p.kill()
            await p.wait()
        return bytes(out.data), before, after, quiet_size

    data, before, after, quiet_size = run(main())
    assert data == expected
    assert (before, after, quiet_size) == (64 * 1024, backend_local._STREAM_PIPE, 64 * 1024)


def test_at_most_max_stream_pipes_are_grown_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grown pipes are kernel memory clients can make the server hold (a program that
    streams to a client that stops reading): past MAX_STREAM_PIPES a streaming program
    keeps the default pipe, and one that ends gives its place back."""
    monkeypatch.setattr(backend_local, "MAX_STREAM_PIPES", 1)
    mib = 1024 * 1024

    async def streaming() -> LocalProcess:
        proc, out, _ = await start(f"head -c {mib} /dev/zero; exec sleep 30")
        await _read_from_a_full_pipe(proc)
        await out.wait_len(mib)
        return proc

    async def main() -> tuple[list[int], int]:
        before = backend_local._streaming
        first = await streaming()
        second = await streaming()
        sizes = [_pipe_fill(first.pid)[1], _pipe_fill(second.pid)[1]]
        first.kill()
        await first.wait()
        third = await streaming()
        sizes.append(_pipe_fill(third.pid)[1])
        for proc in (second, third):
            proc.kill()
            await proc.wait()
        return sizes, backend_local._streaming - before

    stream = backend_local._STREAM_PIPE
    assert run(main()) == ([stream, 64 * 1024, stream], 0)


def test_paused_output_at_exit_is_still_delivered() -> None:
    # 48 KiB fits in the pipe, so the program can exit while we are paused; the
    # background sleep keeps stdout open, so no EOF comes: only the drain-after-exit
    # can deliver the bytes, and wait() must not return before it has.
    size = 48 * 1024

    async def main() -> tuple[ExitStatus, bytes, int]:
        proc, out, err = await start(f"sleep 30 & echo $! >&2; head -c {size} /dev/zero")
        proc.pause_output()
        # The leader stays an unreaped zombie until its output is delivered.
        await until(lambda: proc_state(proc.pid) == "Z", "program exited")
        waiter = asyncio.ensure_future(proc.wait())
        await asyncio.sleep(0.05)  # give a wrong implementation the chance to finish
        assert not waiter.done() and out.data == b""
        proc.resume_output()
        status = await waiter
        return status, bytes(out.data), int(err.data)

    status, out, bg_pid = run(main())
    os.kill(bg_pid, 9)
    assert (status, out) == (ExitStatus(0, None), b"\0" * size)


# --- kill, leaks -----------------------------------------------------------------------


def test_kill_takes_down_the_group_with_background_child() -> None:
    async def main() -> tuple[ExitStatus, int, int]:
        # The background child ignores SIGHUP (like nohup): only the SIGKILL that
        # follows once the leader is gone can end it.
        proc, out, _ = await start("(trap '' HUP; exec sleep 30) & echo $!; wait")
        match = await out.wait_for(re.compile(rb"^(\d+)\n"))
        assert match is not None
        proc.kill()
        return await proc.wait(), proc.pid, int(match.group(1))

    status, pid, bg_pid = run(main())
    assert status == ExitStatus(code=None, signal="HUP")
    assert reaped(pid)
    run(until(lambda: not_running(bg_pid), "background child killed"))


def test_kill_escalates_to_sigkill_when_sighup_is_ignored() -> None:
    async def main() -> ExitStatus:
        backend = LocalBackend(shell=SH, kill_grace=0.1)
        proc, out, _ = await start(
            "trap '' HUP; echo ready; while :; do sleep 0.05; done", backend=backend
        )
        await out.wait_for(b"ready\n")
        proc.kill()
        return await proc.wait()

    assert run(main()) == ExitStatus(code=None, signal="KILL")


def test_no_fd_or_zombie_leaks() -> None:
    async def main() -> None:
        before = open_fds()
        pids = []
        status, _, _ = await run_command("echo hi; echo ho >&2")
        assert status.code == 0
        status, _, _ = await run_command("tty", pty=PtyRequest("xterm", 80, 25))
        assert status.code == 0
        for pty in (None, PtyRequest("vt100", 80, 25)):
            proc, out, _ = await start("echo ready; cat", pty=pty)
            pids.append(proc.pid)
            proc.write_stdin(b"x" * 100)
            await out.wait_for(b"ready")
            proc.kill()
            await proc.wait()
            proc.kill()  # idempotent after the end
            proc.send_signal("TERM")  # no-op after the end
            proc.resize(10, 10)
            proc.write_stdin(b"ignored")
            proc.close_stdin()
        assert open_fds() == before
        assert all(reaped(pid) for pid in pids)

    run(main())


def test_exit_watch_without_pidfd(monkeypatch: pytest.MonkeyPatch) -> None:
    # Kernels before 5.3 have no pidfd_open: the thread fallback must behave the same.
    monkeypatch.delattr(os, "pidfd_open", raising=False)

    async def main() -> None:
        before = open_fds()
        status, out, _ = await run_command("echo x; exit 5")
        assert (status, out) == (ExitStatus(5, None), b"x\n")
        assert open_fds() == before

    run(main())


def test_wait_can_be_awaited_twice_and_concurrently() -> None:
    async def main() -> None:
        proc, _, _ = await start("exit 9")
        a, b = await asyncio.gather(proc.wait(), proc.wait())
        assert a == b == ExitStatus(9, None)
        assert await proc.wait() == a

    run(main())


def test_callback_exception_does_not_wedge_session() -> None:
    async def main() -> ExitStatus:
        def boom(_: bytes) -> None:
            raise RuntimeError("adapter bug")

        proc = await LocalBackend(shell=SH).start(
            command="echo x", env={}, pty=None, on_stdout=boom, on_stderr=boom
        )
        return await proc.wait()

    assert run(main()) == ExitStatus(0, None)

