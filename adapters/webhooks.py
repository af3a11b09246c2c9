"""ContainerSSH's authentication and configuration webhooks, as a handler.

The request and answer bodies are those of ContainerSSH's authentication and
configuration server API (its OpenAPI document, `containerssh-authconfig.json`),
so a server written for ContainerSSH works unchanged:

* ``POST {auth.webhook.url}/password`` with ``username``, ``remoteAddress``,
  ``connectionId``, ``clientVersion`` and ``passwordBase64``;
* ``POST {auth.webhook.url}/pubkey`` with the same and ``publicKey`` (the
  authorized_keys form, ``ssh-ed25519 AAAA...``);
* both answered by ``{"success": bool, "authenticatedUsername", "metadata",
  "environment", "files"}``;
* ``POST {configserver.url}/config`` after authentication, with the user, the
  connection and the metadata, environment and files the authentication gave
  (those marked ``sensitive`` are not sent on); answered by ``{"config": {...},
  "metadata", "environment", "files"}``, ``config`` being a partial sshspec
  config for this connection (below).

The webhooks are handlers: `WebhookConnection` implements the handler API
(``check_password``, ``check_publickey``, ``accept_user``) without blocking the
event loop. Users listed in ``auth.users`` are decided by the config file alone
(their credentials never leave the server, and they can log in while the
webhook is down); every other user is asked to the webhook. A webhook that
cannot be reached, answers anything but 200 until ``authTimeout``, answers
malformed JSON or more than `MAX_ANSWER` bytes, or fails TLS verification is
`BackendError` with the reason: ``SSH_AUTH_UNAVAILABLE`` for authentication,
``SSH_BACKEND_REJECTED_HANDSHAKE`` for the config server. Never a success.

What a config server may set, per connection: ``backend`` (the name of the
backend, as ContainerSSH's config has it: it must be the one this server runs,
or an object with ``type`` and ``shell``) and, as ContainerSSH does, the
``environment`` of the user's programs (with the authentication's, the config
server's winning). Anything else in ``config`` (``docker``, ``security``...)
refuses the connection with a reason naming it: a setting sshspec cannot apply
is not silently dropped. ``files`` are passed on to the config server, never
written (the local backend has no container to put them in).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import fnmatch
import inspect
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgspec

from sshspec.adapters.backend_local import BackendError
from sshspec.adapters.config import HTTPClientConfig, memory_bytes
from sshspec.adapters.handlers import (
    AuthVerdict,
    ConfiguredHandler,
    ConnectionHandler,
    ConnectionInfo,
    LocalSession,
    SessionHandler,
    UserEntry,
)

# An answer larger than this is malformed: nothing in the API needs more.
MAX_ANSWER = 1 << 20
# Between retries: doubling from RETRY_FIRST up to RETRY_MAX, within the deadline.
RETRY_FIRST, RETRY_MAX = 0.05, 1.0

Observe = Callable[[str, str, float], None]  # webhook, result, seconds
T = TypeVar("T")


# --- the API's bodies (field names as ContainerSSH's OpenAPI document spells them) ---------


class _Body(msgspec.Struct, rename="camel", omit_defaults=True):
    """Requests leave out what is empty; answers may carry fields we do not read."""


class MetadataValue(_Body):
    value: str
    sensitive: bool = False


class BinaryMetadataValue(_Body):
    value: str  # base64
    sensitive: bool = False


class _Connection(_Body):
    username: str
    remote_address: str
    connection_id: str
    client_version: str = ""
    metadata: dict[str, MetadataValue] = {}
    environment: dict[str, MetadataValue] = {}
    files: dict[str, BinaryMetadataValue] = {}


class PasswordAuthRequest(_Connection, kw_only=True):
    password_base64: str


class PublicKeyAuthRequest(_Connection, kw_only=True):
    public_key: str


class AuthResponse(_Body):
    success: bool
    authenticated_username: str = ""
    metadata: dict[str, MetadataValue] = {}
    environment: dict[str, MetadataValue] = {}
    files: dict[str, BinaryMetadataValue] = {}


class ConfigRequest(_Connection):
    authenticated_username: str = ""


class BackendOverride(_Body, forbid_unknown_fields=True):
    type: str | None = None
    shell: str | None = None


class DockerOverride(_Body, forbid_unknown_fields=True):
    """With backend.type docker: this connection's container, over the config's `docker:`."""

    image: str | None = None
    env: dict[str, str] = {}
    memory: str | int | None = None
    cpus: float | None = None
    pids: int | None = None


class ConfigOverride(_Body, forbid_unknown_fields=True):
    """The part of sshspec's config a config server may set for one connection."""

    backend: str | BackendOverride | None = None
    docker: DockerOverride | None = None


class ConfigResponse(_Body):
    config: ConfigOverride = msgspec.field(default_factory=ConfigOverride)
    metadata: dict[str, MetadataValue] = {}
    environment: dict[str, MetadataValue] = {}
    files: dict[str, BinaryMetadataValue] = {}


_ENCODER = msgspec.json.Encoder()


# --- the HTTP client ----------------------------------------------------------------------


class WebhookError(Exception):
    """The webhook gave no usable answer; the text says why (it becomes the log's reason)."""


def ssl_context(client: HTTPClientConfig) -> ssl.SSLContext | None:
    """The TLS settings of an https:// webhook (config.py checked the files at load)."""
    if not client.url.startswith("https://"):
        return None
    context = ssl.create_default_context(cafile=client.cacert or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if client.tls_version == "1.3" \
        else ssl.TLSVersion.TLSv1_2
    if client.cert:
        context.load_cert_chain(client.cert, client.key or None)
    return context


class WebhookClient:
    """POSTs JSON to one webhook: a timeout per call, retries until a deadline, bounded answers.

    The aiohttp session is made in the running loop at the first call (a `--workers`
    process makes its own after the fork) and keeps connections alive between calls.
    """

    def __init__(self, client: HTTPClientConfig, deadline: float, what: str) -> None:
        self.base = client.url.rstrip("/")
        self.timeout = float(client.timeout)
        self.deadline = float(deadline)
        self.what = what  # "auth webhook" / "config server", for reasons
        self.ssl = ssl_context(client)
        self.observe: Observe | None = None  # set by the server when metrics are on
        self._session: Any = None  # aiohttp.ClientSession, made in the loop

    def _client(self) -> Any:
        if self._session is None or self._session.closed:
            import aiohttp  # here: `sshspec diagram` and friends never import it

            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.ssl if self.ssl is not None else False, limit=100),
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, auto_decompress=False,
                headers={"Accept": "application/json", "Accept-Encoding": "identity"})
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(self, endpoint: str, body: _Body, answer: type[T]) -> T:
        """The decoded answer of ``POST {url}/{endpoint}``, or `WebhookError`."""
        import aiohttp

        url = f"{self.base}/{endpoint}"
        payload = _ENCODER.encode(body)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.deadline
        attempts, pause, problem = 0, RETRY_FIRST, "no attempt"
        while True:
            left = give_up - loop.time()
            if left <= 0:
                raise WebhookError(f"{self.what} {url}: {problem} "
                                   f"({attempts} attempts in {self.deadline:g}s)")
            attempts += 1
            started, result = time.perf_counter(), "ok"
            try:
                async with asyncio.timeout(min(self.timeout, left)):
                    status, data = await self._once(url, payload)
                if status == 200:
                    try:
                        return msgspec.json.decode(data, type=answer)
                    except msgspec.DecodeError as exc:
                        result = "malformed"
                        raise WebhookError(f"{self.what} {url}: malformed answer: {exc}") from None
                result, problem = "http_error", f"HTTP {status}"
            except TimeoutError:
                result, problem = "timeout", f"no answer within {self.timeout:g}s"
            except aiohttp.ClientSSLError as exc:
                result = "tls_error"  # a certificate problem does not go away by retrying
                raise WebhookError(f"{self.what} {url}: TLS: {exc}") from None
            except aiohttp.ClientError as exc:
                result, problem = "unreachable", f"{type(exc).__name__}: {exc}"
            except _TooLarge:
                result = "malformed"
                raise WebhookError(f"{self.what} {url}: answer larger than {MAX_ANSWER} bytes") from None
            finally:
                if self.observe is not None:
                    self.observe(endpoint, result, time.perf_counter() - started)
            await asyncio.sleep(min(pause, max(0.0, give_up - loop.time())))
            pause = min(pause * 2, RETRY_MAX)

    async def _once(self, url: str, payload: bytes) -> tuple[int, bytes]:
        async with self._client().post(url, data=payload, allow_redirects=False,
                                       headers={"Content-Type": "application/json"}) as response:
            if response.status != 200:
                return response.status, b""
            if (response.content_length or 0) > MAX_ANSWER:
                raise _TooLarge
            data = bytearray()
            async for chunk in response.content.iter_chunked(65536):
                data += chunk
                if len(data) > MAX_ANSWER:
                    raise _TooLarge
            return 200, bytes(data)


class _TooLarge(Exception):
    pass


# --- the handler ----------------------------------------------------------------------------


def _visible(values: Mapping[str, Any]) -> dict[str, Any]:
    """What is passed on to the next webhook: ContainerSSH drops `sensitive` values."""
    return {name: v for name, v in values.items() if not v.sensitive}


def authorized_key(key: Any) -> str:
    """An asyncssh SSHKey in the authorized_keys form ContainerSSH sends: `type base64`."""
    return f"{key.get_algorithm()} {base64.b64encode(key.public_data).decode()}"


class WebhookHandler(ConfiguredHandler):
    """`ConfiguredHandler` (users from the config, the local backend) plus the
    authentication webhook for every other user and the config server for everyone."""

    def __init__(self, users: Mapping[str, UserEntry], *, auth: WebhookClient | None,
                 password: bool = True, public_key: bool = True, keyboard_interactive: bool = False,
                 config_server: WebhookClient | None = None, backend_type: str = "local",
                 env_deny: tuple[str, ...] = (), max_env: int = 64, shell: str | None = None) -> None:
        super().__init__(users, env_deny=env_deny, max_env=max_env, shell=shell)
        self.auth = auth
        self.auth_password = password and auth is not None
        self.auth_public_key = public_key and auth is not None
        self.auth_kbdint = keyboard_interactive and self.auth_password
        self.config_server = config_server
        self.backend_type = backend_type

    def clients(self) -> list[WebhookClient]:
        return [c for c in (self.auth, self.config_server) if c is not None]

    def connection(self, info: ConnectionInfo) -> WebhookConnection:
        return WebhookConnection(self, info)

    async def aclose(self) -> None:
        for client in self.clients():
            await client.aclose()


class WebhookConnection(ConnectionHandler):
    """One connection's credentials through the webhook, its config from the config server."""

    handler: WebhookHandler

    def __init__(self, handler: WebhookHandler, info: ConnectionInfo) -> None:
        super().__init__(handler, info)
        self.authenticated_username = ""
        self.metadata: dict[str, MetadataValue] = {}
        self.environment: dict[str, MetadataValue] = {}
        self.files: dict[str, BinaryMetadataValue] = {}
        self.shell: str | None = None
        self.docker: DockerOverride | None = None  # the config server's, with backend.type docker
        # The last public key's verdict: a client queries a key, then signs with it
        # (one webhook call for both, as Go's x/crypto/ssh caches it for ContainerSSH).
        self._last_key: tuple[str, bytes, AuthVerdict] | None = None
        # The last successful answer and the user it was about: only that user's
        # metadata may reach the config server (a key queried for another user must not).
        self._granted: tuple[str, AuthResponse] | None = None

    def _static(self, username: str) -> bool:
        return username in self.handler.users

    async def check_password(self, username: str, password: bytes) -> AuthVerdict:
        if self._static(username) or not self.handler.auth_password:
            return await self.handler.check_password(username, password)
        return await self._check_password(username, password)

    async def check_kbdint(self, username: str, password: bytes) -> AuthVerdict:
        if self._static(username) or not self.handler.auth_kbdint:
            # Not the webhook's method: answered as ConfiguredHandler answers anyone it does
            # not know (a dummy hash), so the answer tells nothing about who is configured.
            return await self.handler.check_password(username, password)
        return await self._check_password(username, password)

    async def _check_password(self, username: str, password: bytes) -> AuthVerdict:
        assert self.handler.auth is not None
        return await self._ask(self.handler.auth, "password", PasswordAuthRequest(
            username=username, remote_address=self.info.remote_addr,
            connection_id=self.info.connection_id, client_version=self.info.client_version,
            password_base64=base64.b64encode(password).decode()))

    def check_publickey(self, username: str, key: object) -> Any:
        if self._static(username) or not self.handler.auth_public_key:
            return self.handler.check_publickey(username, key)
        data = getattr(key, "public_data", b"")
        if self._last_key is not None and self._last_key[:2] == (username, data):
            return self._last_key[2]
        return self._check_key(username, key, data)

    async def _check_key(self, username: str, key: Any, data: bytes) -> AuthVerdict:
        assert self.handler.auth is not None
        verdict = await self._ask(self.handler.auth, "pubkey", PublicKeyAuthRequest(
            username=username, remote_address=self.info.remote_addr,
            connection_id=self.info.connection_id, client_version=self.info.client_version,
            public_key=authorized_key(key)))
        self._last_key = (username, data, verdict)
        return verdict

    async def _ask(self, client: WebhookClient, endpoint: str, request: _Connection) -> AuthVerdict:
        try:
            answer = await client.post(endpoint, request, AuthResponse)
        except WebhookError as exc:
            raise BackendError(str(exc)) from None  # SSH_AUTH_UNAVAILABLE, with the reason
        if not answer.success:
            return "bad"
        self._granted = (request.username, answer)
        return "ok"

    def kbdint_supported(self, username: str) -> bool:
        if self._static(username) or not self.handler.auth_kbdint:
            return self.handler.kbdint_supported(username)
        return True

    def accept_user(self, username: str) -> Any:
        if self._granted is not None and self._granted[0] == username:
            answer = self._granted[1]
            self.authenticated_username = answer.authenticated_username
            self.metadata, self.environment, self.files = (dict(answer.metadata), dict(answer.environment),
                                                           dict(answer.files))
        if self.handler.config_server is None:
            self._check_environment()  # what the authentication set, at once
            return True
        return self._fetch_config(username)

    async def _fetch_config(self, username: str) -> bool:
        assert self.handler.config_server is not None
        try:
            answer = await self.handler.config_server.post("config", ConfigRequest(
                username=username, authenticated_username=self.authenticated_username or username,
                remote_address=self.info.remote_addr, connection_id=self.info.connection_id,
                client_version=self.info.client_version, metadata=_visible(self.metadata),
                environment=_visible(self.environment), files=_visible(self.files)), ConfigResponse)
        except WebhookError as exc:
            raise BackendError(str(exc)) from None  # SSH_BACKEND_REJECTED_HANDSHAKE, with the reason
        self.metadata.update(answer.metadata)
        self.environment.update(answer.environment)
        self.files.update(answer.files)
        backend = answer.config.backend
        name = backend if isinstance(backend, str) else backend.type if backend is not None else None
        if name is not None and name != self.handler.backend_type:
            raise BackendError(f"config server: backend {name!r} asked for; this server runs "
                               f"{self.handler.backend_type!r}")
        if isinstance(backend, BackendOverride) and backend.shell is not None:
            if not backend.shell.startswith("/"):
                raise BackendError(f"config server: backend.shell {backend.shell!r} is not an absolute path")
            self.shell = backend.shell
        if (docker := answer.config.docker) is not None:
            self._check_docker(docker)
        self._check_environment()
        return True

    def _check_docker(self, docker: DockerOverride) -> None:
        if self.handler.backend_type != "docker":
            raise BackendError(f"config server: docker settings asked for; this server runs "
                               f"{self.handler.backend_type!r}")
        if docker.image is not None and not docker.image:
            raise BackendError("config server: docker.image is empty")
        try:
            memory_bytes(docker.memory or 0)
        except ValueError as exc:
            raise BackendError(f"config server: docker.memory: {exc}") from None
        if (docker.cpus or 0) < 0 or (docker.pids or 0) < 0:
            raise BackendError("config server: docker.cpus and docker.pids must be 0 or more")
        for name, value in docker.env.items():  # the operator's variables pass the client's deny list
            if not name or any(fnmatch.fnmatchcase(name, p) for p in self.handler.env_deny) \
                    or not self.handler.backend.env_allowed(name, value):
                raise BackendError(f"config server: docker.env: {name!r} is refused (deny list, name, size)")
        self.docker = docker

    def container_settings(self, username: str, settings: Any) -> Any:
        """The handler's container, then the config server's: its `docker` settings, and
        the answers' environment in the container (as every program of the connection gets it)."""
        settings = self.handler.container_settings(username, settings)
        if inspect.isawaitable(settings):
            return self._container_settings_later(settings)
        return self._override(settings)

    async def _container_settings_later(self, settings: Any) -> Any:
        return self._override(await settings)

    def _override(self, settings: Any) -> Any:
        docker = self.docker or DockerOverride()
        env = {**settings.env, **{name: v.value for name, v in self.environment.items()}, **docker.env}
        return dataclasses.replace(
            settings, env=env, image=docker.image or settings.image,
            memory=settings.memory if docker.memory is None else memory_bytes(docker.memory),
            cpus=settings.cpus if docker.cpus is None else docker.cpus,
            pids=settings.pids if docker.pids is None else docker.pids)

    def _check_environment(self) -> None:
        """The operator's variables pass the same deny list as the client's: a loader
        variable is refused whoever sets it."""
        for name, value in self.environment.items():
            if any(fnmatch.fnmatchcase(name, p) for p in self.handler.env_deny) \
                    or not self.handler.backend.env_allowed(name, value.value):
                raise BackendError(f"webhook environment: {name!r} is refused (deny list, name or size)")

    def session(self) -> SessionHandler:
        return LocalSession(self.handler.backend, self.handler.env_deny, shell=self.shell,
                            preset_env={name: v.value for name, v in self.environment.items()})
