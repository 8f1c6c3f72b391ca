"""OpenAI-shaped bodies and streams: chat completions, completions, embeddings, models.

The Responses API lives in ``openai_responses.py``. Shapes follow ``openai.types`` of the
installed SDK (``ChatCompletion``, ``ChatCompletionChunk``, ``Completion``, ...).
"""

from __future__ import annotations

from typing import Any

from .call import BadRequest, Call
from .text import (
    ChoicePlan,
    Plan,
    chat_logprob,
    count_input_tokens,
    embedding,
    embedding_base64,
    iter_embedding_inputs,
    logprob,
    plan_output,
)
from .wire import SSE_DONE, Frame, sse_data

MODELS = ("gpt-4o-mini", "gpt-4.1", "o4-mini", "text-embedding-3-small", "mock-model")


def _wants_reasoning(body: dict[str, Any]) -> bool:
    effort = body.get("reasoning_effort")
    if isinstance(effort, str):
        return effort != "none"
    reasoning = body.get("reasoning")
    return isinstance(reasoning, dict) and reasoning.get("effort") != "none"


def inline_pieces(choice: ChoicePlan, mode: str | None, truncated: bool) -> tuple[str, ...]:
    """The deltas of a choice that reasons inline in its text (``mode``: mock.options.InlineMode),
    or its content tokens when it does not. Each tag is cut in two deltas, as a tokenizer that does
    not know it as one token would; a block the token limit cut short never closes."""
    if mode is None or not choice.reasoning:
        return choice.content
    opening = ("<thi", "nk>\n") if mode == "open" else ()
    closing = () if truncated and not choice.content else ("\n</th", "ink>\n\n")
    return (*opening, *choice.reasoning, *closing, *choice.content)


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def usage(plan: Plan) -> dict[str, Any]:
    return {
        "prompt_tokens": plan.input_tokens,
        "completion_tokens": plan.output_tokens,
        "total_tokens": plan.input_tokens + plan.output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": plan.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


# -- chat completions ------------------------------------------------------------------------
def _chat_top_logprobs(call: Call) -> int | None:
    """``None`` when logprobs are off, else how many alternatives to list."""
    top = call.opt_int("top_logprobs", low=0, high=20)
    if not call.body.get("logprobs"):
        if top is not None:
            raise BadRequest("'top_logprobs' requires 'logprobs' to be true")
        return None
    return top or 0


def chat_plan(call: Call) -> Plan:
    call.require_list("messages")
    return plan_output(
        input_tokens=count_input_tokens(call.body, ("messages",)),
        chunks=call.chunks,
        limit=call.opt_int("max_completion_tokens", "max_tokens"),
        n=call.opt_int("n", high=16) or 1,
        reasoning=call.chunks if call.inline_reasoning or _wants_reasoning(call.body) else 0,
    )


def chat_body(call: Call, plan: Plan) -> dict[str, Any]:
    top = _chat_top_logprobs(call)
    finish = "length" if plan.truncated else "stop"
    choices = []
    for index, choice in enumerate(plan.choices):
        tokens = inline_pieces(choice, call.inline_reasoning, plan.truncated)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(tokens),
            "refusal": None,
            "annotations": [],
        }
        if choice.reasoning and not call.inline_reasoning:
            message["reasoning_content"] = choice.reasoning_text
        lp = None
        if top is not None:
            lp = {"content": [chat_logprob(t, i, top) for i, t in enumerate(tokens)], "refusal": None}
        choices.append({"index": index, "message": message, "logprobs": lp, "finish_reason": finish})
    return {
        "id": f"chatcmpl-mock{call.seq}",
        "object": "chat.completion",
        "created": call.created,
        "model": call.model,
        "system_fingerprint": "fp_mock",
        "service_tier": "default",
        "choices": choices,
        "usage": usage(plan),
    }


def chat_stream(call: Call, plan: Plan) -> list[Frame]:
    top = _chat_top_logprobs(call)
    include_usage = _include_usage(call.body)
    base: dict[str, Any] = {
        "id": f"chatcmpl-mock{call.seq}",
        "object": "chat.completion.chunk",
        "created": call.created,
        "model": call.model,
        "system_fingerprint": "fp_mock",
        "service_tier": "default",
    }

    def chunk(index: int, delta: dict[str, Any], lp: Any = None, finish: str | None = None) -> bytes:
        body = dict(base, choices=[{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}])
        if include_usage:  # the real API sends usage: null on every chunk but the last
            body["usage"] = None
        return sse_data(body)

    frames: list[Frame] = [
        (chunk(i, {"role": "assistant", "content": ""}), False) for i in range(len(plan.choices))
    ]
    inline = call.inline_reasoning
    # One delay per step, not per choice: n choices are generated in parallel upstream.
    for step in range(0 if inline else max((len(c.reasoning) for c in plan.choices), default=0)):
        for i, c in enumerate(plan.choices):
            if step < len(c.reasoning):
                frames.append((chunk(i, {"reasoning_content": c.reasoning[step]}), i == 0))
    contents = [inline_pieces(c, inline, plan.truncated) for c in plan.choices]
    for step in range(max((len(t) for t in contents), default=0)):
        for i, tokens in enumerate(contents):
            if step < len(tokens):
                token = tokens[step]
                lp = None if top is None else {"content": [chat_logprob(token, step, top)], "refusal": None}
                frames.append((chunk(i, {"content": token}, lp), i == 0))
    finish = "length" if plan.truncated else "stop"
    frames.extend((chunk(i, {}, finish=finish), False) for i in range(len(plan.choices)))
    if include_usage:
        frames.append((sse_data(dict(base, choices=[], usage=usage(plan))), False))
    frames.append((SSE_DONE, False))
    return frames


# -- legacy completions ----------------------------------------------------------------------
def completion_plan(call: Call) -> Plan:
    if "prompt" not in call.body:
        raise BadRequest("'prompt' is required")
    return plan_output(
        input_tokens=count_input_tokens(call.body, ("prompt",)),
        chunks=call.chunks,
        limit=call.opt_int("max_tokens") or 16,  # the endpoint's documented default
        n=call.opt_int("n", high=16) or 1,
        reasoning=call.chunks if call.inline_reasoning else 0,
    )


def _legacy_logprobs(tokens: tuple[str, ...], top: int, start: int = 0, offset: int = 0) -> dict[str, Any]:
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": list(tokens),
        "token_logprobs": [logprob(start + i) for i in range(len(tokens))],
        "top_logprobs": [{t: logprob(start + i)} for i, t in enumerate(tokens)] if top else None,
        "text_offset": offsets,
    }


def completion_body(call: Call, plan: Plan) -> dict[str, Any]:
    top = call.opt_int("logprobs", low=0, high=5)
    finish = "length" if plan.truncated else "stop"
    return {
        "id": f"cmpl-mock{call.seq}",
        "object": "text_completion",
        "created": call.created,
        "model": call.model,
        "system_fingerprint": "fp_mock",
        "choices": [
            {
                "index": i,
                "text": "".join(tokens),
                "logprobs": None if top is None else _legacy_logprobs(tokens, top),
                "finish_reason": finish,
            }
            for i, tokens in enumerate(inline_pieces(c, call.inline_reasoning, plan.truncated)
                                       for c in plan.choices)
        ],
        "usage": usage(plan),
    }


def completion_stream(call: Call, plan: Plan) -> list[Frame]:
    top = call.opt_int("logprobs", low=0, high=5)
    base = {
        "id": f"cmpl-mock{call.seq}",
        "object": "text_completion",
        "created": call.created,
        "model": call.model,
    }
    frames: list[Frame] = []
    contents = [inline_pieces(c, call.inline_reasoning, plan.truncated) for c in plan.choices]
    # text_offset counts characters from the start of the choice's whole text, not the delta's.
    positions = [0] * len(contents)
    for step in range(max((len(t) for t in contents), default=0)):
        for i, tokens in enumerate(contents):
            if step < len(tokens):
                token = tokens[step]
                lp = None if top is None else _legacy_logprobs((token,), top, start=step, offset=positions[i])
                positions[i] += len(token)
                frames.append(
                    (
                        sse_data(
                            dict(
                                base,
                                choices=[{"index": i, "text": token, "logprobs": lp, "finish_reason": None}],
                            )
                        ),
                        i == 0,
                    )
                )
    finish = "length" if plan.truncated else "stop"
    for i in range(len(plan.choices)):
        frames.append(
            (
                sse_data(
                    dict(base, choices=[{"index": i, "text": "", "logprobs": None, "finish_reason": finish}])
                ),
                False,
            )
        )
    if _include_usage(call.body):
        frames.append((sse_data(dict(base, choices=[], usage=usage(plan))), False))
    frames.append((SSE_DONE, False))
    return frames


# -- embeddings and models -------------------------------------------------------------------
def embeddings_body(call: Call, default_dims: int) -> dict[str, Any]:
    if "input" not in call.body:
        raise BadRequest("'input' is required")
    inputs = list(iter_embedding_inputs(call.body["input"]))
    if not inputs:
        raise BadRequest("'input' must not be empty")
    dims = call.opt_int("dimensions", high=8192) or default_dims
    b64 = call.body.get("encoding_format") == "base64"
    data = []
    for index, text in enumerate(inputs):
        vector = embedding(text, dims)
        data.append(
            {"object": "embedding", "index": index, "embedding": embedding_base64(vector) if b64 else vector}
        )
    tokens = count_input_tokens(call.body, ("input",))
    return {
        "object": "list",
        "data": data,
        "model": call.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def models_body(created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "tollgate-mock"} for m in MODELS
        ],
    }
