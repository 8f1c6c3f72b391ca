"""The gateway with its quota stage cut down to one part, to measure what each part costs.

    python bench/quota_ablation.py VARIANT run --config ... --port ... --upstream ...

runs ``gateway run ...`` with ``QuotaStage.__call__`` replaced for the whole process:

- ``noop``: the stage returns at once (policy matching, including the quota rule, still runs);
- ``ping``: one ``PING`` on the quota store's own Redis connection, and nothing else: the floor
  of any design that makes one Redis round trip per request;
- ``charge``: the real plan, charges and ``EVALSHA`` (all limits checked and charged), then
  nothing: no audit section, no rate-limit headers, no ticket, so no reconcile;
- ``noheaders``: the stage unchanged except that no rate-limit header is rendered or sent (what
  the headers cost: rendering, merging and aiohttp writing them);
- ``nosettle``: the stage unchanged except that settling a response only drops its ticket: no
  reconcile (so no ``adjust.lua`` either) and no settled usage in the audit record (what a token
  or spend budget's settle costs);
- ``noreconcile``: settling unchanged except that the adjustments are dropped where the store
  would queue them: no ``adjust.lua`` batch, its encoding, reply or callbacks (what the
  reconcile itself costs, apart from the settle's bookkeeping and audit);
- ``full``: the stage unchanged (the same code path as the plain target; a control).

``bench/load.py`` runs it for targets named ``gateway:VARIANT@ABLATION`` (for example
``gateway:redis@ping``), beside ``gateway:noquota`` and ``gateway:redis``, so each part's cost is
a throughput ratio measured in the same run. Bench code only: it reaches into the stage's and
the Redis store's private parts, and mypy checks that they still exist.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.cli import main  # noqa: E402
from gateway.context import ApiFamily, Decision, RequestContext  # noqa: E402
from gateway.quota.headers import HeaderLayout  # noqa: E402
from gateway.quota.stage import QuotaStage  # noqa: E402
from gateway.store.base import Adjustment, LimitState  # noqa: E402
from gateway.store.breaker import GuardedStore  # noqa: E402
from gateway.store.redis import RedisStore  # noqa: E402
from gateway.store.resp import pack  # noqa: E402

_PING = pack("PING")

StageCall = Callable[[QuotaStage, RequestContext], Coroutine[Any, Any, Decision | None]]


async def _noop(stage: QuotaStage, ctx: RequestContext) -> Decision | None:
    return None


async def _ping(stage: QuotaStage, ctx: RequestContext) -> Decision | None:
    matched = getattr(ctx.outcome, "actions", None)
    if not matched or not stage._plan_for(matched).slots:
        return None
    store = stage.guard.primary
    if not isinstance(store, RedisStore) or store._lean is None:
        raise SystemExit("the ping variant needs the quota store on a single Redis (the lean connection)")
    lean = store._lean
    proto = lean.proto
    if proto is not None and not proto.closed:
        await proto.send(_PING, store._deadline)
    else:
        await lean.call(_PING, store._deadline)
    return None


async def _charge(stage: QuotaStage, ctx: RequestContext) -> Decision | None:
    """``QuotaStage.__call__`` up to and including the store call."""
    matched = getattr(ctx.outcome, "actions", None)
    if not matched:
        return None
    plan = stage._plan_for(matched)
    if not plan.slots:
        return None
    req = ctx.request
    input_est = max(0, req.input_tokens_estimate)
    output_res = (req.max_tokens or stage.settings.default_output_tokens) * max(1, req.n)
    price = stage._price(req.model) if stage.settings.prices else None
    await stage.guard.charge(stage._charges(ctx, plan, input_est, output_res, price), plan.modes)
    return None


def _no_headers(layout: HeaderLayout, states: Sequence[LimitState], now: float, api: ApiFamily | None,
                times: dict[int, str] | None = None, into: dict[str, str] | None = None) -> dict[str, str]:
    return {} if into is None else into


def _drop_ticket(stage: QuotaStage, ctx: RequestContext) -> None:
    stage._pending.pop(id(ctx), None)


def _reconciled(guard: GuardedStore, adjustments: Sequence[Adjustment], backend: str) -> bool:
    return True  # as if queued and answered: the settle's own work stays, the reconcile goes


def _stage_call(call: StageCall) -> Callable[[], None]:
    return lambda: setattr(QuotaStage, "__call__", call)


# Each variant patches the process before the gateway starts.
VARIANTS: dict[str, Callable[[], None]] = {
    "noop": _stage_call(_noop), "ping": _stage_call(_ping), "charge": _stage_call(_charge),
    "noheaders": lambda: setattr(HeaderLayout, "render", _no_headers),
    "nosettle": lambda: setattr(QuotaStage, "settle_now", _drop_ticket),
    "noreconcile": lambda: setattr(GuardedStore, "adjust_soon", _reconciled), "full": lambda: None}


def run(argv: list[str]) -> int:
    if not argv or argv[0] not in VARIANTS:
        print(f"usage: quota_ablation.py {{{','.join(VARIANTS)}}} run ...", file=sys.stderr)
        return 2
    VARIANTS[argv[0]]()
    return main(argv[1:])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
