"""Start a real gateway (its aiohttp app on a real port) in front of a real mock upstream."""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.app import RUNTIME, Runtime, create_app
from gateway.settings import parse_settings


@dataclass(slots=True)
class RunningGateway:
    url: str
    app: web.Application
    access_log: Path

    @property
    def runtime(self) -> Runtime:
        return self.app[RUNTIME]

    async def access_records(self) -> list[dict[str, object]]:
        """Flush the access log (it buffers) and read it, oldest first."""
        import json

        await self.runtime.access_log.flush_now()
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line]

    async def audit_records(self) -> list[dict[str, object]]:
        """Flush the audit sink (it buffers) and read the JSONL audit log, oldest first."""
        import json

        target = self.runtime.settings.logging.audit_log
        sink = self.runtime.features.audit_sink
        assert target not in (None, "-") and sink is not None, "the audit log is not a file"
        await sink.flush()  # type: ignore[attr-defined]
        path = Path(target)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]


CLIENT_KEY = "tg_test_client_key_0001"
CLIENT_ACCOUNT = "acct-1"


def write_keys_file(tmp: Path, keys: dict[str, dict[str, object]] | None = None) -> Path:
    """A keys file holding hashes of the given plaintext keys (default: CLIENT_KEY)."""
    import yaml

    from gateway.identity.keys import hash_key

    keys = keys or {CLIENT_KEY: {"account": CLIENT_ACCOUNT, "org": "org-1", "tier": "pro"}}
    records = [
        {"id": f"key_{i}", "hash": hash_key(k), **fields} for i, (k, fields) in enumerate(keys.items())
    ]
    path = tmp / "keys.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "keys": records}))
    return path


def gateway_yaml(upstream_url: str, tmp: Path, extra: str = "", upstream_extra: str = "",
                 audit_log: Path | None = None) -> str:
    # Only write the default keys file when the caller brings no identity section: it would
    # overwrite a keys file the caller wrote to the same default path.
    identity = "" if "identity:" in extra else f"identity: {{keys_file: {write_keys_file(tmp)}}}\n"
    upstream_lines = textwrap.indent(textwrap.dedent(upstream_extra).strip(), " " * 4)
    return (
        "listen: {host: 127.0.0.1, port: 0}\n"
        + ("admin: {enabled: false}\n" if "admin:" not in extra else "")
        + "upstreams:\n"
        "  - name: mock\n"
        f"    base_url: {upstream_url}\n" + (upstream_lines + "\n" if upstream_lines else "") + "logging:\n"
        f"  access_log: {tmp / 'access.jsonl'}\n"
        f"  audit_log: {audit_log or 'null'}\n"
        + identity
        + textwrap.dedent(extra)
    )


@contextlib.asynccontextmanager
async def run_gateway(
    config_text: str, tmp: Path, filename: str = "gateway.yaml"
) -> AsyncIterator[RunningGateway]:
    config_path = tmp / filename
    config_path.write_text(config_text)
    settings = parse_settings(config_text, str(config_path), base_dir=tmp)
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield RunningGateway(url=f"http://127.0.0.1:{port}", app=app, access_log=tmp / "access.jsonl")
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port for the block; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def admin_listener(gw: RunningGateway) -> AsyncIterator[str]:
    """The admin listener of a gateway started in-process; yields its base URL."""
    from gateway.admin import create_admin_app

    async with serve_app(create_admin_app(gw.runtime)) as url:
        yield url
