from __future__ import annotations

from gateway.risk.settings import RiskSettings, parse_risk_settings
from gateway.risk.sigstore import AccountTouch, DecayAdd, HllAdd, MemorySignalStore, StateGet, StatePut
from gateway.stages.risk import RiskStage
from gateway.yamlsource import Issues, Node
from tests.unit.risk.helpers import FakeClock, chat_ctx

TEMPLATE = "Solve the following problem carefully. {q} Think step by step and show your work."


async def test_hll_window_and_decay_with_injected_clock() -> None:
    clock = FakeClock()
    store = MemorySignalStore(clock)
    for i in range(50):
        await store.batch([HllAdd("k", f"m{i}", 60.0)])
    assert (await store.batch([HllAdd("k", "m0", 60.0)])).results[0] == 50
    clock.now += 60  # next bucket: the previous one still counts
    assert (await store.batch([HllAdd("k", "new", 60.0)])).results[0] == 51
    clock.now += 120  # both old buckets gone
    assert (await store.batch([HllAdd("k", "new2", 60.0)])).results[0] == 1
    first = (await store.batch([DecayAdd("d", (4.0,), 10.0)])).results[0]
    clock.now += 10
    assert (await store.batch([DecayAdd("d", (0.0,), 10.0)])).results[0] == (first[0] / 2,)


async def test_account_state_gaps_and_expiry() -> None:
    clock = FakeClock()
    store = MemorySignalStore(clock)
    touch = AccountTouch("a:x", (1.0, 0.0), "tpl", 3600.0, 100.0)
    for _ in range(10):
        state = (await store.batch([touch])).results[0]
        clock.now += 5.0
    assert state.gaps == 9 and abs(state.gap_mean - 5.0) < 1e-9 and state.gap_cv == 0.0
    assert state.top_template == "tpl" and state.top_count > 9
    await store.batch([StatePut("fr:x", "rule", "{}", 30.0)])
    assert (await store.batch([StateGet("fr:x")])).results[0] == {"rule": "{}"}
    clock.now += 31
    assert (await store.batch([StateGet("fr:x")])).results[0] == {}
    clock.now += 100  # account state expired: first seen again
    assert (await store.batch([touch])).results[0].previous is None


async def test_request_shape_and_cot_signals() -> None:
    stage = RiskStage(RiskSettings(), MemorySignalStore(FakeClock()))
    ctx = chat_ctx("Let's think step by step: what is 2+2?", logprobs=True, n=3, max_tokens=16384)
    await stage(ctx)
    s = ctx.risk.signals
    assert s["cot"] > 0 and s["logprobs"] == 1.0 and s["n_gt_1"] == 1.0 and s["max_tokens_ceiling"] == 1.0
    assert s["single_turn"] == 1.0 and ctx.audit["risk"]["families"] == ["step_by_step"]
    ctx = chat_ctx("hello there, how are you doing today?", history=2)
    await stage(ctx)
    assert ctx.risk.signals["cot"] == 0.0 and ctx.risk.signals["single_turn"] == 0.0


async def test_hydra_template_fan_in_forms_a_cluster() -> None:
    clock = FakeClock()
    stage = RiskStage(RiskSettings(), MemorySignalStore(clock))
    ctx = None
    for i in range(40):
        ctx = chat_ctx(TEMPLATE.format(q=f"Item {i} costs {i * 3} dollars. What do {i} items cost?"),
                       account=f"hydra{i}", ip=f"198.51.100.{i + 1}", asn=64999)
        await stage(ctx)
        clock.now += 2.0
    assert ctx is not None
    risk = ctx.risk
    assert risk.signals["template_accounts"] >= 35
    assert risk.signals["prefix_accounts"] >= 35 and risk.cluster_size >= 35
    assert risk.cluster_score > 0.8 and risk.score > 0.8
    # an ordinary user on an unrelated network is unaffected
    other = chat_ctx("Write a short poem about my grandmother's garden in spring.", account="normal",
                     ip="192.0.2.10", asn=64501)
    await stage(other)
    assert other.risk.cluster_id is None and other.risk.score < 0.3


async def test_regular_timing_and_velocity() -> None:
    clock = FakeClock()
    stage = RiskStage(RiskSettings(), MemorySignalStore(clock))
    for i in range(60):
        ctx = chat_ctx(f"Translate sentence number {i} into French.", account="bot")
        await stage(ctx)
        clock.now += 10.0  # one request every 10 s: 360/h against a free tier's 60/h
    s = ctx.risk.signals
    assert s["gap_cv"] < 0.05 and s["s_regularity"] == 1.0 and s["velocity"] > 3


async def test_store_failure_fails_open() -> None:
    from gateway.store.base import StoreError

    class Broken(MemorySignalStore):
        async def batch(self, ops):  # type: ignore[no-untyped-def]
            raise StoreError("down")

    stage = RiskStage(RiskSettings(), Broken())
    ctx = chat_ctx("Think step by step.")
    assert await stage(ctx) is None
    assert ctx.risk.signals["store_error"] == 1.0 and stage.store_errors == 1


def test_parse_risk_settings_errors() -> None:
    issues = Issues()
    node = Node.parse("weights: {cot_shar: 0.5, hydra: 3}\nramps: {velocity: [2, 2]}\n"
                      "store: {backend: redis}\n",
                      "g.yaml", issues)
    settings = parse_risk_settings(node)
    errors = sorted(issues.errors, key=lambda i: (i.mark.line, i.mark.col) if i.mark else (0, 0))
    assert [str(i) for i in errors] == [
        "g.yaml:1:11: weights.cot_shar: unknown key 'cot_shar'; did you mean 'cot_share'?",
        "g.yaml:1:33: weights.hydra: expected a weight from 0 to 1, got 3",
        "g.yaml:2:19: ramps.velocity: expected [lo, hi], two different numbers, got [2, 2]",
        "g.yaml:3:9: store.backend: the redis backend needs a 'url'",
    ]
    assert settings.weights["hydra"] == 0.5
