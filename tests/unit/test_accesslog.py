"""The access log: one JSON line per request, written off the event loop, never prompt text."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from gateway.accesslog import AccessLog
from gateway.context import ApiFamily, Decision, Principal, RequestContext, RequestView

PROMPT = "my secret prompt about the quarterly numbers"


def context() -> RequestContext:
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}]}
    ctx = RequestContext("req-1", RequestView(ApiFamily.OPENAI, "chat.completions", "/v1/chat/completions",
                                              "POST", {}, body=body, model="m"))
    ctx.client.ip = ipaddress.ip_address("203.0.113.7")
    ctx.principal = Principal(authenticated=True, account="acct-1")
    ctx.status = 200
    ctx.usage.input_tokens, ctx.usage.output_tokens = 12, 34
    ctx.finished = ctx.started + 0.0125
    return ctx


async def test_lines_are_json_with_the_request_facts_and_no_prompt(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    log = AccessLog(str(path), interval=0.01)
    await log.start()
    for _ in range(3):
        log.log(context())
    await log.close()
    text = path.read_text()
    assert PROMPT not in text and "quarterly" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) == 3
    assert records[0]["request_id"] == "req-1" and records[0]["client_ip"] == "203.0.113.7"
    assert records[0]["account"] == "acct-1" and records[0]["duration_ms"] == 12.5
    assert (records[0]["input_tokens"], records[0]["output_tokens"]) == (12, 34)


async def test_an_answer_the_gateway_gave_itself_names_its_kind_and_rule(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    log = AccessLog(str(path), interval=0.01)
    await log.start()
    log.log(context())  # forwarded: no error
    refused = context()
    refused.status = 429
    refused.decision = Decision(429, "rate_limit", "Rate limit exceeded.", rule_id="acct-rpm")
    log.log(refused)
    cut = context()
    cut.status = 503
    cut.decision = Decision(503, "unavailable", "The gateway is shutting down; retry the request.")
    log.log(cut)
    await log.close()
    forwarded, limited, shutdown = [json.loads(line) for line in path.read_text().splitlines()]
    assert "error" not in forwarded and "rule_id" not in forwarded
    assert (limited["error"], limited["rule_id"]) == ("rate_limit", "acct-rpm")
    assert shutdown["error"] == "unavailable" and "rule_id" not in shutdown


async def test_a_stuck_writer_sheds_lines_instead_of_growing(tmp_path: Path) -> None:
    log = AccessLog(str(tmp_path / "a.jsonl"), max_buffer=1024)
    await log.start()
    assert log._task is not None
    log._task.cancel()  # the writer never runs: as if stdout were a blocked pipe
    for _ in range(1000):
        log.log(context())
    assert log.dropped > 0 and log._size < 1024 * 8 + 1024
    await log.close()
