"""Access and audit lines: one record is one line whatever its strings hold, client-chosen strings
are capped, and records that cannot be written are counted and logged rate-limited, never raised."""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

from gateway.accesslog import AccessLog
from gateway.audit import JsonlFileSink, build_audit_record
from gateway.context import ApiFamily, Principal, RequestContext, RequestView
from gateway.logfile import LineWriter, RecordLosses, client_text, json_line
from gateway.metrics import Metrics
from gateway.settings import parse_settings
from gateway.wiring import build_features
from gateway.yamlsource import ConfigError

# Every character str.splitlines() breaks a line on.
BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
PROMPT = "the secret prompt about quarterly numbers"


def lost(metrics: Metrics) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == "tollgate_log_records_lost_total":
                out[(s.labels["log"], s.labels["reason"])] = s.value
    return out


def context(headers: dict[str, str] | None = None, model: str = "m",
            principal: Principal | None = None) -> RequestContext:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
    view = RequestView(ApiFamily.OPENAI, "chat.completions", "/v1/chat/completions", "POST",
                       CIMultiDictProxy(CIMultiDict(headers or {})), body=body, model=model)
    ctx = RequestContext("0123456789abcdef01234567", view)
    ctx.client.ip = ipaddress.ip_address("203.0.113.7")
    ctx.principal = principal or Principal(authenticated=True, source="api_key", account="acct-1",
                                           key_id="key_0")
    ctx.status = 200
    ctx.finished = ctx.started + 0.01
    return ctx


def test_every_line_break_is_escaped_and_the_value_survives() -> None:
    value = f"a{BREAKS}b"
    line = json_line({"v": value, value: 1})
    assert len(line.splitlines()) == 1
    assert not any(c in line for c in BREAKS)
    assert json.loads(line) == {"v": value, value: 1}


def test_undecodable_characters_are_shown_escaped_not_lost() -> None:
    line = json_line({"id": "abc\udcff", "nested": ["\ud800"]})
    assert json.loads(line) == {"id": "abc\\udcff", "nested": ["\\ud800"]}


def test_client_text_is_capped_with_a_visible_marker() -> None:
    assert client_text(None) is None and client_text("short") == "short" and client_text(42) == "42"
    capped = client_text("x" * 1000)
    assert capped == "x" * 256 + "...[truncated 744 chars]"
    assert client_text("y" * 20, limit=8) == "yyyyyyyy...[truncated 12 chars]"


async def test_file_sink_writes_one_parseable_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlFileSink(path, flush_interval=60)
    sink.open()
    forged = '"}\n{"request_id":"forged","decision":"allow"}\u2028'
    for i in range(5):
        sink.emit({"request_id": str(i), "model": forged + BREAKS})
    await sink.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5
    assert [json.loads(line)["request_id"] for line in lines] == ["0", "1", "2", "3", "4"]
    assert json.loads(lines[0])["model"] == forged + BREAKS


def test_audit_record_caps_client_strings_and_names_the_credential_system() -> None:
    principal = Principal(authenticated=True, source="jwt", issuer="https://idp.example.com/",
                          account="sso:" + "a" * 600 + "\u2028", org="org-1")
    ctx = context({"X-Request-Id": "client-id\u2028" + "z" * 300}, model="m" * 5000,
                  principal=principal)
    record = build_audit_record(ctx)
    assert record["request_id"] == "0123456789abcdef01234567"
    assert record["client_request_id"] == "client-id\u2028" + "z" * 118 + "...[truncated 182 chars]"
    assert record["model"] == "m" * 256 + "...[truncated 4744 chars]"
    assert record["principal"]["source"] == "jwt"
    assert record["principal"]["issuer"] == "https://idp.example.com/"
    assert record["principal"]["account"].endswith("...[truncated 349 chars]")
    line = json_line(record)
    assert len(line.splitlines()) == 1 and PROMPT not in line and len(line) < 3000


def test_api_key_principals_have_no_issuer() -> None:
    record = build_audit_record(context())
    assert record["principal"] == {"authenticated": True, "source": "api_key", "issuer": None,
                                   "account": "acct-1", "org": None, "tier": None, "key_id": "key_0"}
    assert record["client_request_id"] is None


async def test_access_log_records_the_client_id_beside_the_gateways(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    log = AccessLog(str(path), interval=60)
    await log.start()
    log.log(context({"X-Request-Id": "mine\u2029"}, model="m\u0085" + "q" * 400))
    log.log(context())
    await log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["request_id"] == "0123456789abcdef01234567" and first["client_request_id"] == "mine\u2029"
    assert first["model"] == "m\u0085" + "q" * 254 + "...[truncated 146 chars]"
    assert "client_request_id" not in second
    assert PROMPT not in path.read_text(encoding="utf-8")


async def test_a_full_disk_is_counted_and_logged_once_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    sink = JsonlFileSink("/dev/full", flush_interval=60)  # every write fails with ENOSPC
    sink.open()
    sink.losses.bind(metrics.lost_records("audit"))
    caplog.set_level(logging.ERROR, logger="gateway.logfile")
    for batch in range(3):
        for i in range(4):
            sink.emit({"request_id": f"{batch}-{i}"})
        await sink.flush()
    assert sink.losses.counts == {"write_error": 12}
    reports = [r for r in caplog.records if "records lost" in r.getMessage()]
    assert len(reports) == 1 and "No space left on device" in reports[0].getMessage()
    await sink.close()  # the losses since the last report are reported on close
    reports = [r for r in caplog.records if "records lost" in r.getMessage()]
    assert len(reports) == 2 and "8 records lost" in reports[1].getMessage()
    sink.emit({"request_id": "late"})
    counts = lost(metrics)
    assert counts[("audit", "write_error")] == 12 and counts[("audit", "closed")] == 1
    assert counts[("audit", "queue_full")] == 0  # every reason's series exists from the start


def test_losses_are_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    losses = RecordLosses("access", interval=60, clock=lambda: now[0])
    caplog.set_level(logging.ERROR, logger="gateway.logfile")
    for _ in range(50):
        losses.count("queue_full")
    now[0] += 61
    losses.count("write_error", 3, OSError(errno.EIO, "Input/output error"))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "access log: 1 records lost" in messages[0]
    assert "access log: 52 records lost" in messages[1] and "Input/output error" in messages[1]
    assert losses.counts == {"queue_full": 50, "write_error": 3} and losses.total == 53


async def test_a_stalled_writer_sheds_records_as_queue_full(tmp_path: Path) -> None:
    sink = JsonlFileSink(tmp_path / "a.jsonl", flush_interval=60, max_buffer=3)
    for i in range(10):
        sink.emit({"i": i})
    assert sink.losses.counts == {"queue_full": 7}
    sink.emit({"bad": float("nan"), "big": 1 << 70})  # orjson refuses integers over 64 bits
    assert sink.losses.counts == {"queue_full": 7, "unserialisable": 1}
    await sink.close()
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 3


class _FailsAfter:
    """A real file that takes ``budget`` more bytes, then fails as a full disk does."""

    def __init__(self, path: Path, budget: int) -> None:
        self._file = path.open("ab", buffering=0)
        self.budget = budget

    def write(self, data: Any) -> int:
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self._file.write(bytes(data[: self.budget]))
        self.budget -= n
        return n

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()


def test_a_line_cut_short_by_a_failed_write_does_not_merge_with_the_next(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    losses = RecordLosses("audit")
    writer = LineWriter(losses, path=str(path))
    failing = _FailsAfter(path, budget=len('{"n":1}\n{"n":'))
    writer._file = failing
    writer.write('{"n":1}\n{"n":2}\n{"n":3}\n')
    assert losses.counts == {"write_error": 2}  # n=2 was cut short, n=3 never started
    writer.write('{"n":4}\n')  # still full: nothing written, the cut line stays open
    failing.budget = 1000
    writer.write('{"n":5}\n')
    writer.close()
    lines = path.read_text().splitlines()
    assert lines == ['{"n":1}', '{"n":', '{"n":5}']
    assert losses.counts == {"write_error": 3}


async def test_access_log_losses_reach_the_metric_through_the_pipeline(tmp_path: Path) -> None:
    from gateway.pipeline import Pipeline

    metrics = Metrics()
    log = AccessLog("/dev/full", interval=60)
    await log.start()
    Pipeline([], metrics, log, 1024)
    for _ in range(3):
        log.log(context())
    await log.flush_now()
    await log.close()
    assert lost(metrics)[("access", "write_error")] == 3


def _settings(tmp_path: Path, logging_yaml: str) -> tuple[Any, Path]:
    config = tmp_path / "gateway.yaml"
    text = f"mock_upstream: {{enabled: true}}\nlogging:\n{logging_yaml}"
    config.write_text(text)
    return parse_settings(text, str(config), base_dir=tmp_path), config


@pytest.mark.parametrize(("key", "target", "reason"), [
    ("audit_log", "missing/audit.jsonl", "No such file or directory"),
    ("audit_log", ".", "Is a directory"),
    ("access_log", "missing/access.jsonl", "No such file or directory"),
    ("access_log", ".", "Is a directory"),
])
def test_an_unwritable_log_refuses_start_up_naming_the_setting_and_its_line(
        tmp_path: Path, key: str, target: str, reason: str) -> None:
    settings, config = _settings(tmp_path, f"  level: INFO\n  {key}: {target}\n")
    with pytest.raises(ConfigError) as info:
        build_features(settings, Metrics())
    path = tmp_path / target  # "." resolves to tmp_path itself
    column = len(f"  {key}: ") + 1
    assert str(info.value) == (f"{config}:4:{column}: logging.{key}: cannot open {path} for appending: "
                               f"{reason}")


async def test_access_log_start_refuses_an_unwritable_path_without_a_traceback(tmp_path: Path) -> None:
    log = AccessLog(str(tmp_path / "missing" / "access.jsonl"))
    with pytest.raises(ConfigError, match=r"logging\.access_log: cannot open .*missing/access\.jsonl for "
                                          "appending: No such file or directory"):
        await log.start()
