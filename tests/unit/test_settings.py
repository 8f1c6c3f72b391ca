"""Gateway config parsing: every error at once, with file:line:col and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import parse_settings, with_overrides
from gateway.yamlsource import ConfigError, parse_duration

GOOD = """\
listen: {host: 0.0.0.0, port: 8081}
upstreams:
  - name: oa
    base_url: https://api.example.com/
    api: openai
    api_key_env: OA_KEY
    read_timeout: 2m
  - {name: an, base_url: "http://127.0.0.1:9", api: anthropic}
max_body_bytes: 1MiB
routes: [chat.completions, messages]
logging: {access_log: null, audit_log: audit.jsonl, level: warning}
"""


def test_a_good_config_parses_to_typed_settings(tmp_path: Path) -> None:
    settings = parse_settings(GOOD, "gw.yaml", base_dir=tmp_path)
    assert settings.listen.port == 8081 and settings.max_body_bytes == 1024 * 1024
    openai_up = settings.upstream_for("openai")
    assert openai_up is not None and openai_up.base_url == "https://api.example.com"
    assert openai_up.read_timeout == 120.0
    anthropic_up = settings.upstream_for("anthropic")
    assert anthropic_up is not None and anthropic_up.name == "an"
    assert settings.routes == ("chat.completions", "messages")
    assert settings.logging.access_log is None
    assert settings.logging.audit_log == str(tmp_path / "audit.jsonl")
    assert settings.logging.level == "WARNING"


def test_every_error_is_reported_at_once_with_positions() -> None:
    text = """\
listen: {host: 127.0.0.1, port: 99999}
upstreams:
  - {base_url: "http://x", api: grpc, read_timout: 5s}
max_body_bytes: lots
routes: [chat.completion]
workers: 0
"""
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "gw.yaml")
    messages = str(info.value).splitlines()
    assert messages == [
        "gw.yaml:1:27: listen.port: expected a port number 0-65535, got 99999",
        "gw.yaml:3:28: upstreams[0].api: expected one of auto, openai, anthropic, got 'grpc'",
        "gw.yaml:3:39: upstreams[0].read_timout: unknown key 'read_timout'; did you mean 'read_timeout'?",
        "gw.yaml:4:17: max_body_bytes: expected a size in bytes such as 4194304 or 4MiB, got 'lots'",
        "gw.yaml:5:10: routes[0]: unknown route 'chat.completion'; expected one of: chat.completions, "
        "completions, embeddings, messages, messages.count_tokens, models, "
        "models.retrieve, responses",
        "gw.yaml:6:1: workers: expected a positive number of worker processes",
    ]


def test_no_upstream_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no upstream configured"):
        parse_settings("listen: {port: 1}\n", "gw.yaml")


def test_yaml_syntax_errors_carry_their_position() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings("listen: {port: 1\n", "gw.yaml")
    assert str(info.value).startswith("gw.yaml:2:1: invalid YAML")


def test_flags_override_the_file() -> None:
    settings = with_overrides(parse_settings(GOOD, "gw.yaml"), port=9999, upstream="http://10.0.0.1:80/",
                              workers=3)
    assert settings.listen.port == 9999 and settings.workers == 3
    assert settings.upstreams[0].base_url == "http://10.0.0.1:80"
    assert not settings.mock_upstream.enabled


@pytest.mark.parametrize(("text", "seconds"), [
    ("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0), ("1w", 604800.0),
    ("1mo", 2592000.0), (12, 12.0)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["-1s", "soon", "5 parsecs", True, None])
def test_bad_durations(text: object) -> None:
    assert parse_duration(text) is None


def test_upstream_client_choice() -> None:
    good = parse_settings('upstreams: [{base_url: "http://x", client: session}]\n', "gw.yaml")
    assert good.upstreams[0].client == "session"
    assert parse_settings('upstreams: [{base_url: "http://x"}]\n', "gw.yaml").upstreams[0].client == "pool"
    with pytest.raises(ConfigError) as info:
        parse_settings('upstreams: [{base_url: "http://x", client: httpx}]\n', "gw.yaml")
    assert str(info.value) == "gw.yaml:1:36: upstreams[0].client: expected one of pool, session, got 'httpx'"


def test_watch_interval_below_100ms_is_refused_at_its_position() -> None:
    base = "mock_upstream: {enabled: true}\npolicies:\n  dir: pol\n  watch_interval: %s\n"
    for value, shown in [("50ms", "0.05s"), ("0", "0s")]:
        with pytest.raises(ConfigError) as info:
            parse_settings(base % value, "gw.yaml")
        assert str(info.value) == (f"gw.yaml:4:19: policies.watch_interval: expected an interval of at least "
                                   f"100ms, got {shown}; use 'watch: false' to turn watching off")
    assert parse_settings(base % "100ms", "gw.yaml").policies.watch_interval == 0.1


def test_mock_upstream_chunks_and_chunk_delay_are_bounded() -> None:
    text = "mock_upstream:\n  enabled: true\n  chunks: %s\n  chunk_delay: %s\n"
    with pytest.raises(ConfigError) as info:
        parse_settings(text % ("100001", "2h"), "gw.yaml")
    assert str(info.value).splitlines() == [
        "gw.yaml:3:11: mock_upstream.chunks: expected a number of chunks from 0 to 100000, got 100001",
        "gw.yaml:4:16: mock_upstream.chunk_delay: must be between 0s and 3600s, got 7200s",
    ]
    with pytest.raises(ConfigError, match="mock_upstream.chunks: expected a number of chunks from 0 to "
                                          "100000, got -1"):
        parse_settings(text % ("-1", "0"), "gw.yaml")
    # 0 chunks is a valid mock (an empty completion), not "unset, use 8".
    mock = parse_settings(text % ("0", "1h"), "gw.yaml").mock_upstream
    assert (mock.chunks, mock.chunk_delay) == (0, 3600.0)


def test_prompt_logging_cannot_be_switched_on() -> None:
    text = "mock_upstream: {enabled: true}\nlogging:\n  log_prompts: %s\n"
    with pytest.raises(ConfigError) as info:
        parse_settings(text % "true", "gw.yaml")
    assert str(info.value) == ("gw.yaml:3:16: logging.log_prompts: prompt logging is not supported (prompt "
                               "text is never written to any log), expected false or no key")
    parse_settings(text % "false", "gw.yaml")  # stating the default is fine


def test_upstream_deadlines_default_and_parse() -> None:
    default = parse_settings('upstreams: [{base_url: "http://x"}]\n', "gw.yaml").upstreams[0]
    assert (default.total_timeout, default.client_write_timeout, default.idle_timeout) == (0.0, 60.0, 15.0)
    text = ('upstreams:\n  - base_url: "http://x"\n    total_timeout: 10m\n    client_write_timeout: 0\n'
            '    idle_timeout: 500ms\n')
    up = parse_settings(text, "gw.yaml").upstreams[0]
    assert (up.total_timeout, up.client_write_timeout, up.idle_timeout) == (600.0, 0.0, 0.5)
    nulls = 'upstreams: [{base_url: "http://x", total_timeout: null, idle_timeout: null}]\n'
    assert parse_settings(nulls, "gw.yaml").upstreams[0].idle_timeout == 15.0


def test_upstream_deadlines_are_validated_at_their_position() -> None:
    text = ('upstreams:\n  - base_url: "http://x"\n    total_timeout: forever\n'
            '    client_write_timeout: -1s\n    idle_timeout: [15s]\n    idle_timout: 5s\n')
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "gw.yaml")
    assert str(info.value).splitlines() == [
        "gw.yaml:3:20: upstreams[0].total_timeout: expected a duration such as 250ms, 30s, 5m, 1h, 1d, 1w "
        "or 1mo, got 'forever'",
        "gw.yaml:4:27: upstreams[0].client_write_timeout: expected a duration such as 250ms, 30s, 5m, 1h, "
        "1d, 1w or 1mo, got '-1s'",
        "gw.yaml:5:19: upstreams[0].idle_timeout: expected a duration such as 250ms, 30s, 5m, 1h, 1d, 1w "
        "or 1mo, got ['15s']",
        "gw.yaml:6:5: upstreams[0].idle_timout: unknown key 'idle_timout'; did you mean 'idle_timeout'?",
    ]


def test_shutdown_defaults_and_parse() -> None:
    from gateway.settings import ShutdownSettings

    default = parse_settings("mock_upstream: {enabled: true}\n", "gw.yaml").shutdown
    assert default == ShutdownSettings() and (default.drain_delay, default.grace) == (0.0, 30.0)
    text = "mock_upstream: {enabled: true}\nshutdown:\n  drain_delay: 5s\n  grace: 2m\n"
    assert parse_settings(text, "gw.yaml").shutdown == ShutdownSettings(drain_delay=5.0, grace=120.0)
    # 0 grace: requests still running when the listener closes are cut at once.
    zero = parse_settings("mock_upstream: {enabled: true}\nshutdown: {grace: 0}\n", "gw.yaml").shutdown
    assert zero == ShutdownSettings(drain_delay=0.0, grace=0.0)


def test_shutdown_errors_are_reported_at_their_position() -> None:
    text = ("mock_upstream: {enabled: true}\nshutdown:\n  drain_delay: 30m\n  grace: soon\n"
            "  drain: 5s\n")
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "gw.yaml")
    assert str(info.value).splitlines() == [
        "gw.yaml:3:16: shutdown.drain_delay: must be between 0s and 300s, got 1800s",
        "gw.yaml:4:10: shutdown.grace: expected a duration such as 250ms, 30s, 5m, 1h, 1d, 1w or 1mo, "
        "got 'soon'",
        "gw.yaml:5:3: shutdown.drain: unknown key 'drain'; did you mean 'drain_delay'?",
    ]
    with pytest.raises(ConfigError) as info:
        parse_settings("mock_upstream: {enabled: true}\nshutdown: 30s\n", "gw.yaml")
    assert str(info.value) == "gw.yaml:2:11: shutdown: expected a mapping, got string '30s'"


def test_upstream_inline_reasoning_defaults_and_parse() -> None:
    from gateway.apis.inline_reasoning import InlineReasoning

    plain = parse_settings('upstreams: [{base_url: "http://x"}]\n', "gw.yaml").upstreams[0]
    assert plain.inline_reasoning is None
    text = ('upstreams:\n  - {name: r1, base_url: "http://x", inline_reasoning: true}\n'
            '  - {name: qwq, base_url: "http://y", api: openai,\n'
            '     inline_reasoning: {opened_by_template: true}}\n'
            '  - name: kimi\n    base_url: "http://z"\n    inline_reasoning:\n'
            '      open: "◁think▷"\n      close: "◁/think▷"\n'
            '  - {name: plain, base_url: "http://w", api: anthropic, inline_reasoning: false}\n')
    ups = parse_settings(text, "gw.yaml").upstreams
    assert [u.inline_reasoning for u in ups] == [
        InlineReasoning(), InlineReasoning(opened_by_template=True),
        InlineReasoning(open="◁think▷", close="◁/think▷"), None]


def test_upstream_inline_reasoning_errors_are_reported_at_their_position() -> None:
    text = ('upstreams:\n'
            '  - base_url: "http://x"\n'
            '    inline_reasoning: {open: "", close: " </think>", opened_by_template: yes please, opn: x}\n'
            '  - {base_url: "http://y", api: anthropic, inline_reasoning: true}\n'
            '  - {base_url: "http://z", inline_reasoning: think}\n')
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "gw.yaml")
    assert str(info.value).splitlines() == [
        "gw.yaml:3:30: upstreams[0].inline_reasoning.open: expected a tag of 1 to 32 characters without "
        "leading or trailing whitespace, got ''",
        "gw.yaml:3:41: upstreams[0].inline_reasoning.close: expected a tag of 1 to 32 characters without "
        "leading or trailing whitespace, got ' </think>'",
        "gw.yaml:3:74: upstreams[0].inline_reasoning.opened_by_template: expected true or false, "
        "got string 'yes please'",
        "gw.yaml:3:86: upstreams[0].inline_reasoning.opn: unknown key 'opn'; did you mean 'open'?",
        "gw.yaml:4:62: upstreams[1].inline_reasoning: inline reasoning is stripped from OpenAI-style "
        "answers only; this upstream has 'api: anthropic'",
        "gw.yaml:5:46: upstreams[2].inline_reasoning: expected true, or a mapping of open, close and "
        "opened_by_template, got string 'think'",
    ]
