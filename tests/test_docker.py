"""backend.type docker against a real engine: podman's Docker API service (started by
tests/docker_engine.py, with an image built from busybox-static; no registry).

Every connection gets a fresh container and leaves nothing behind; the ContainerSSH
conformance cases run in it; sftp and scp go through the configured subsystem; two
users get two containers with their own settings (the handler API); each way the
engine can fail (image, create, start, stop, remove) reaches the client through the
specs; an owner that ends while the engine still works leaves nothing (a proxy holds
the engine's request for as long as the test wants); SIGTERM removes every container,
and after `kill -9` the next server removes what the killed one left.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from docker_engine import IMAGE, EngineProxy, EngineUnavailable, Podman, TLSEngine
from protocol_client import ProtocolClient, string, uint32

import conftest
from conftest import PASSWORD, USERNAME, LiveServer

HOST_LABEL = "io.sshspec.host"
WAIT = 10.0


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    try:
        engine = Podman.start(tmp_path_factory.mktemp("podman"))
    except EngineUnavailable as exc:
        pytest.skip(f"no Docker API engine: {exc}")
    yield engine
    engine.stop()


@pytest.fixture
def proxy(podman: Podman, tmp_path: Path) -> Iterator[EngineProxy]:
    engine = EngineProxy(podman.socket, tmp_path / "engine.sock")
    yield engine
    engine.close()


def docker(socket: Path, **settings: Any) -> dict[str, Any]:
    """The config overrides of a docker backend server on the engine at ``socket``."""
    return {"backend": {"type": "docker"},
            "docker": {"host": f"unix://{socket}", "image": IMAGE, "pull": "never", **settings}}


def ssh(server: LiveServer, command: str, *options: str, input: bytes | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*server.ssh_args(*options), command], input=input, capture_output=True,
                          timeout=timeout)


def connect(server: LiveServer, username: str = USERNAME, password: str = PASSWORD,
            **kwargs: Any) -> Any:
    return asyncssh.connect(server.host, server.port, username=username, password=password,
                            known_hosts=None, client_keys=None, preferred_auth="password", **kwargs)


def codes(records: list[dict[str, Any]], container: str | None = None) -> list[str]:
    return [r["code"] for r in records if container is None or r["labels"].get("container") == container]


def containers_of(records: list[dict[str, Any]]) -> list[str]:
    """The container names the log speaks of, in order of appearance."""
    return list(dict.fromkeys(r["labels"]["container"] for r in records if r["labels"].get("container")))


def all_removed(server: LiveServer, count: int) -> list[dict[str, Any]]:
    return server.wait_for(lambda rs: codes(rs).count("DOCKER_CONTAINER_REMOVE_SUCCESSFUL") >= count, WAIT)


def check_log(server: LiveServer) -> None:
    done = subprocess.run([*conftest.SSHSPEC, "check", "--complete", str(server.log)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_aiodocker_stream_reach_in() -> None:
    """`_half_close` reaches into aiodocker's exec stream (HACKS.md): fail loudly if it moves."""
    from aiodocker.stream import Stream
    stream = Stream(None, None)  # type: ignore[arg-type]
    assert hasattr(stream, "_resp"), "aiodocker's Stream lost _resp: see HACKS.md, aiodocker"


# --- a fresh container per connection, and what runs in it --------------------------------------------


@pytest.fixture(scope="module")
def served(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path]]:
    """One docker backend server for the conformance cases, with a writable bind mount."""
    tmp = tmp_path_factory.mktemp("docker-served")
    data = tmp / "data"
    data.mkdir()
    live = conftest.start_server(tmp, "docker-conformance", config=docker(
        podman.socket, mounts=[{"source": str(data), "target": "/data", "readOnly": False}]))
    yield live, data
    assert live.stop() == 0
    assert podman.names(HOST_LABEL) == []
    check_log(live)


def test_each_connection_runs_in_a_fresh_container(served: tuple[LiveServer, Path], podman: Podman) -> None:
    live, _ = served
    before = len(containers_of(live.records()))
    first = ssh(live, "cat /proc/1/cmdline; echo; hostname")
    second = ssh(live, "cat /proc/1/cmdline; echo; hostname")
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    idle, host = first.stdout.decode().splitlines()
    assert idle.startswith("/bin/sh\0-c\0trap 'exit 0' TERM INT"), idle  # PID 1 is the idle command
    assert host != os.uname().nodename and host != second.stdout.decode().splitlines()[1]
    records = all_removed(live, before + 2)
    names = containers_of(records)[before:]
    assert len(names) == 2
    for name in names:
        assert codes(records, name) == [
            "DOCKER_IMAGE_PULL_NEEDED_CHECKING", "DOCKER_CONTAINER_CREATE", "DOCKER_CONTAINER_START",
            "DOCKER_CONTAINER_RUNNING", "DOCKER_CONTAINER_STOP", "DOCKER_CONTAINER_REMOVE",
            "DOCKER_CONTAINER_REMOVE_SUCCESSFUL"]
    assert not set(podman.names(HOST_LABEL)) & set(names)  # nothing left after the disconnect


def test_input_after_a_window_change_sees_the_new_size(served: tuple[LiveServer, Path]) -> None:
    """A window change reaches the program before the input the client sent after it,
    as with sshd's pty: the engine's resize is an API call of its own, and `stty size`
    right behind it once read the old size (a full run hung on it)."""
    live, _ = served
    sizes = [(80 + i, 25 + i) for i in range(1, 31)]

    async def main() -> list[bytes]:
        async with connect(live) as conn:
            proc = await conn.create_process(term_type="xterm", term_size=(80, 25), encoding=None)
            proc.stdin.write(b"PS1=; stty -echo; echo RE''ADY\n")  # no prompt, no echo from here
            await asyncio.wait_for(proc.stdout.readuntil(b"READY\r\n"), 20)
            seen = []
            for cols, rows in sizes:
                proc.change_terminal_size(cols, rows)
                proc.stdin.write(b"stty size\n")
                seen.append(await asyncio.wait_for(proc.stdout.readuntil(b"\r\n"), 20))
            proc.stdin.write(b"exit\n")
            await proc.wait_closed()
            return seen

    assert asyncio.run(main()) == [f"{rows} {cols}\r\n".encode() for cols, rows in sizes]


@pytest.mark.parametrize("held", [pytest.param(r"^POST \S*/containers/\S+/exec ", id="exec-create"),
                                  pytest.param(r"^POST \S*/exec/\S+/start ", id="exec-start")])
def test_a_window_change_sent_while_the_exec_is_made_reaches_it(proxy: EngineProxy, server_factory: Any,
                                                                held: str) -> None:
    """A window-change the client sends while its shell's exec is still being made (the
    engine's exec create, or its start, held by the proxy) waits in the core's queue
    for the start's outcome (specs/session.yaml: starting) and then resizes the exec,
    after the start's own resize to the pty-req's size: `stty size` reads the new size."""
    live = server_factory(docker(proxy.path))
    hold = proxy.hold(held)
    c = ProtocolClient.connect(live.port)
    try:
        c.service_request()
        assert c.next_auth_reply(WAIT) == "SERVICE_ACCEPT"
        c.auth_password(USERNAME, PASSWORD)
        assert c.next_auth_reply(WAIT) == "USERAUTH_SUCCESS"
        chan = c.open_channel()
        assert c.open_reply(chan, WAIT) == "OPEN_CONFIRMATION"
        pty = string("xterm") + uint32(80) + uint32(25) + uint32(0) + uint32(0) + string(b"")
        c.request(chan, "pty-req", pty)
        assert c.next_channel_reply(chan, WAIT) == "CHANNEL_SUCCESS"
        c.request(chan, "shell")
        hold.wait()
        c.request(chan, "window-change", uint32(120) + uint32(40) + uint32(0) + uint32(0), want_reply=False)
        hold.release()
        assert c.next_channel_reply(chan, 30) == "CHANNEL_SUCCESS"
        c.data(chan, b"stty size\n")

        def output() -> bytes:
            return b"".join(e.value for e in c.channels[chan].events if e.kind == "data")
        assert c.wait_until(lambda: b"40 120" in output(), 20), output()
        assert b"25 80" not in output()
        c.data(chan, b"exit\n")
        assert c.wait_closed(chan, 20)
    finally:
        hold.release()
        c.close_all()
    assert live.stop() == 0
    check_log(live)


def test_window_changes_queued_back_to_back_are_one_entry() -> None:
    """While an exec's input waits, window changes queue in order with it; back to back
    only the last size can be seen, so a flood of them stays one entry between two
    pieces of input (in-process: the exec's queue, before any engine call; the
    container stand-in gives only what the constructor reads)."""
    from types import SimpleNamespace

    from sshspec.adapters.backend_docker import _Exec, _Resize

    async def main() -> list[object]:
        container = SimpleNamespace(settings=SimpleNamespace(agent=None))
        exec_ = _Exec(None, container, None, None)  # type: ignore[arg-type]
        for n in range(10_000):
            exec_.resize(80 + n % 7, 25)
        exec_.write(b"stty size\n")
        exec_.resize(100, 30)
        exec_.resize(120, 40)
        return list(exec_._inbuf)

    assert asyncio.run(main()) == [_Resize(80 + 9_999 % 7, 25), b"stty size\n", _Resize(120, 40)]


def test_conformance_cases_in_a_container(served: tuple[LiveServer, Path]) -> None:
    """ContainerSSH's cases (echo, env, pty + window-change, exit 42, signal), and input to EOF."""
    live, _ = served
    done = ssh(live, 'echo "Hello world!"')
    assert (done.returncode, done.stdout) == (0, b"Hello world!\n"), done.stderr
    assert ssh(live, "exit 42").returncode == 42
    done = ssh(live, 'echo "$FOO [$LD_PRELOAD]"', "-o", "SetEnv=FOO=bar LD_PRELOAD=/tmp/evil.so")
    assert done.stdout == b"bar []\n", done.stderr

    async def main() -> None:
        async with connect(live) as conn:
            # pty + window-change
            proc = await conn.create_process(term_type="xterm", term_size=(80, 25), encoding=None)
            proc.stdin.write(b"echo START $TERM; stty size\n")
            assert b"START xterm" in await proc.stdout.readuntil(b"25 80\r\n")
            proc.change_terminal_size(120, 30)
            proc.stdin.write(b"stty size\n")
            await proc.stdout.readuntil(b"30 120\r\n")
            proc.stdin.write(b"exit 5\n")
            await proc.wait_closed()
            assert proc.exit_status == 5
            # a signal reaches the program (and its trap)
            proc = await conn.create_process(
                "trap 'echo got; exit 7' USR1; echo ready; while :; do sleep 0.05; done", encoding=None)
            await proc.stdout.readuntil(b"ready\n")
            proc.send_signal("USR1")
            assert await proc.stdout.read() == b"got\n"
            await proc.wait_closed()
            assert proc.exit_status == 7
            # input to its end (the client's EOF half-closes the exec), 4 MiB both ways
            data = os.urandom(4 * 1024 * 1024)
            result = await conn.run("cat; echo end >&2", input=data, encoding=None)
            assert result.stdout == data and result.stderr == b"end\n" and result.exit_status == 0
            # a killed program, without docker.agent: the engine reports 128+N (see
            # adapters/backend_docker.py; test_a_program_killed_by_a_signal_is_exit_signal has the agent)
            result = await conn.run("kill -TERM $$")
            assert result.exit_status == 143 and result.exit_signal is None
            # a channel closed under a running program ends it (and its group) in the container
            proc = await conn.create_process("sleep 600 & echo started; wait", encoding=None)
            assert await proc.stdout.readline() == b"started\n"
            proc.close()
            for _ in range(100):  # polling the container's process list
                if "sleep 600" not in str((await conn.run("ps")).stdout):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the closed channel's program still runs")
    asyncio.run(main())


def test_sftp_and_scp_through_the_subsystem(served: tuple[LiveServer, Path], tmp_path: Path) -> None:
    live, data = served
    source = tmp_path / "upload.bin"
    source.write_bytes(os.urandom(300_000))
    back = tmp_path / "back.bin"
    batch = tmp_path / "batch"
    batch.write_text(f"put {source} /tmp/in-container.bin\nget /tmp/in-container.bin {back}\nls /tmp\n")
    args = live.ssh_args()
    options, target = args[3:-1], args[-1]
    done = subprocess.run(["sftp", "-b", str(batch), "-P", str(live.port), *options, target],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert back.read_bytes() == source.read_bytes()
    # scp (the sftp protocol since OpenSSH 9) into the bind mount, and back from another container
    done = subprocess.run(["scp", "-P", str(live.port), *options, str(source), f"{target}:/data/up.bin"],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (data / "up.bin").read_bytes() == source.read_bytes()
    again = tmp_path / "again.bin"
    done = subprocess.run(["scp", "-P", str(live.port), *options, f"{target}:/data/up.bin", str(again)],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert again.read_bytes() == source.read_bytes()


def test_two_users_get_their_own_containers(podman: Podman, server_factory: Any) -> None:
    """Per-user settings through the handler API (apps:PerUserContainers)."""
    live = server_factory(docker(podman.socket), handler="apps:PerUserContainers")
    script = ("hostname; echo $WHO; cat /sys/fs/cgroup/memory/memory.limit_in_bytes "
              "/sys/fs/cgroup/pids/pids.max")

    async def main() -> tuple[list[str], list[str]]:
        async with connect(live, "ann", "ann") as ann, connect(live, "bob", "bob") as bob:
            a, b = await asyncio.gather(ann.run(script), bob.run(script))
            return str(a.stdout).split(), str(b.stdout).split()
    ann, bob = asyncio.run(main())
    assert ann[0] != bob[0]
    assert (ann[1], bob[1]) == ("ann", "bob")
    assert bob[2:] == [str(64 * 1024 * 1024), "64"] and ann[3] == "1024"
    all_removed(live, 2)
    assert podman.names(HOST_LABEL) == []


# --- the engine failing: through the existing specs to the client --------------------------------------


def rejected(live: LiveServer, username: str, password: str | None = None) -> str:
    """Log in as ``username`` (password: the name unless given): refused after
    authentication; the reason the log gives."""
    async def main() -> None:
        async with connect(live, username, password or username):
            pass
    before = codes(live.records()).count("SSH_BACKEND_REJECTED_HANDSHAKE")
    with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError)):
        asyncio.run(main())
    records = live.wait_for_code("SSH_BACKEND_REJECTED_HANDSHAKE", before + 1)
    reason = [r for r in records if r["code"] == "SSH_BACKEND_REJECTED_HANDSHAKE"][-1]["labels"]["reason"]
    return str(reason)


def test_an_engine_failure_rejects_the_user_with_its_reason(podman: Podman, server_factory: Any) -> None:
    live = server_factory(docker(podman.socket), handler="apps:FailingContainers")
    assert "is not present" in rejected(live, "absent")  # docker.pull never
    assert "sshspec-no-such-network" in rejected(live, "badnet")  # the create fails
    assert "/nonexistent" in rejected(live, "badcmd")  # the start fails; the container is removed
    records = live.wait_for(lambda rs: codes(rs).count("DOCKER_CONTAINER_REMOVE_SUCCESSFUL") == 1)
    absent, badnet, badcmd = containers_of(records)
    assert codes(records, absent) == ["DOCKER_IMAGE_PULL_NEEDED_CHECKING", "DOCKER_IMAGE_PULL_FAILED"]
    assert codes(records, badnet)[-1] == "DOCKER_CONTAINER_CREATE_FAILED"
    assert codes(records, badcmd)[3:] == ["DOCKER_CONTAINER_START_FAILED", "DOCKER_CONTAINER_REMOVE",
                                          "DOCKER_CONTAINER_REMOVE_SUCCESSFUL"]
    # The connection: authenticated, refused by the backend, disconnected; the client
    # never saw USERAUTH_SUCCESS (asyncssh raised PermissionDenied or DisconnectError).
    cid = next(r["labels"]["connectionId"] for r in records if r["labels"].get("container") == badcmd)
    connection = [r["code"] for r in records if r["labels"].get("connectionId") == cid
                  and not r["labels"].get("container")]
    assert connection[-3:] == ["SSH_AUTH_SUCCESSFUL", "SSH_BACKEND_REJECTED_HANDSHAKE", "SSH_DISCONNECTED"]
    assert podman.names(HOST_LABEL) == []
    # pull always: the engine pulls (here from a registry that is not there) and fails
    pulling = server_factory(docker(podman.socket, pull="always", image="127.0.0.1:1/sshspec-absent:1"))
    assert "127.0.0.1:1" in rejected(pulling, USERNAME, PASSWORD)
    assert codes(pulling.records(), containers_of(pulling.records())[0]) == [
        "DOCKER_IMAGE_PULL_NEEDED_CHECKING", "DOCKER_IMAGE_PULL", "DOCKER_IMAGE_PULL_FAILED"]


def test_max_containers(podman: Podman, server_factory: Any) -> None:
    live = server_factory(docker(podman.socket, maxContainers=1))
    first = ProtocolClient.connect(live.port)  # holds the one container there is room for
    try:
        first.service_request()
        assert first.next_auth_reply(WAIT) == "SERVICE_ACCEPT"
        first.auth_password(USERNAME, PASSWORD)
        assert first.next_auth_reply(WAIT) == "USERAUTH_SUCCESS"
        assert "docker.maxContainers (1)" in rejected(live, USERNAME, PASSWORD)
    finally:
        first.close_all()
    records = all_removed(live, 1)
    assert "DOCKER_CONTAINER_LIMIT" in codes(records)
    assert ssh(live, "echo room again").stdout == b"room again\n"


def test_session_mode_gives_each_session_a_container(podman: Podman, server_factory: Any) -> None:
    live = server_factory(docker(podman.socket, mode="session"), handler="apps:FailingContainers")

    async def main() -> tuple[str, str, str]:
        async with connect(live, "ok", "ok") as conn:
            a, b = await asyncio.gather(conn.run("hostname"), conn.run("hostname"))
            # the first two are gone once their sessions closed; the connection lives on
            records = live.wait_for(lambda rs: codes(rs).count("DOCKER_CONTAINER_REMOVE_SUCCESSFUL") == 2)
            assert codes(records)[-1] == "DOCKER_CONTAINER_REMOVE_SUCCESSFUL"
            c = await conn.run("hostname")
            return str(a.stdout), str(b.stdout), str(c.stdout)
    a, b, c = asyncio.run(main())
    assert len({a, b, c}) == 3
    records = all_removed(live, 3)
    assert [n.rsplit("-", 1)[1] for n in containers_of(records)] == ["s1", "s2", "s3"]

    async def failing() -> None:
        async with connect(live, "badnet", "badnet") as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("true")  # the exec request fails: its container could not be made
    asyncio.run(failing())
    records = live.wait_for_code("DOCKER_CONTAINER_CREATE_FAILED")
    failed = [r for r in records if r["code"] == "SSH_CHANNEL_REQUEST_FAILED"]
    assert failed and "sshspec-no-such-network" in failed[0]["labels"]["reason"]
    assert podman.names(HOST_LABEL) == []


# --- nothing leaks: SIGTERM, kill -9 ------------------------------------------------------------------


def test_sigterm_ends_programs_and_removes_every_container(podman: Podman, server_factory: Any) -> None:
    live = server_factory(docker(podman.socket))
    client = subprocess.Popen(
        [*live.ssh_args(), "trap 'echo term; exit 3' TERM; echo ready; while :; do sleep 0.1; done"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert client.stdout is not None and client.stdout.readline() == b"ready\n"
        assert len(podman.names(HOST_LABEL)) == 1
        assert live.stop() == 0  # waits for the container's removal
        out, _ = client.communicate(timeout=WAIT)
    finally:
        client.kill()
    assert (client.returncode, out) == (3, b"term\n")
    assert podman.names(HOST_LABEL) == []
    records = live.records()
    assert codes(records)[-3:] == ["DOCKER_CONTAINER_REMOVE", "DOCKER_CONTAINER_REMOVE_SUCCESSFUL",
                                   "SSH_STOPPED"]
    check_log(live)


def test_kill_9_then_the_next_start_removes_what_it_left(podman: Podman, server_factory: Any,
                                                        tmp_path: Path) -> None:
    """5 live containers, `kill -9` of the server: the next server started on this host
    removes all 5 (DOCKER_CONTAINER_ORPHANED), within 10 s of its start."""
    killed = server_factory(docker(podman.socket), log_dir=tmp_path)  # its log ends mid-way
    clients = [subprocess.Popen([*killed.ssh_args(), "echo up; sleep 600"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL) for _ in range(5)]
    try:
        for client in clients:
            assert client.stdout is not None and client.stdout.readline() == b"up\n"
        left = podman.names(HOST_LABEL)
        assert len(left) == 5
        killed.process.send_signal(signal.SIGKILL)
        killed.process.wait(WAIT)
        assert podman.names(HOST_LABEL) == left  # nobody removed them
        started = time.monotonic()
        successor = server_factory(docker(podman.socket))
        records = successor.wait_for(
            lambda rs: codes(rs).count("DOCKER_CONTAINER_REMOVE_SUCCESSFUL") == 5, timeout=10)
        while podman.names(HOST_LABEL):  # the engine's view agrees
            assert time.monotonic() - started < 10, podman.names(HOST_LABEL)
            time.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        for client in clients:
            client.kill()
            client.wait()
    assert sorted(containers_of(records)) == left
    for name in left:
        assert codes(records, name) == ["DOCKER_CONTAINER_ORPHANED", "DOCKER_CONTAINER_REMOVE",
                                        "DOCKER_CONTAINER_REMOVE_SUCCESSFUL"]
    print(f"5 orphans removed {elapsed:.2f} s after the successor's start began")


# --- the owner ends while the engine works, and an engine that goes away -------------------------------

# The engine request a container waits for in each state (the proxy holds it).
HELD = {
    "pulling": r"^GET \S*/images/\S+/json",
    "creating": r"^POST \S*/containers/create",
    "starting": r"^POST \S*/containers/\S+/start",
}


def authenticate(live: LiveServer, user: str) -> tuple[ProtocolClient, str]:
    """A raw client whose good password is being admitted (its container on the way)."""
    before = {r["labels"].get("connectionId") for r in live.records()}
    c = ProtocolClient.connect(live.port)
    c.service_request()
    assert c.next_auth_reply(WAIT) == "SERVICE_ACCEPT"
    c.auth_password(user, user)
    records = live.wait_for(lambda rs: any(r["code"] == "SSH_AUTH_SUCCESSFUL"
                                           and r["labels"].get("connectionId") not in before for r in rs))
    return c, next(r["labels"]["connectionId"] for r in records if r["code"] == "SSH_AUTH_SUCCESSFUL"
                   and r["labels"].get("connectionId") not in before)


@pytest.mark.parametrize(("state", "user", "after"), [
    ("pulling", "ok", []),  # nothing was made: the check's answer changes nothing
    ("creating", "ok", ["DOCKER_CONTAINER_REMOVE", "DOCKER_CONTAINER_REMOVE_SUCCESSFUL"]),
    ("creating", "badnet", ["DOCKER_CONTAINER_CREATE_FAILED"]),
    ("starting", "ok", ["DOCKER_CONTAINER_REMOVE", "DOCKER_CONTAINER_REMOVE_SUCCESSFUL"]),
    ("starting", "badcmd", ["DOCKER_CONTAINER_START_FAILED", "DOCKER_CONTAINER_REMOVE",
                            "DOCKER_CONTAINER_REMOVE_SUCCESSFUL"]),
])
def test_the_owner_leaves_while_the_engine_works(podman: Podman, proxy: EngineProxy, server_factory: Any,
                                                 state: str, user: str, after: list[str]) -> None:
    live = server_factory(docker(proxy.path), handler="apps:FailingContainers")
    hold = proxy.hold(HELD[state])
    c, cid = authenticate(live, user)
    try:
        hold.wait()
        c.drop()  # the client goes away while the engine request is held
        records = live.wait_for(lambda rs: "DOCKER_CONTAINER_CANCELLED" in codes(rs))
        assert [r["code"] for r in records if r["labels"].get("connectionId") == cid][-3:] == [
            "SSH_HANDSHAKE_FAILED", "SSH_DISCONNECTED", "DOCKER_CONTAINER_CANCELLED"]
    finally:
        hold.release()
        c.close_all()
    (name,) = containers_of(live.records())
    if after:
        live.wait_for(lambda rs: codes(rs, name)[-1] == after[-1])
    assert live.stop() == 0
    assert codes(live.records(), name)[codes(live.records(), name).index("DOCKER_CONTAINER_CANCELLED") + 1:] \
        == after
    assert podman.names(HOST_LABEL) == []
    check_log(live)


def test_an_engine_gone_leaves_the_container_to_the_next_start(podman: Podman, proxy: EngineProxy,
                                                               server_factory: Any) -> None:
    """The engine cannot be reached when the connection ends: the stop and the remove fail
    (the container is left, failed); the next server started here removes it."""
    live = server_factory(docker(proxy.path))
    client = subprocess.Popen([*live.ssh_args(), "echo up; sleep 600"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    try:
        assert client.stdout is not None and client.stdout.readline() == b"up\n"
        proxy.down()
        client.kill()
        client.wait()
        records = live.wait_for(lambda rs: "DOCKER_CONTAINER_REMOVE_FAILED" in codes(rs))
    finally:
        client.kill()
    (name,) = containers_of(records)
    # The program's stream ended with the engine: its exit code cannot be asked for either
    # (DOCKER_EXIT_CODE_FAILED), unless the client's end released the container first.
    assert [c for c in codes(records, name)[4:] if c != "DOCKER_EXIT_CODE_FAILED"] == [
        "DOCKER_CONTAINER_STOP", "DOCKER_CONTAINER_STOP_FAILED", "DOCKER_CONTAINER_REMOVE",
        "DOCKER_CONTAINER_REMOVE_FAILED"]
    assert codes(records, name)[4] in ("DOCKER_EXIT_CODE_FAILED", "DOCKER_CONTAINER_STOP")
    assert live.stop() == 0
    assert podman.names(HOST_LABEL) == [name]  # left behind, labelled
    proxy.up()
    successor = server_factory(docker(proxy.path))
    records = successor.wait_for(lambda rs: "DOCKER_CONTAINER_REMOVE_SUCCESSFUL" in codes(rs))
    assert codes(records, name) == ["DOCKER_CONTAINER_ORPHANED", "DOCKER_CONTAINER_REMOVE",
                                    "DOCKER_CONTAINER_REMOVE_SUCCESSFUL"]
    assert podman.names(HOST_LABEL) == []
    check_log(live)


# --- back-pressure -------------------------------------------------------------------------------------


def test_a_client_that_stops_reading_cannot_grow_the_server(podman: Podman, server_factory: Any,
                                                           tmp_path: Path) -> None:
    """`yes` in the container, a client that granted itself a huge window and stopped
    reading: the server stops reading the exec's stream, the engine stops reading the
    program, and the server's memory stays put."""
    from test_hostile import rss_growth_while_a_client_stops_reading
    live = server_factory(docker(podman.socket))
    grown = rss_growth_while_a_client_stops_reading(live, tmp_path, 2)
    assert grown < 16 * 1024, f"server RSS grew {grown} KiB in 2 s with a non-reading client"
    all_removed(live, 1)
    assert podman.names(HOST_LABEL) == []


def test_a_client_that_sends_faster_than_the_program_reads(podman: Podman, server_factory: Any) -> None:
    """32 MiB of stdin to a program that does not read yet: the server holds at most 64 KiB
    for the exec and stops reading the channel, so the client's window closes and the rest
    waits at the client; the server's memory stays put. Once the program reads, all of it
    flows, to the client's EOF."""
    from test_faults import rss_kib
    live = server_factory(docker(podman.socket))
    size = 32 * 1024 * 1024

    async def main() -> tuple[int, int, int]:
        async with connect(live) as conn:
            proc = await conn.create_process(
                "trap 'go=1' USR1; echo ready; while [ -z \"$go\" ]; do sleep 0.05; done; "
                "wc -c; echo done", encoding=None)
            assert await proc.stdout.readline() == b"ready\n"
            before = rss_kib(live.process.pid)
            proc.stdin.write(b"x" * size)
            await asyncio.sleep(2)  # a measuring window, not a synchronisation: unbounded, it all goes
            grown = rss_kib(live.process.pid) - before
            unsent = proc.channel.get_write_buffer_size()
            proc.send_signal("USR1")  # the program reads now
            await proc.stdin.drain()
            proc.stdin.write_eof()
            out = await proc.stdout.read()
            await proc.wait_closed()
            assert out.split() == [str(size).encode(), b"done"] and proc.exit_status == 0, out
            return grown, size - unsent, unsent
    grown, sent, unsent = asyncio.run(main())
    print(f"while the program did not read: {sent} bytes left the client, {unsent} waited there; "
          f"server RSS grew {grown} KiB")
    assert sent < 12 * 1024 * 1024, f"{sent} bytes reached the server for a program that did not read"
    assert grown < 16 * 1024, f"server RSS grew {grown} KiB while the program did not read"
    all_removed(live, 1)
    assert live.stop() == 0
    check_log(live)


# --- with a config server: its answer first, then the container ----------------------------------------


def test_the_config_server_answers_then_the_container_starts(podman: Podman, server_factory: Any) -> None:
    """One login, both waits of `authenticated` in order: while the config server holds its
    answer no container exists and no USERAUTH_SUCCESS went out; released, its `docker`
    settings (env, memory, pids) and `environment` make the container, then SUCCESS."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from authconfig_server import AuthConfigServer

    acs = AuthConfigServer().start()
    try:
        user = "held-docker"
        acs.passwords[user] = "pw"
        acs.configs[user] = {
            "config": {"docker": {"env": {"WHO": "configured"}, "memory": "64m", "pids": 64}},
            "environment": {"FROM_ANSWER": {"value": "yes"}}}
        live = server_factory({**docker(podman.socket),
                               "auth": {"webhook": {"url": acs.url, "timeout": "60s", "authTimeout": "60s"}},
                               "configserver": {"url": acs.url, "timeout": "60s", "configTimeout": "60s"}})
        c = ProtocolClient.connect(live.port)
        try:
            c.service_request()
            assert c.next_auth_reply(WAIT) == "SERVICE_ACCEPT"
            c.auth_password(user, "pw")
            live.wait_for(lambda rs: any(r["code"] == "SSH_AUTH_SUCCESSFUL" for r in rs))
            assert c.next_auth_reply(0.5) == "NOTHING"  # the config server holds its answer
            assert podman.names(HOST_LABEL) == []  # and no container is made before it answers
        finally:
            c.close_all()
        records = live.wait_for(lambda rs: any(r["code"] == "SSH_DISCONNECTED" for r in rs))
        assert not containers_of(records)  # the client left while the config server decided
        acs.release()

        async def main() -> list[str]:
            async with connect(live, user, "pw") as conn:
                result = await conn.run("echo $WHO $FROM_ANSWER; cat "
                                        "/sys/fs/cgroup/memory/memory.limit_in_bytes "
                                        "/sys/fs/cgroup/pids/pids.max")
                return str(result.stdout).split()
        assert asyncio.run(main()) == ["configured", "yes", str(64 * 1024 * 1024), "64"]
        records = all_removed(live, 1)
        name = containers_of(records)[0]
        order = [r["code"] for r in records
                 if r["code"] in ("SSH_AUTH_SUCCESSFUL", "SSH_HANDSHAKE_SUCCESSFUL")
                 or r["labels"].get("container") == name]
        assert order[-9:] == ["SSH_AUTH_SUCCESSFUL", "DOCKER_IMAGE_PULL_NEEDED_CHECKING",
                              "DOCKER_CONTAINER_CREATE", "DOCKER_CONTAINER_START",
                              "DOCKER_CONTAINER_RUNNING", "SSH_HANDSHAKE_SUCCESSFUL",
                              "DOCKER_CONTAINER_STOP", "DOCKER_CONTAINER_REMOVE",
                              "DOCKER_CONTAINER_REMOVE_SUCCESSFUL"], order
        assert [body["username"] for body in acs.of("config")] == [user, user]
        assert live.stop() == 0
        check_log(live)
    finally:
        acs.stop()


# --- a container that dies under its connection; exec and signal failures; the sweep --------------------


def test_a_container_that_dies_ends_its_connection(podman: Podman, server_factory: Any) -> None:
    """Killed from outside while a program runs in it: the engine's wait returns, the
    container is removed (DOCKER_CONTAINER_DIED) and the connection closed with that reason."""
    live = server_factory(docker(podman.socket))

    async def main() -> None:
        async with connect(live) as conn:
            proc = await conn.create_process("echo up; sleep 600", encoding=None)
            assert await proc.stdout.readline() == b"up\n"
            (name,) = podman.names(HOST_LABEL)
            podman.cli("kill", "-s", "KILL", name)
            await asyncio.wait_for(conn.wait_closed(), WAIT)  # not a hang: the server closed it
    asyncio.run(main())
    records = all_removed(live, 1)
    (name,) = containers_of(records)
    assert codes(records, name)[3:] == ["DOCKER_CONTAINER_RUNNING", "DOCKER_CONTAINER_DIED",
                                        "DOCKER_CONTAINER_REMOVE", "DOCKER_CONTAINER_REMOVE_SUCCESSFUL"]
    died = next(r for r in records if r["code"] == "DOCKER_CONTAINER_DIED")
    assert "exit code 137" in died["labels"]["reason"], died
    cid = died["labels"]["connectionId"]
    (gone,) = [r for r in records if r["code"] == "SSH_DISCONNECTED" and r["labels"]["connectionId"] == cid]
    assert "ended under its owner" in gone["labels"]["reason"]
    assert podman.names(HOST_LABEL) == []
    assert live.stop() == 0
    check_log(live)


def test_exec_failures_have_their_codes(podman: Podman, proxy: EngineProxy,
                                                   server_factory: Any) -> None:
    """The engine refuses an exec: the session's request fails (DOCKER_EXEC_CREATE_FAILED);
    it refuses the exec that delivers a signal (DOCKER_EXEC_SIGNAL_FAILED) or a resize
    (DOCKER_EXEC_RESIZE_FAILED): the program runs on; it does not tell an exit code
    (DOCKER_EXIT_CODE_FAILED): the client gets 255."""
    live = server_factory(docker(proxy.path))
    exec_create = r"^POST \S*/containers/\S+/exec "

    async def main() -> None:
        async with connect(live) as conn:
            proxy.fail(exec_create, 409, "container is not running (injected)")
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("true")
            proxy.clear()
            proc = await conn.create_process(
                "trap 'echo got; exit 7' USR1; echo ready; while :; do sleep 0.05; done", encoding=None)
            await proc.stdout.readuntil(b"ready\n")
            proxy.fail(exec_create, 500, "no exec for you (injected)")
            proc.send_signal("USR1")
            await asyncio.to_thread(live.wait_for_code, "DOCKER_EXEC_SIGNAL_FAILED")
            proxy.clear()
            proc.send_signal("USR1")  # delivered now: the program ran on
            assert await proc.stdout.read() == b"got\n"
            await proc.wait_closed()
            assert proc.exit_status == 7
            # a window-change the engine refuses: logged, the program goes on with its size
            proc = await conn.create_process(term_type="xterm", term_size=(80, 25), encoding=None)
            proc.stdin.write(b"stty size\n")
            await proc.stdout.readuntil(b"25 80\r\n")
            proxy.fail(r"^POST \S*/exec/\S+/resize", 500, "no resize (injected)")
            proc.change_terminal_size(120, 30)
            await asyncio.to_thread(live.wait_for_code, "DOCKER_EXEC_RESIZE_FAILED")
            proxy.clear()
            proc.stdin.write(b"stty size; exit 4\n")
            await proc.stdout.readuntil(b"25 80\r\n")
            await proc.wait_closed()
            assert proc.exit_status == 4
            # an exit code the engine does not tell: 255, as OpenSSH's client says for none
            proxy.fail(r"^GET \S*/exec/\S+/json", 500, "no inspect (injected)")
            result = await conn.run("echo out; exit 3", encoding=None)
            assert (result.stdout, result.exit_status) == (b"out\n", 255)
            proxy.clear()
    asyncio.run(main())
    records = all_removed(live, 1)
    failed = [r for r in records if r["code"] == "DOCKER_EXEC_CREATE_FAILED"]
    assert len(failed) == 1 and "container is not running (injected)" in failed[0]["labels"]["reason"]
    request = [r for r in records if r["code"] == "SSH_CHANNEL_REQUEST_FAILED"]
    assert request and "container is not running (injected)" in request[0]["labels"]["reason"]
    signal_failed = next(r for r in records if r["code"] == "DOCKER_EXEC_SIGNAL_FAILED")
    assert "signal USR1" in signal_failed["labels"]["reason"]
    resize = next(r for r in records if r["code"] == "DOCKER_EXEC_RESIZE_FAILED")
    assert "to 120x30" in resize["labels"]["reason"] and "no resize (injected)" in resize["labels"]["reason"]
    exit_code = next(r for r in records if r["code"] == "DOCKER_EXIT_CODE_FAILED")
    assert "no inspect (injected)" in exit_code["labels"]["reason"]
    assert live.stop() == 0
    check_log(live)


def test_a_sweep_the_engine_cannot_answer_has_its_code(podman: Podman, proxy: EngineProxy,
                                                       server_factory: Any) -> None:
    proxy.down()
    live = server_factory(docker(proxy.path))
    records = live.wait_for_code("DOCKER_SWEEP_FAILED")
    reason = next(r for r in records if r["code"] == "DOCKER_SWEEP_FAILED")["labels"]["reason"]
    assert "cannot list this host's containers" in reason and "engine" in reason, reason
    proxy.up()
    assert ssh(live, "echo served").stdout == b"served\n"  # the server serves on
    all_removed(live, 1)
    assert live.stop() == 0
    check_log(live)


# --- a remote engine: tcp:// with TLS client certificates ----------------------------------------------


@pytest.fixture
def tls_engine(podman: Podman, tmp_path: Path) -> Iterator[TLSEngine]:
    engine = TLSEngine.start(podman.socket, tmp_path)
    yield engine
    engine.stop()


def test_a_remote_engine_over_tls_with_a_client_certificate(podman: Podman, tls_engine: TLSEngine,
                                                           server_factory: Any) -> None:
    """haproxy terminates TLS in front of podman and wants a certificate its CA signed
    (`verify required`), as `dockerd --tlsverify` does: with ours, everything works
    through it (exec, input to EOF, a pty, the container's removal); with a stranger's,
    the engine refuses the handshake and the user is refused with that reason."""
    pki = tls_engine.pki
    remote = {"host": f"tcp://127.0.0.1:{tls_engine.port}",
              "tls": {"ca": str(pki["ca"]), "cert": str(pki["cert"]), "key": str(pki["key"])}}
    live = server_factory({**docker(podman.socket), "docker": {**docker(podman.socket)["docker"], **remote}})

    async def main() -> None:
        async with connect(live) as conn:
            result = await conn.run("hostname; cat /proc/1/cmdline", encoding=None)
            assert result.exit_status == 0 and b"trap 'exit 0' TERM" in result.stdout
            data = os.urandom(1024 * 1024)
            result = await conn.run("cat; echo end >&2", input=data, encoding=None)
            assert result.stdout == data and result.stderr == b"end\n" and result.exit_status == 0
            proc = await conn.create_process(term_type="xterm", term_size=(80, 25), encoding=None)
            proc.stdin.write(b"stty size; exit 3\n")
            await proc.stdout.readuntil(b"25 80\r\n")
            await proc.wait_closed()
            assert proc.exit_status == 3
    asyncio.run(main())
    all_removed(live, 1)
    assert podman.names(HOST_LABEL) == []

    stranger = {**remote, "tls": {"ca": str(pki["ca"]), "cert": str(pki["stranger-cert"]),
                                  "key": str(pki["stranger-key"])}}
    refused = server_factory({**docker(podman.socket), "docker": {**docker(podman.socket)["docker"],
                                                                  **stranger}})
    reason = rejected(refused, USERNAME, PASSWORD)
    print("a stranger's certificate:", reason)
    assert "engine TLS" in reason, reason
    records = refused.records()
    sweep, user = containers_of(records)  # its start-up sweep was refused as well
    assert codes(records, user) == ["DOCKER_IMAGE_PULL_NEEDED_CHECKING", "DOCKER_IMAGE_PULL_FAILED"]
    assert codes(records, sweep) == ["DOCKER_SWEEP_FAILED"]
    assert "engine TLS" in next(r for r in records if r["code"] == "DOCKER_SWEEP_FAILED")["labels"]["reason"]
    # And the other way round: an engine whose certificate our CA did not sign.
    impostor = {**remote, "tls": {**remote["tls"], "ca": str(pki["other-ca"])}}
    doubted = server_factory({**docker(podman.socket), "docker": {**docker(podman.socket)["docker"],
                                                                  **impostor}})
    reason = rejected(doubted, USERNAME, PASSWORD)
    print("an engine we do not trust:", reason)
    assert "engine TLS" in reason and "certificate verify failed" in reason, reason
    for server in (live, refused, doubted):
        assert server.stop() == 0
        check_log(server)


def test_a_session_container_that_dies_ends_its_session(podman: Podman, server_factory: Any) -> None:
    """Session mode: the session whose container was killed ends (its program went with the
    container); the connection goes on, and its next session gets a new container."""
    live = server_factory(docker(podman.socket, mode="session"))

    async def main() -> tuple[int | None, str]:
        async with connect(live) as conn:
            proc = await conn.create_process("echo up; sleep 600", encoding=None)
            assert await proc.stdout.readline() == b"up\n"
            (name,) = podman.names(HOST_LABEL)
            podman.cli("kill", "-s", "KILL", name)
            await asyncio.wait_for(proc.wait_closed(), WAIT)
            again = await conn.run("hostname")
            return proc.exit_status, str(again.stdout)
    status, hostname = asyncio.run(main())
    print("the killed container's session ended with exit status", status)
    assert status is not None and status != 0
    records = all_removed(live, 2)
    first, second = containers_of(records)
    # Which comes first is a race the spec allows both ways: the engine's wait saying it
    # died, or the session (whose program's stream ended with it) releasing it.
    assert codes(records, first)[3:] in (
        ["DOCKER_CONTAINER_RUNNING", "DOCKER_CONTAINER_DIED", "DOCKER_CONTAINER_REMOVE",
         "DOCKER_CONTAINER_REMOVE_SUCCESSFUL"],
        ["DOCKER_CONTAINER_RUNNING", "DOCKER_CONTAINER_STOP", "DOCKER_CONTAINER_REMOVE",
         "DOCKER_CONTAINER_REMOVE_SUCCESSFUL"]), codes(records, first)
    assert hostname.strip() and "DOCKER_CONTAINER_RUNNING" in codes(records, second)
    assert podman.names(HOST_LABEL) == []
    assert live.stop() == 0
    check_log(live)


# --- exit signals: sshspec-agent, the program's parent in the container (docker.agent) ----------------

AGENT_SOURCE = Path(__file__).resolve().parent.parent / "adapters" / "agent" / "sshspec-agent.c"


@pytest.fixture(scope="session")
def sshspec_agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """adapters/agent/sshspec-agent.c built as `make agent` builds it (static: the test image
    has no libc), bind-mounted into the containers read-only (docker.agent.source)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: cannot build sshspec-agent (.ci/system-packages installs it)")
    out = tmp_path_factory.mktemp("agent") / "sshspec-agent"
    done = subprocess.run(["gcc", "-static", "-Os", "-Wall", "-Wextra", "-Werror", "-s", "-o", str(out),
                           str(AGENT_SOURCE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"gcc could not build {AGENT_SOURCE}:\n{done.stderr}"
    return out


def ended(result: Any) -> tuple[int | None, tuple[str, bool] | None]:
    """A program's end as the client saw it: (exit status, (signal, core dumped))."""
    return result.exit_status, None if result.exit_signal is None else tuple(result.exit_signal[:2])


@pytest.mark.parametrize(("said", "code", "status"), [
    ("signal TERM 0\n", 143, (None, "TERM", False)),
    ("signal SEGV 1\n", 139, (None, "SEGV", True)),
    ("signal 34 0\n", 162, (None, "34", False)),  # a real-time signal has a number only, as locally
    ("exit 143\n", 143, (143, None, False)),
    ("exit 129\n", 143, None),  # not what the engine said: not believed
    ("signal term 0\n", 143, None),
    ("signal TERM yes\n", 143, None),
    ("", 143, None),
    ("Error: exec failed\n", 143, None),
])
def test_the_agents_status_line(said: str, code: int, status: tuple[Any, ...] | None) -> None:
    from sshspec.adapters.backend_docker import agent_status
    got = agent_status(said, code)
    assert (got if got is None else (got.code, got.signal, got.core_dumped)) == status


def with_agent(podman: Podman, agent: Path, **settings: Any) -> dict[str, Any]:
    return docker(podman.socket, agent={"source": str(agent)}, **settings)


@pytest.mark.parametrize("mode", ["connection", "session"])
def test_a_program_killed_by_a_signal_is_exit_signal(podman: Podman, sshspec_agent: Path,
                                                     server_factory: Any, mode: str) -> None:
    """With docker.agent the client learns how a program ended as it would from sshd (and the
    local backend): killed by its own signal, by one from outside the container's exec (SIGKILL,
    which nothing can forward), or by one the client sent: exit-signal with its name; `exit 143`
    stays exit-status 143, though the engine says 143 for both."""
    live = server_factory(with_agent(podman, sshspec_agent, mode=mode))

    async def main() -> None:
        async with connect(live) as conn:
            result = await conn.run("kill -TERM $$")
            assert ended(result) == (-1, ("TERM", False)), result
            result = await conn.run("exit 143")
            assert ended(result) == (143, None)
            result = await conn.run("echo out; echo err >&2; exit 42")  # the pid line is not output
            assert (result.stdout, result.stderr, result.exit_status) == ("out\n", "err\n", 42)
            # SIGKILL from outside: podman exec in the same container (its hostname is its id)
            proc = await conn.create_process("echo $$ $(hostname); sleep 600")
            pid, container = (await proc.stdout.readline()).split()
            podman.cli("exec", container, "kill", "-KILL", pid)
            await proc.wait_closed()
            assert ended(proc) == (-1, ("KILL", False))
            # the client's signal request: delivered to the program's group, which dies of it
            proc = await conn.create_process("echo ready; while :; do sleep 0.05; done")
            assert await proc.stdout.readline() == "ready\n"
            proc.send_signal("USR1")
            await proc.wait_closed()
            assert ended(proc) == (-1, ("USR1", False))
            # a trap still runs, and its exit code is an exit code
            proc = await conn.create_process("trap 'echo got; exit 7' USR1; echo ready; "
                                             "while :; do sleep 0.05; done")
            assert await proc.stdout.readline() == "ready\n"
            proc.send_signal("USR1")
            assert await proc.stdout.read() == "got\n"
            await proc.wait_closed()
            assert ended(proc) == (7, None)
    asyncio.run(main())
    records = all_removed(live, 1 if mode == "connection" else 6)
    assert "DOCKER_AGENT_READ_FAILED" not in codes(records)
    signals = [r["labels"].get("signal") for r in records if r["code"] == "SSH_EXIT_SIGNAL"]
    assert signals == ["TERM", "KILL", "USR1"], signals
    assert podman.names(HOST_LABEL) == []
    assert live.stop() == 0
    check_log(live)


def test_the_agent_keeps_the_program_on_the_terminal(podman: Podman, sshspec_agent: Path,
                                                     server_factory: Any, tmp_path: Path) -> None:
    """On a pty the agent's child leads the terminal's foreground process group: OpenSSH's
    `ssh -tt` Ctrl-C reaches it (and kills it: exit-signal INT), a window-change's SIGWINCH
    reaches it; and PID 1 is still the container's idle command."""
    live = server_factory(with_agent(podman, sshspec_agent))
    client = subprocess.Popen(
        [*live.ssh_args("-tt"), "set -- $(cat /proc/$$/stat); echo \"pid=$$ pgrp=$5 tpgid=$8\"; sleep 600"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert client.stdout is not None and client.stdin is not None
        line = client.stdout.readline().decode().split()
        pid = line[0].split("=")[1]
        assert line == [f"pid={pid}", f"pgrp={pid}", f"tpgid={pid}"], line  # its own group, foreground
        client.stdin.write(b"\x03")  # Ctrl-C: the tty's SIGINT for its foreground group
        client.stdin.flush()
        client.wait(WAIT)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    records = live.wait_for_code("SSH_EXIT_SIGNAL")
    assert [r["labels"].get("signal") for r in records if r["code"] == "SSH_EXIT_SIGNAL"] == ["INT"]
    # a subsystem runs under the agent too: sftp's protocol gets no pid line
    batch = tmp_path / "batch"
    batch.write_text("ls -1 /usr/lib/openssh\n")
    args = live.ssh_args()
    done = subprocess.run(["sftp", "-b", str(batch), "-P", str(live.port), *args[3:-1], args[-1]],
                          capture_output=True, timeout=60)
    assert done.returncode == 0 and b"sftp-server" in done.stdout, done.stderr

    async def main() -> None:
        async with connect(live) as conn:
            proc = await conn.create_process("trap 'stty size' WINCH; cat /proc/1/cmdline; echo; echo ready; "
                                             "while :; do sleep 0.05; done", term_type="xterm",
                                             term_size=(80, 25), encoding=None)
            head = await proc.stdout.readuntil(b"ready\r\n")
            assert head.startswith(b"/bin/sh\0-c\0trap 'exit 0' TERM INT"), head
            proc.change_terminal_size(100, 40)
            await proc.stdout.readuntil(b"40 100\r\n")
            proc.stdin.write(b"\x03")
            await proc.wait_closed()
            assert proc.exit_signal is not None and proc.exit_signal[0] == "INT"
    asyncio.run(main())
    all_removed(live, 3)
    assert live.stop() == 0
    check_log(live)


def test_an_agent_that_cannot_tell_leaves_the_engines_code(podman: Podman, proxy: EngineProxy,
                                                           sshspec_agent: Path, server_factory: Any) -> None:
    """The exec that reads the agent's status fails, or finds none (statusDir is not writable):
    DOCKER_AGENT_READ_FAILED, and the client gets the engine's 128+N, as without the agent."""
    live = server_factory({**docker(proxy.path), "docker": {
        **docker(proxy.path)["docker"], "agent": {"source": str(sshspec_agent)}}})
    unwritable = server_factory(docker(podman.socket, readOnlyRootfs=True,
                                       agent={"source": str(sshspec_agent), "statusDir": "/etc"}))

    def execs(since: int) -> int:
        return sum(line.endswith(b"/exec HTTP/1.1") for line in proxy.seen[since:])

    async def main() -> None:
        async with connect(live) as conn:
            # the status is read with one more exec, only when the engine says more than 128
            before = len(proxy.seen)
            assert ended(await conn.run("exit 3")) == (3, None)
            assert execs(before) == 1
            before = len(proxy.seen)
            assert ended(await conn.run("kill -TERM $$")) == (-1, ("TERM", False))
            assert execs(before) == 2
            proc = await conn.create_process("read line; kill -TERM $$")  # its exec is made
            proxy.fail(r"^POST \S*/containers/\S+/exec ", 500, "no exec for you (injected)")
            proc.stdin.write("go\n")
            await proc.wait_closed()
            assert ended(proc) == (143, None)
            proxy.clear()
        async with connect(unwritable) as conn:
            result = await conn.run("kill -TERM $$")
            assert ended(result) == (143, None)
    asyncio.run(main())
    for server, why in ((live, "no exec for you (injected)"), (unwritable, "left no status")):
        records = all_removed(server, 1)
        failed = [r for r in records if r["code"] == "DOCKER_AGENT_READ_FAILED"]
        assert len(failed) == 1 and why in failed[0]["labels"]["reason"], failed
        assert server.stop() == 0
        check_log(server)
