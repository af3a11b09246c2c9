"""A real Docker API engine for the docker backend's tests: podman's `system service`,
started here with its own configuration and storage, and a proxy in front of it.

`Podman.start(dir)` runs ``podman system service`` (rootful; runc, cgroupfs, no
default ulimits: what works on this machine class, see issue 15) on a unix socket
in ``dir``, with ``CONTAINERS_CONF`` and ``CONTAINERS_STORAGE_CONF`` pointing at
files in ``dir`` (vfs storage there too), so it shares nothing with another podman
on the machine. It waits for the socket by connecting to it, and imports the test
image from a tarball built here: busybox-static with its applet links, OpenSSH's
sftp-server with the two libraries it needs, an /etc/passwd. No registry.

`EngineProxy` sits between sshspec and the engine (a unix socket forwarding
bytes), so a test can hold a request the backend sent (the container is then in
that state for as long as the test wants: no timing), answer one with an error,
or take the engine away (connections refused) and bring it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE = "localhost/sshspec-test:1"
RUNC = "/usr/sbin/runc"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


class EngineUnavailable(Exception):
    """Podman cannot run here (the reason says why)."""


def build_image_tar(path: Path) -> None:
    """A root filesystem: busybox and its applets, sftp-server, passwd."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    applets = subprocess.run([busybox, "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    with tarfile.open(path, "w") as tar:
        def directory(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        def text(name: str, content: str) -> None:
            data = content.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))

        for name in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "usr/lib", "usr/lib/openssh", "etc",
                     "root", "home", "lib", "lib64", "lib/x86_64-linux-gnu", "proc", "sys", "dev"):
            directory(name)
        directory("tmp", 0o1777)
        tar.add(busybox, "bin/busybox")
        for applet in applets:
            if applet != "bin/busybox":
                info = tarfile.TarInfo(applet)
                info.type, info.linkname = tarfile.SYMTYPE, "/bin/busybox"
                tar.addfile(info)
        tar.add(SFTP_SERVER, SFTP_SERVER.lstrip("/"))
        for lib in _libraries(SFTP_SERVER):
            tar.add(os.path.realpath(lib), lib.lstrip("/"))
        text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/sh\n")
        text("etc/group", "root:x:0:\nnobody:x:65534:\n")


def _libraries(program: str) -> list[str]:
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    return [m.group(1) for m in re.finditer(r"(/\S+) \(0x", out)]


@dataclass
class Podman:
    """A running `podman system service` of our own."""

    root: Path
    process: subprocess.Popen[bytes]
    socket: Path
    env: dict[str, str]
    stderr: Path

    @classmethod
    def start(cls, root: Path) -> Podman:
        podman = shutil.which("podman")
        if podman is None or not os.path.exists(RUNC):
            raise EngineUnavailable("podman or runc is not installed (.ci/system-packages installs them)")
        if os.geteuid() != 0:
            raise EngineUnavailable("the tests run podman rootful and are not root")
        (root / "containers.conf").write_text(
            "[containers]\ndefault_ulimits = []\n"
            f'[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\nevents_logger = "file"\n'
            f'events_logfile_path = "{root}/events.log"\ntmp_dir = "{root}/tmp"\n'
            # An exec's conmon (~1.6 MiB) lingers this long after the exec ended (default
            # 300 s, Docker's exec record lifetime); sshspec reads the exit code at once.
            "exit_command_delay = 10\n")
        (root / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\nrunroot = "{root}/run"\ngraphroot = "{root}/storage"\n')
        env = {**os.environ, "CONTAINERS_CONF": str(root / "containers.conf"),
               "CONTAINERS_STORAGE_CONF": str(root / "storage.conf")}
        sock = root / "podman.sock"
        stderr = root / "service.log"
        with open(stderr, "wb") as err:
            process = subprocess.Popen([podman, "--runtime", RUNC, "system", "service", "--time=0",
                                        f"unix://{sock}"], env=env, stdout=subprocess.DEVNULL, stderr=err,
                                       start_new_session=True)
        engine = cls(root, process, sock, env, stderr)
        try:
            engine._wait_listening(30)
            tar = root / "image.tar"
            build_image_tar(tar)
            engine.cli("import", str(tar), IMAGE)
        except BaseException:
            engine.stop()
            raise
        return engine

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise EngineUnavailable(f"podman system service exited {self.process.returncode}: "
                                        f"{self.stderr.read_text(errors='replace')[-2000:]}")
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(self.socket))
                    return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise EngineUnavailable("podman system service did not listen within 30 s")
            time.sleep(0.02)  # polling the socket: podman says nothing when it listens

    def cli(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(["podman", "--runtime", RUNC, *args], env=self.env, capture_output=True,
                              text=True, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {done.stderr}")
        return done.stdout

    def containers(self, label: str | None = None) -> list[dict[str, Any]]:
        """Every container (running or not), optionally those with a label (k or k=v)."""
        args = ["ps", "-a", "--format", "json"] + (["--filter", f"label={label}"] if label else [])
        return list(json.loads(self.cli(*args) or "[]"))

    def names(self, label: str | None = None) -> list[str]:
        return sorted(c["Names"][0] for c in self.containers(label))

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.cli("rm", "-a", "-f", "-t", "0", check=False)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._end_monitors()
        with contextlib.suppress(Exception):
            shutil.rmtree(self.root / "storage", ignore_errors=True)

    def _end_monitors(self) -> None:
        """conmon keeps an exec's monitor alive for its exit delay (10 s) after the engine
        stopped, then runs `podman container cleanup`, which writes under the root again:
        a caller removing the root meanwhile failed ("Directory not empty": `make bench`
        lost a whole run's results that way). Their containers are gone: end them now."""
        mark = f"{self.root}/".encode()
        monitors = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if os.path.basename(argv[0]) in (b"conmon", b"podman") and any(mark in a for a in argv):
                    monitors.append(int(entry))
        for pid in monitors:  # not our children: a pidfd is what says they exited
            with contextlib.suppress(ProcessLookupError):
                exited = os.pidfd_open(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                    select.select([exited], [], [], 10)
                finally:
                    os.close(exited)


# --- the proxy ----------------------------------------------------------------------------------------


@dataclass
class Hold:
    """A request the proxy keeps from the engine until `release()`."""

    pattern: re.Pattern[bytes]
    arrived: threading.Event = field(default_factory=threading.Event)
    _open: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def wait(self, timeout: float = 10.0) -> None:
        assert self.arrived.wait(timeout), f"no request matching {self.pattern.pattern!r} arrived"

    def release(self) -> None:
        assert self._loop is not None and self._open is not None
        self._loop.call_soon_threadsafe(self._open.set)


class EngineProxy:
    """A unix socket forwarding to the engine's, in a thread of its own.

    ``hold(r"POST \\S*/containers/create")`` keeps the first request matching the
    pattern (and everything after it on its connection) until released: requests
    arrive whole in one read here, so a request line in a read starts a request.
    ``fail(pattern, status, message)`` answers matching requests with that error
    instead of forwarding them. ``down()`` closes every connection and refuses new
    ones (the socket file goes away); ``up()`` serves again."""

    def __init__(self, target: Path, path: Path) -> None:
        self.target = target
        self.path = path
        self.holds: list[Hold] = []
        self.failures: list[tuple[re.Pattern[bytes], int, str]] = []
        self.seen: list[bytes] = []  # request lines, in arrival order
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="engine-proxy", daemon=True)
        self._thread.start()
        self.up()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def up(self) -> None:
        async def serve() -> None:
            self._server = await asyncio.start_unix_server(self._client, str(self.path))
        self._call(serve())

    def down(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for writer in list(self._writers):
                writer.transport.abort()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._call(stop())

    def hold(self, pattern: str) -> Hold:
        hold = Hold(re.compile(pattern.encode()), _loop=self._loop)

        async def make() -> None:
            hold._open = asyncio.Event()
        self._call(make())
        self.holds.append(hold)
        return hold

    def fail(self, pattern: str, status: int = 500, message: str = "injected by the test proxy") -> None:
        self.failures.append((re.compile(pattern.encode()), status, message))

    def clear(self) -> None:
        for hold in self.holds:
            if hold._open is not None:
                hold.release()
        self.holds.clear()
        self.failures.clear()

    def close(self) -> None:
        self.clear()
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(str(self.target))
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        back = asyncio.get_running_loop().create_task(self._pump(up_reader, writer))
        try:
            while data := await reader.read(65536):
                line = data.split(b"\r\n", 1)[0]
                if re.match(rb"^[A-Z]+ /\S* HTTP/1\.[01]$", line):
                    self.seen.append(line)
                    failure = next((f for f in self.failures if f[0].search(line)), None)
                    if failure is not None:
                        body = json.dumps({"message": failure[2], "cause": failure[2]}).encode()
                        writer.write(b"HTTP/1.1 %d Injected\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                     % (failure[1], len(body), body))
                        await writer.drain()
                        break
                    hold = next((h for h in self.holds if not h.arrived.is_set() and h.pattern.search(line)),
                                None)
                    if hold is not None:
                        hold.arrived.set()
                        assert hold._open is not None
                        await hold._open.wait()
                up_writer.write(data)
                await up_writer.drain()
            if up_writer.can_write_eof():
                up_writer.write_eof()  # a half-close (the exec's stdin EOF) passes through
            await back
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            back.cancel()
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()


# --- TLS in front: a remote engine with client certificates -------------------------------------------


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def _certificate(subject: str, key: Any, issuer: tuple[str, Any] | None, *, ca: bool = False,
                 server: bool = False) -> Any:
    """A certificate for ``key``: self-signed (a CA) when ``issuer`` is None, else signed by it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = (subject, key) if issuer is None else issuer
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(root: Path) -> dict[str, Path]:
    """A CA, the engine's server certificate (127.0.0.1) and a client certificate it signed;
    and a client certificate of another CA (the engine must refuse it). PEM files in
    ``root``, as DOCKER_CERT_PATH holds them (ca.pem, cert.pem, key.pem)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def pem(cert: Any) -> bytes:
        return bytes(cert.public_bytes(serialization.Encoding.PEM))

    files: dict[str, Path] = {}

    def write(name: str, data: bytes) -> None:
        files[name] = root / f"{name}.pem"
        files[name].write_bytes(data)

    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("sshspec test CA", ca_key, None, ca=True)
    other_ca = _certificate("another CA", other_key, None, ca=True)
    server_key, client_key, stranger_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    write("ca", pem(ca))
    write("server", pem(_certificate("engine", server_key, ("sshspec test CA", ca_key), server=True))
          + _pem_key(server_key))
    write("cert", pem(_certificate("sshspec", client_key, ("sshspec test CA", ca_key))))
    write("key", _pem_key(client_key))
    write("stranger-cert", pem(_certificate("stranger", stranger_key, ("another CA", other_key))))
    write("stranger-key", _pem_key(stranger_key))
    write("other-ca", pem(other_ca))
    return files


@dataclass
class TLSEngine:
    """haproxy terminating TLS in front of the engine's unix socket, as a remote engine's
    `dockerd --tlsverify` does: a client must show a certificate the CA signed."""

    port: int
    pki: dict[str, Path]
    process: subprocess.Popen[bytes]

    @classmethod
    def start(cls, engine_socket: Path, root: Path) -> TLSEngine:
        if shutil.which("haproxy") is None:
            raise EngineUnavailable("haproxy is not installed (.ci/system-packages installs it)")
        pki = make_pki(root)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        cfg = root / "haproxy.cfg"
        cfg.write_text("\n".join([
            "global", "    maxconn 256",
            # An exec's stream and a container's wait last as long as the program, the container.
            "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 1h",
            "    timeout server 1h", "    timeout tunnel 1h",
            "frontend engine-tls",
            f"    bind 127.0.0.1:{port} ssl crt {pki['server']} ca-file {pki['ca']} verify required",
            "    default_backend engine",
            "backend engine", f"    server podman unix@{engine_socket}", ""]))
        process = subprocess.Popen(["haproxy", "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return cls(port, pki, process)
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    err = process.communicate()[1].decode(errors="replace")
                    raise AssertionError(f"haproxy did not start ({process.returncode}): {err}") from None
                time.sleep(0.02)  # polling the port: haproxy -db says nothing when it listens

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
