"""A ContainerSSH authentication and configuration server for the tests, on aiohttp.

It implements the API as ContainerSSH's OpenAPI document (`containerssh-authconfig.json`)
describes it: ``POST /password``, ``POST /pubkey`` answered with ``{"success", ...}``
and ``POST /config`` answered with ``{"config": {...}, ...}``, JSON in, JSON out,
200 whatever the verdict. It checks every request against the document's required
fields (a 400 otherwise, which the webhook client would retry until its deadline and
the test would see as SSH_AUTH_UNAVAILABLE) and records it.

The misbehaving variants are chosen by user name, so one server serves a whole test:
``slow-*`` answers after `SLOW` seconds, ``fail-*`` answers 500, ``malformed-*`` answers
text that is not JSON, ``huge-*`` answers 2 MiB, ``nosuccess-*`` JSON without
``success``; ``cslow-*``, ``cfail-*``... do the same at /config only; ``held-*``
(config only) answers when the test releases it. The server
runs in a thread of its own, with its own event loop; ``tls`` serves https only
(optionally asking for a client certificate).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

SLOW = 30.0
REQUIRED = {  # the OpenAPI document's required request fields
    "password": ("username", "remoteAddress", "connectionId", "passwordBase64"),
    "pubkey": ("username", "remoteAddress", "connectionId", "publicKey"),
    "config": ("username", "remoteAddress", "connectionId"),
}


@dataclass
class AuthConfigServer:
    passwords: dict[str, str] = field(default_factory=dict)  # username -> password
    keys: dict[str, list[str]] = field(default_factory=dict)  # username -> ["ssh-ed25519 AAAA...", ...]
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # username -> /config answer
    metadata: dict[str, Any] = field(default_factory=dict)  # sent with every successful auth
    metadata_of: dict[str, dict[str, Any]] = field(default_factory=dict)  # per user, instead
    environment: dict[str, Any] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    port: int = 0
    url: str = ""

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None

    # -- running it

    def start(self, tls: ssl.SSLContext | None = None) -> AuthConfigServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(tls), self.loop).result(10)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        return self

    async def _start(self, tls: ssl.SSLContext | None) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.add_routes([web.post("/password", self._password), web.post("/pubkey", self._pubkey),
                        web.post("/config", self._config)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def release(self) -> None:
        """Let every held request answer."""
        assert self._release is not None
        self.loop.call_soon_threadsafe(self._release.set)

    def stop(self) -> None:
        self.release()
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def of(self, endpoint: str) -> list[dict[str, Any]]:
        return [body for name, body in list(self.requests) if name == endpoint]

    # -- the API

    async def _body(self, request: web.Request, endpoint: str) -> dict[str, Any] | web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.Response(status=400, text="not JSON")
        missing = [f for f in REQUIRED[endpoint] if not isinstance(body.get(f), str)]
        if missing or request.content_type != "application/json":
            return web.Response(status=400, text=f"missing {missing}, content type {request.content_type}")
        self.requests.append((endpoint, body))
        return body

    async def _misbehave(self, username: str, endpoint: str) -> web.Response | None:
        kind = username.split("-", 1)[0] if "-" in username else ""
        if endpoint == "config":  # `c` + a kind: the config server misbehaves, not the auth
            kind = kind[1:] if kind.startswith("c") else ""
        if kind == "slow":
            assert self._release is not None
            with contextlib.suppress(TimeoutError):  # (stop() releases it)
                await asyncio.wait_for(self._release.wait(), SLOW)
        elif kind == "fail":
            return web.Response(status=500, text="internal error")
        elif kind == "malformed":
            return web.Response(text="<html>not json</html>", content_type="application/json")
        elif kind == "huge":
            return web.json_response({"success": True, "metadata": {"x": {"value": "y" * (2 << 20)}}})
        elif kind == "nosuccess":
            return web.json_response({"authenticatedUsername": username})
        return None

    def _auth_answer(self, body: dict[str, Any], success: bool) -> web.Response:
        answer = {"success": success, "username": body["username"], "remoteAddress": body["remoteAddress"],
                  "connectionId": body["connectionId"]}
        if success:
            answer.update(authenticatedUsername=body["username"],
                          metadata=self.metadata_of.get(body["username"], self.metadata),
                          environment=self.environment)
        return web.json_response(answer)

    async def _password(self, request: web.Request) -> web.Response:
        body = await self._body(request, "password")
        if isinstance(body, web.Response):
            return body
        if (odd := await self._misbehave(body["username"], "password")) is not None:
            return odd
        password = base64.b64decode(body["passwordBase64"]).decode(errors="replace")
        return self._auth_answer(body, self.passwords.get(body["username"]) == password)

    async def _pubkey(self, request: web.Request) -> web.Response:
        body = await self._body(request, "pubkey")
        if isinstance(body, web.Response):
            return body
        if (odd := await self._misbehave(body["username"], "pubkey")) is not None:
            return odd
        return self._auth_answer(body, body["publicKey"] in self.keys.get(body["username"], []))

    async def _config(self, request: web.Request) -> web.Response:
        body = await self._body(request, "config")
        if isinstance(body, web.Response):
            return body
        username = body["username"]
        if username.startswith("held-"):
            assert self._release is not None
            await self._release.wait()
        elif (odd := await self._misbehave(username, "config")) is not None:
            return odd
        answer = {"username": username, "remoteAddress": body["remoteAddress"],
                  "connectionId": body["connectionId"], "config": {}}
        answer.update(self.configs.get(username, {}))
        return web.json_response(answer)


# --- a CA and certificates, made by the test -------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_context(self, *, client_certs: bool = False) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.server_cert, self.server_key)
        if client_certs:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.ca)
        return context


def make_pki(directory: Path) -> Pki:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate it signed."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("sshspec test CA")).issuer_name(name("sshspec test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: Any, san: list[Any]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH,
                              [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client, client_key = leaf("sshspec", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(server.public_bytes(pem))
    (directory / "client.pem").write_bytes(client.public_bytes(pem))
    return Pki(directory / "ca.pem", directory / "server.pem",
               write_key(server_key, directory / "server.key"),
               directory / "client.pem", write_key(client_key, directory / "client.key"))
