"""Prometheus metrics and the health check, live: scraped with curl, as an operator's
tools do, parsed with prometheus_client's own text parser, and checked against the log
of the same run (every code counted as often as the log has it)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))

from authconfig_server import AuthConfigServer  # noqa: E402
from test_webhooks import hooks, login, ssh_password  # noqa: E402

import conftest  # noqa: E402
from sshspec.codes import CATALOG  # noqa: E402

pytestmark = pytest.mark.skipif(not conftest.have("curl"), reason="curl is installed by .ci/system-packages")


def endpoint(live: conftest.LiveServer) -> str:
    """The metrics/health listener the server announced (port 0 picks one)."""
    line = next(x for x in live.stderr_lines if "endpoints on http://" in x)
    return line.split("endpoints on ", 1)[1].strip()


def curl(url: str) -> tuple[int, str]:
    """(HTTP status, body); status 0 when nothing answers."""
    done = subprocess.run(["curl", "-s", "-m", "10", "-w", "\n%{http_code}", url], capture_output=True,
                          text=True, timeout=20)
    body, _, status = done.stdout.rpartition("\n")
    return int(status or 0), body.strip()


def scrape(live: conftest.LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = curl(endpoint(live) + "/metrics")
    assert status == 200, text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_match_the_log(server_factory: Any, tmp_path: Path) -> None:
    acs = AuthConfigServer(passwords={"bob": "pw"}).start()
    held: subprocess.Popen[str] | None = None
    try:
        live = server_factory({**hooks(acs), "metrics": {"listen": "127.0.0.1:0"},
                               "health": {"listen": "127.0.0.1:0"}})
        # Bytes out: a program's 300 kB; auth ok and bad; a webhook user.
        done = subprocess.run([*live.ssh_args(), "head -c 300000 /dev/zero"], capture_output=True,
                              timeout=60)
        assert done.returncode == 0 and len(done.stdout) == 300000
        assert ssh_password(live, conftest.USERNAME, "wrong", "true", tmp_path).returncode == 255
        assert login(live, "bob", "pw") == "ok"
        assert login(live, "bob", "nope") == "PermissionDenied"
        live.wait_for(lambda rs: sum(r["code"] == "SSH_DISCONNECTED" for r in rs) == 4)
        # One session held open while scraping: live machines.
        held = subprocess.Popen([*live.ssh_args(), "echo started; exec sleep 60"], stdout=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
        assert held.stdout is not None and held.stdout.readline() == "started\n"
        samples = scrape(live)
        records = live.records()
        in_log = Counter(r["code"] for r in records)
        for code in CATALOG:  # every code has its series, and counts what the log has
            assert value(samples, "sshspec_codes_total", code=code) == in_log[code], code
        assert in_log["SSH_AUTH_FAILED"] == 2 and in_log["SSH_HANDSHAKE_SUCCESSFUL"] == 3
        assert value(samples, "sshspec_machines", machine="server", state="available") == 1
        assert value(samples, "sshspec_machines", machine="server", state="draining") == 0
        assert value(samples, "sshspec_machines", machine="connection", state="established") == 1
        assert value(samples, "sshspec_machines", machine="connection", state="closed") == 0
        assert value(samples, "sshspec_machines", machine="session", state="running") == 1

        def logged(code: str, **labels: Any) -> int:
            return sum(r["code"] == code and all(r["labels"].get(k) == v for k, v in labels.items())
                       for r in records)
        for result, code in (("ok", "SSH_AUTH_SUCCESSFUL"), ("bad", "SSH_AUTH_FAILED")):
            assert value(samples, "sshspec_auth_duration_seconds_count", method="password", result=result) \
                == logged(code, method="password"), result
        assert value(samples, "sshspec_session_start_duration_seconds_count", kind="exec") \
            == logged("SSH_CHANNEL_REQUEST_SUCCESSFUL", requestType="exec") == 3
        assert value(samples, "sshspec_webhook_duration_seconds_count", webhook="password", result="ok") \
            == len(acs.of("password")) == 2
        assert value(samples, "sshspec_webhook_duration_seconds_count", webhook="config", result="ok") \
            == len(acs.of("config")) == 3
        assert value(samples, "sshspec_sent_bytes_total") >= 300000
        assert 0 < value(samples, "sshspec_received_bytes_total") < 300000
        assert curl(endpoint(live) + "/healthz") == (200, "ok")
    finally:
        if held is not None:
            held.kill()
            held.wait()
        acs.stop()


def test_healthz_goes_503_through_a_drain(server_factory: Any) -> None:
    live = server_factory({"health": {"listen": "127.0.0.1:0"}, "limits": {"shutdownTimeout": "3s"}})
    url = endpoint(live) + "/healthz"
    assert curl(url) == (200, "ok")
    # A program that ignores SIGTERM keeps the drain going until the deadline.
    held = subprocess.Popen([*live.ssh_args(), "trap '' TERM; echo started; sleep 30"],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert held.stdout is not None and held.stdout.readline() == "started\n"
        live.process.send_signal(signal.SIGTERM)
        live.wait_for_code("SSH_SHUTTING_DOWN")
        assert curl(url) == (503, "not ok (draining)")
        assert live.process.wait(30) == 0
        assert "SSH_SHUTDOWN_DEADLINE" in live.codes()
        assert curl(url)[0] == 0  # gone with the server
    finally:
        held.kill()
        held.wait()


def test_healthz_is_503_while_starting(tmp_path: Path) -> None:
    """Before the SSH socket listens, the endpoint is up and says so."""
    import aiohttp

    from sshspec.adapters.config import load_config
    from sshspec.adapters.metrics import bound_addresses, start_endpoints
    from sshspec.adapters.server import Server
    from sshspec.fsm import core

    config_file = conftest.write_config(tmp_path / "c.yaml", state=tmp_path, log=tmp_path / "log.jsonl",
                                        pubkey=_a_key(), overrides={"health": {"listen": "127.0.0.1:0"},
                                                                    "metrics": {"listen": "127.0.0.1:0"}})

    async def main() -> None:
        server = Server(load_config(config_file))
        server.core.handle(core.ServerEvent.start)
        runners = await start_endpoints(server)
        try:
            host, port = bound_addresses(runners)[0]
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://{host}:{port}/healthz") as response:
                    assert (response.status, await response.text()) == (503, "not ok (starting)\n")
                async with http.get(f"http://{host}:{port}/metrics") as response:
                    text = await response.text()
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for f in text_string_to_metric_families(text) for s in f.samples}
            assert samples[("sshspec_machines", (("machine", "server"), ("state", "starting")))] == 1
        finally:
            for runner in runners:
                await runner.cleanup()
            server.logger.close()

    asyncio.run(main())


def _a_key() -> str:
    import asyncssh
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


def test_endpoints_refuse_workers(tmp_path: Path) -> None:
    config = conftest.write_config(tmp_path / "c.yaml", state=tmp_path, log=tmp_path / "log.jsonl",
                                   pubkey=_a_key(), overrides={"metrics": {"listen": "127.0.0.1:0"}})
    done = subprocess.run([*conftest.SSHSPEC, "serve", "--config", str(config), "--workers", "2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "metrics.listen and health.listen serve one process" in done.stderr
