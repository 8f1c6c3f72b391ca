"""Audit records carry the decision context and never prompt text; sinks lose nothing on close."""

from __future__ import annotations

import datetime as dt
import io
import json
import random
from pathlib import Path

import pytest

from gateway.audit import JsonlFileSink, StdoutSink, build_audit_record, utc_millis
from gateway.policy.compile import Source, compile_sources
from gateway.policy.evaluate import evaluate
from gateway.policy.testing import context_from_mapping


def test_record_fields_and_no_prompt_text() -> None:
    text = "version: 1\nrules:\n  - {id: d, when: {field: client.country, equals: CN}, deny: true, tag: cn}\n"
    snapshot, _ = compile_sources([Source("p.yaml", text)])
    assert snapshot is not None
    ctx = context_from_mapping(
        {
            "request": {"model": "gpt-4o"},
            "principal": {"account": "a1", "tier": "pro"},
            "client": {"ip": "203.0.113.5", "country": "CN", "asn": 64500},
        }
    )
    ctx.request.body = {"messages": [{"role": "user", "content": "SECRET PROMPT"}]}
    ctx.outcome = evaluate(snapshot, ctx)
    ctx.decision, ctx.policy_revision = ctx.outcome.deny, snapshot.revision
    ctx.usage.input_tokens = 12
    ctx.audit.update({"quota": {"rpm_remaining": 3}, "prompt": "SECRET PROMPT"})
    record = build_audit_record(ctx)
    line = json.dumps(record)
    assert "SECRET" not in line
    assert record["decision"] == "deny" and record["status"] == 403 and record["rule_id"] == "d"
    assert record["matched_rules"] == ["d"] and record["tags"] == ["cn"]
    assert record["client"] == {"ip": "203.0.113.5", "country": "CN", "asn": 64500}
    assert record["principal"]["account"] == "a1" and record["policy_revision"] == snapshot.revision
    assert record["tokens"]["input"] == 12 and record["extra"] == {"quota": {"rpm_remaining": 3}}


async def test_jsonl_sink_flushes_everything_on_close(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlFileSink(path, flush_interval=60)
    for i in range(1000):
        sink.emit({"request_id": str(i)})
    sink.emit({"bad": object()})  # serialised with str(), never raises
    await sink.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1001 and json.loads(lines[999]) == {"request_id": "999"}


async def test_periodic_flush_and_stdout_sink(tmp_path: Path) -> None:
    stream = io.StringIO()
    sink = StdoutSink(stream, flush_interval=0.01)
    sink.emit({"a": 1})
    await sink.flush()
    assert stream.getvalue() == '{"a":1}\n'
    await sink.close()


@pytest.mark.parametrize("wall_time", [0.0, 1_700_000_000.0, 1_764_351_296.9996, 1_764_351_296.5,
                                       4_102_444_799.001, 1_764_351_296.9999996])
def test_audit_timestamps_match_isoformat(wall_time: float) -> None:
    expected = dt.datetime.fromtimestamp(wall_time, dt.UTC).isoformat(timespec="milliseconds")
    assert utc_millis(wall_time) == expected
    assert utc_millis(wall_time) == expected  # the cached second gives the same text


def test_audit_timestamps_match_isoformat_over_many_instants() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        wall_time = rng.uniform(1.6e9, 1.9e9)
        assert utc_millis(wall_time) == dt.datetime.fromtimestamp(wall_time, dt.UTC).isoformat(
            timespec="milliseconds")
