"""Gateway configuration: YAML → frozen dataclasses, every error reported with ``file:line:col``.

Sections owned by a feature (identity, client_ip, geoip, store/quota, risk) are parsed by that
feature's own parser, registered in :data:`SECTION_PARSERS`-style table built in
:func:`_section_parsers`; this module owns the core sections and the overall shape.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway.apis import all_routes
from gateway.apis.inline_reasoning import MAX_TAG_CHARS, InlineReasoning
from gateway.upstream.mock.options import MAX_CHUNKS, MAX_DELAY_S
from gateway.yamlsource import ConfigError, Issues, Mark, Node, read_duration

API_CHOICES = ("auto", "openai", "anthropic")
UPSTREAM_CLIENTS = ("pool", "session")


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """One model upstream."""

    name: str
    base_url: str
    api: str = "auto"  # which API family it serves: openai | anthropic | auto (both)
    api_key_env: str | None = None  # environment variable holding the provider credential
    connect_timeout: float = 5.0
    read_timeout: float = 300.0  # longest silence between two bytes of a response
    # Whole response, for responses not relayed as a stream (streams of reasoning models can
    # legitimately run for many minutes: they are bounded by read_timeout). 0: none.
    total_timeout: float = 0.0
    # Longest a write to the client may wait on a client that reads nothing (a stream holds its
    # upstream connection meanwhile). 0: none.
    client_write_timeout: float = 60.0
    # Keep-alive connections idle longer are closed (and sooner if the upstream's Keep-Alive
    # header says so). 0: no keep-alive, a connection per request.
    idle_timeout: float = 15.0
    pool_size: int = 256
    max_response_bytes: int = 64 * 1024 * 1024
    client: str = "pool"  # pool: gateway/upstream/pool.py; session: aiohttp.ClientSession
    # The model writes its reasoning inline in the answer's text (``<think>...</think>``): shaping
    # that strips reasoning removes it there too (OpenAI chat completions and completions).
    inline_reasoning: InlineReasoning | None = None

    def serves(self, api: str) -> bool:
        return self.api in ("auto", api)

    def credential(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


@dataclass(frozen=True, slots=True)
class ListenSettings:
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True, slots=True)
class AdminSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9090
    token_env: str | None = None  # bearer token for mutating admin calls; None: loopback only


@dataclass(frozen=True, slots=True)
class MockUpstreamSettings:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9000
    chunks: int = 8
    chunk_delay: float = 0.0


@dataclass(frozen=True, slots=True)
class PolicySettings:
    dir: str | None = None
    watch: bool = True
    watch_interval: float = 1.0
    run_tests_on_reload: bool = True


@dataclass(frozen=True, slots=True)
class LogSettings:
    access_log: str | None = "-"  # "-" stdout, a path, or null to disable
    audit_log: str | None = None  # a JSONL path, "-" stdout, or null
    level: str = "INFO"
    # Where access_log/audit_log were set: a file that cannot be opened at start-up is reported
    # at its line (key → Mark).
    marks: Mapping[str, Mark] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ShutdownSettings:
    """How a worker stops on SIGTERM/SIGINT (see docs/configuration.md, ``shutdown``).

    drain_delay: readiness is red and every response carries ``Connection: close``, but the
                 listener keeps accepting, for this long (a load balancer keeps sending for a
                 while after the signal); a second signal ends it early.
    grace:       then the listener closes and requests in flight, streams included, have this
                 long to finish; those still running are cut (as a client disconnect would).
    """

    drain_delay: float = 0.0
    grace: float = 30.0


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole gateway configuration."""

    source: str = "<defaults>"
    listen: ListenSettings = field(default_factory=ListenSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    upstreams: tuple[UpstreamSettings, ...] = ()
    mock_upstream: MockUpstreamSettings = field(default_factory=MockUpstreamSettings)
    max_body_bytes: int = 4 * 1024 * 1024
    routes: tuple[str, ...] = ()  # enabled route names; empty = all known routes
    policies: PolicySettings = field(default_factory=PolicySettings)
    logging: LogSettings = field(default_factory=LogSettings)
    workers: int = 1
    shutdown: ShutdownSettings = field(default_factory=ShutdownSettings)
    # Feature sections parsed by their own modules: name → parsed object.
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def quota(self) -> Any:
        """The ``store:``/``quota:`` settings (a gateway.quota.QuotaSettings)."""
        return self.sections.get("quota")

    def upstream_for(self, api: str) -> UpstreamSettings | None:
        return next((u for u in self.upstreams if u.serves(api)), None)


SectionParser = Callable[[Node | None], Any]



def _size(node: Node, key: str, default: int) -> int:
    child = node.child(key)
    if child is None:
        return default
    value = child.value
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "b": 1}
        text = value.strip().lower()
        for suffix, scale in units.items():
            if text.endswith(suffix):
                try:
                    return int(float(text[: -len(suffix)]) * scale)
                except ValueError:
                    break
    child.error(f"expected a size in bytes such as 4194304 or 4MiB, got {value!r}")
    return default


def _nullable(node: Node, key: str, default: str | None) -> str | None:
    """A string that may be switched off with an explicit null."""
    child = node.child(key)
    if child is None:
        return default
    if child.value is None:
        return None
    return child.as_type(str, default)


def _resolve(path: str | None, base_dir: Path | None) -> str | None:
    """A log path relative to the config file's folder ("-" is stdout)."""
    if path is None or path == "-" or base_dir is None or os.path.isabs(path):
        return path
    return str(base_dir / path)


def _port(node: Node, key: str, default: int) -> int:
    value = node.get(key, int, default)
    if value is None or not 0 <= value <= 65535:
        node.error(f"expected a port number 0-65535, got {value!r}", key)
        return default
    return value


MAX_MOCK_DELAY = MAX_DELAY_S * 6  # what the mock accepts (MockOptions)

# Each poll walks the policy directory: below this it is a busy loop (0 pinned a core), and a
# change is never needed live faster than a tenth of a second.
MIN_WATCH_INTERVAL = 0.1


def _watch_interval(policies: Node) -> float:
    interval = read_duration(policies, "watch_interval", 1.0)
    node = policies.child("watch_interval")
    if node is not None and interval < MIN_WATCH_INTERVAL:
        node.error(f"expected an interval of at least {MIN_WATCH_INTERVAL * 1000:g}ms, got "
                   f"{interval:g}s; use 'watch: false' to turn watching off")
        return 1.0
    return interval


def _chunks(mock: Node) -> int:
    chunks = mock.get("chunks", int, 8)
    node = mock.child("chunks")
    if node is not None and chunks is not None and not 0 <= chunks <= MAX_CHUNKS:
        # At the value, like every other range error; the mock itself would refuse it at start.
        node.error(f"expected a number of chunks from 0 to {MAX_CHUNKS}, got {chunks}")
        return 8
    return 8 if chunks is None else chunks


def _parse_upstream(node: Node, index: int) -> UpstreamSettings | None:
    if not node.expect_mapping("an upstream mapping with name and base_url"):
        return None
    node.check_keys({"name", "base_url", "api", "api_key_env", "connect_timeout", "read_timeout",
                     "total_timeout", "client_write_timeout", "idle_timeout", "pool_size",
                     "max_response_bytes", "client", "inline_reasoning"}, required={"base_url"})
    base_url = node.get("base_url", str, "") or ""
    if base_url and not base_url.startswith(("http://", "https://")):
        url_node = node.child("base_url")
        assert url_node is not None
        url_node.error(f"expected an http:// or https:// URL, got {base_url!r}")
    api = node.get("api", str, "auto") or "auto"
    if api not in API_CHOICES:
        node.error(f"expected one of {', '.join(API_CHOICES)}, got {api!r}", "api")
    pool = node.get("pool_size", int, 256) or 256
    if pool < 1:
        node.error("expected a positive integer", "pool_size")
    client = node.get("client", str, "pool") or "pool"
    if client not in UPSTREAM_CLIENTS:
        node.error(f"expected one of {', '.join(UPSTREAM_CLIENTS)}, got {client!r}", "client")
    return UpstreamSettings(
        name=node.get("name", str, f"upstream{index}") or f"upstream{index}",
        base_url=base_url.rstrip("/"),
        api=api,
        api_key_env=node.get("api_key_env", str),
        connect_timeout=read_duration(node, "connect_timeout", 5.0),
        read_timeout=read_duration(node, "read_timeout", 300.0),
        total_timeout=read_duration(node, "total_timeout", 0.0),
        client_write_timeout=read_duration(node, "client_write_timeout", 60.0),
        idle_timeout=read_duration(node, "idle_timeout", 15.0),
        pool_size=pool,
        max_response_bytes=_size(node, "max_response_bytes", 64 * 1024 * 1024),
        client=client,
        inline_reasoning=_inline_reasoning(node, api),
    )


def _inline_tag(node: Node, key: str, default: str) -> str:
    tag = node.get(key, str, default)
    if tag is None or tag == default:
        return default
    if not tag or len(tag) > MAX_TAG_CHARS or tag != tag.strip():
        child = node.child(key)
        assert child is not None
        child.error(f"expected a tag of 1 to {MAX_TAG_CHARS} characters without leading or trailing "
                    f"whitespace, got {tag!r}")
        return default
    return tag


def _inline_reasoning(upstream: Node, api: str) -> InlineReasoning | None:
    """``inline_reasoning``: ``true`` (the ``<think>``/``</think>`` defaults), or a mapping of
    ``open``, ``close`` and ``opened_by_template``; absent, null or ``false``: off."""
    node = upstream.child("inline_reasoning")
    if node is None or node.value is None or node.value is False:
        return None
    if api == "anthropic":
        node.error("inline reasoning is stripped from OpenAI-style answers only; this upstream has "
                   "'api: anthropic'")
        return None
    if node.value is True:
        return InlineReasoning()
    if not node.expect_mapping("true, or a mapping of open, close and opened_by_template"):
        return None
    node.check_keys({"open", "close", "opened_by_template"})
    return InlineReasoning(open=_inline_tag(node, "open", "<think>"),
                           close=_inline_tag(node, "close", "</think>"),
                           opened_by_template=bool(node.get("opened_by_template", bool, False)))


def _section_parsers() -> tuple[dict[str, SectionParser], dict[str, tuple[frozenset[str], Any]]]:
    """Feature sections: imported lazily so a feature's parser owns its own schema."""
    from gateway.sections import root_section_parsers, section_parsers

    return section_parsers(), root_section_parsers()


CORE_KEYS = {"listen", "admin", "upstreams", "mock_upstream", "max_body_bytes", "routes", "policies",
             "logging", "workers", "shutdown"}

# Upper bounds that catch a unit slip (30m for 30s) rather than limit a real deployment: a load
# balancer takes seconds to stop sending, and the longest stream worth waiting for is minutes.
MAX_DRAIN_DELAY = 300.0
MAX_GRACE = 3600.0


def _shutdown(node: Node) -> ShutdownSettings:
    node.check_keys({"drain_delay", "grace"})
    return ShutdownSettings(drain_delay=read_duration(node, "drain_delay", 0.0, high=MAX_DRAIN_DELAY),
                            grace=read_duration(node, "grace", 30.0, high=MAX_GRACE))


def parse_settings(text: str, filename: str, base_dir: Path | None = None) -> Settings:
    """Parse a config file's text; raises ConfigError listing every problem."""
    issues = Issues()
    root = Node.parse(text, filename, issues)
    if root is None:
        issues.raise_if_errors()
        raise ConfigError([])  # unreachable: parse failures are reported as issues
    if not root.expect_mapping("a mapping of configuration sections"):
        issues.raise_if_errors()
    parsers, root_parsers = _section_parsers()
    root_keys = {key for keys, _ in root_parsers.values() for key in keys}
    root.check_keys(CORE_KEYS | set(parsers) | root_keys)
    settings = Settings(source=filename)

    if (listen := root.child("listen")) is not None and listen.expect_mapping():
        listen.check_keys({"host", "port"})
        settings = replace(settings, listen=ListenSettings(
            host=listen.get("host", str, "127.0.0.1") or "127.0.0.1", port=_port(listen, "port", 8080)))
    if (admin := root.child("admin")) is not None and admin.expect_mapping():
        admin.check_keys({"enabled", "host", "port", "token_env"})
        settings = replace(settings, admin=AdminSettings(
            enabled=bool(admin.get("enabled", bool, True)),
            host=admin.get("host", str, "127.0.0.1") or "127.0.0.1",
            port=_port(admin, "port", 9090),
            token_env=admin.get("token_env", str)))
    if (ups := root.child("upstreams")) is not None and ups.expect_list("a list of upstreams"):
        parsed = [_parse_upstream(u, i) for i, u in enumerate(ups.elements())]
        settings = replace(settings, upstreams=tuple(u for u in parsed if u is not None))
    if (mock := root.child("mock_upstream")) is not None and mock.expect_mapping():
        mock.check_keys({"enabled", "host", "port", "chunks", "chunk_delay"})
        settings = replace(settings, mock_upstream=MockUpstreamSettings(
            enabled=bool(mock.get("enabled", bool, False)),
            host=mock.get("host", str, "127.0.0.1") or "127.0.0.1",
            port=_port(mock, "port", 9000),
            chunks=_chunks(mock),
            chunk_delay=read_duration(mock, "chunk_delay", 0.0, high=MAX_MOCK_DELAY)))
    if root.has("max_body_bytes"):
        settings = replace(settings, max_body_bytes=_size(root, "max_body_bytes", settings.max_body_bytes))
    if (routes := root.child("routes")) is not None and routes.expect_list("a list of route names"):
        known = {r.name for r in all_routes()}
        names: list[str] = []
        for item in routes.elements():
            name = item.as_type(str)
            if name is not None and name not in known:
                item.error(f"unknown route {name!r}; expected one of: {', '.join(sorted(known))}")
            elif name is not None:
                names.append(name)
        settings = replace(settings, routes=tuple(names))
    if (pol := root.child("policies")) is not None and pol.expect_mapping():
        pol.check_keys({"dir", "watch", "watch_interval", "run_tests_on_reload"})
        directory = pol.get("dir", str)
        if directory is not None and base_dir is not None and not os.path.isabs(directory):
            directory = str(base_dir / directory)
        settings = replace(settings, policies=PolicySettings(
            dir=directory, watch=bool(pol.get("watch", bool, True)),
            watch_interval=_watch_interval(pol),
            run_tests_on_reload=bool(pol.get("run_tests_on_reload", bool, True))))
    if (log := root.child("logging")) is not None and log.expect_mapping():
        log.check_keys({"access_log", "audit_log", "level", "log_prompts"})
        if log.get("log_prompts", bool, False) and (switch := log.child("log_prompts")) is not None:
            # Accepting it and logging nothing would be a silent surprise: say so instead.
            switch.error("prompt logging is not supported (prompt text is never written to any log), "
                         "expected false or no key")
        level = (log.get("level", str, "INFO") or "INFO").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            log.error(f"expected DEBUG, INFO, WARNING or ERROR, got {level!r}", "level")
        settings = replace(settings, logging=LogSettings(
            access_log=_resolve(_nullable(log, "access_log", "-"), base_dir),
            audit_log=_resolve(_nullable(log, "audit_log", None), base_dir), level=level,
            marks={key: child.mark for key in ("access_log", "audit_log")
                   if (child := log.child(key)) is not None}))
    if root.has("workers"):
        workers = root.get("workers", int, 1)
        if workers is None or workers < 1:
            root.error("expected a positive number of worker processes", "workers")
            workers = 1
        settings = replace(settings, workers=workers)
    if (shutdown := root.child("shutdown")) is not None and shutdown.expect_mapping():
        settings = replace(settings, shutdown=_shutdown(shutdown))

    sections = {name: parse(root.child(name)) for name, parse in parsers.items()}
    sections.update({name: parse(root) for name, (_, parse) in root_parsers.items()})
    settings = replace(settings, sections=sections)
    if not settings.upstreams and not settings.mock_upstream.enabled:
        root.error("no upstream configured; expected 'upstreams' or 'mock_upstream.enabled: true'")
    issues.raise_if_errors()
    return settings


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Read and parse a config file; relative paths inside it resolve against its folder."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        from gateway.yamlsource import Issue, Mark

        raise ConfigError([Issue(Mark(str(file), 1, 1), "", f"cannot read config: {exc}")]) from exc
    return parse_settings(text, str(file), base_dir=file.parent)


def with_overrides(settings: Settings, *, host: str | None = None, port: int | None = None,
                   upstream: str | None = None, workers: int | None = None) -> Settings:
    """Apply command-line flags, which win over the file."""
    if host is not None or port is not None:
        settings = replace(settings, listen=ListenSettings(
            host=host or settings.listen.host, port=settings.listen.port if port is None else port))
    if upstream is not None:
        url = upstream.rstrip("/")
        if settings.upstreams:
            first = replace(settings.upstreams[0], base_url=url)
            ups = (first, *settings.upstreams[1:])
        else:
            ups = (UpstreamSettings(name="default", base_url=url),)
        # An explicit upstream means the built-in mock is not wanted.
        settings = replace(settings, upstreams=ups,
                           mock_upstream=replace(settings.mock_upstream, enabled=False))
    if workers is not None:
        settings = replace(settings, workers=workers)
    return settings
