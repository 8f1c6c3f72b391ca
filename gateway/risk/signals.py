"""Per-request risk signals: local ones from the request, shared ones from one store batch.

Local (no I/O, see each module for its cost): chain-of-thought patterns
(:mod:`~gateway.risk.patterns`), request shape (logprobs, logit_bias, ``n`` > 1, reasoning budget
or ``max_tokens`` at the configured ceiling), single-turn, template fingerprint
(:mod:`~gateway.risk.fingerprint`).

Shared (one :meth:`SignalStore.batch`, 8-13 operations, one round trip):

| signal | state | cost |
| --- | --- | --- |
| ``template_accounts`` | HLL of entities per template candidate per window | 1 op per candidate (≤3) |
| ``template_rate`` | decaying request count (and evidence sum) per template | 1 op per candidate |
| ``ip_accounts``, ``prefix_accounts``, ``asn_accounts`` | HLL of entities per ip, /24 or /48, ASN | 3 ops |
| ``new_accounts`` | HLL of young accounts per prefix | 1 op (young accounts only) |
| ``velocity``, ``*_share``, ``gap_cv``, ``focus``, ``hours_active``, age | account state | 1 op |
| cluster evidence per prefix / ASN | decaying (count, evidence) | 2 ops |
| ``friction_active`` | the account's friction state | 1 op |

An *entity* is the principal's org when it has one, else its account: accounts of one paying
org sharing a template or a network are one customer, not a hydra.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from gateway.context import RequestContext
from gateway.memo import Memo
from gateway.risk.extract import extract_prompt
from gateway.risk.fingerprint import MAX_SEGMENT_CHARS, NO_FINGERPRINT, Fingerprint, fingerprint
from gateway.risk.normalize import normalize
from gateway.risk.patterns import PatternHit, PatternSet
from gateway.risk.settings import RiskSettings
from gateway.risk.sigstore import AccountState, AccountTouch, BatchResult, DecayAdd, HllAdd, Op, StateGet

# AccountTouch amounts, in this order.
_REQ, _COT, _SINGLE, _SHAPE = range(4)
MIN_RATE_WINDOW = 300.0  # seconds: a first request is not an infinite rate


@dataclass(frozen=True, slots=True)
class LocalSignals:
    cot: float
    families: tuple[str, ...]
    shape: float
    single_turn: bool
    fingerprint: Fingerprint

    @property
    def evidence(self) -> float:
        """What one request says on its own: the cluster evidence it contributes."""
        return max(self.cot, self.shape)


class Candidate(NamedTuple):
    """A cluster a request may belong to: accounts sharing a template or a network."""

    cluster_id: str
    size: int
    evidence: float  # decayed mean of the per-request evidence of its requests


@dataclass(slots=True)
class Plan:
    """The store operations of one request, in a fixed order that :func:`read` walks: per
    template candidate an HLL add and a decay; with a network, the ip HLL, the prefix HLL and
    evidence, the new-account HLL (young accounts), the ASN HLL and evidence (known ASN); with an
    account, its touch and its friction state."""

    ops: list[Op]
    templates: list[str]  # template ids, in op order
    prefix: str | None = None  # cluster id of the prefix (None: no network ops)
    new: bool = False
    asn: str | None = None  # cluster id of the ASN
    account: bool = False


class _SegmentMemo(Memo[str | None]):
    """Template id per segment, keyed by the segment's first ``MAX_SEGMENT_CHARS`` (all that the
    id depends on), so a long system prompt costs at most that much key memory."""

    __slots__ = ()

    def __call__(self, text: str, fn: Callable[[str], str | None]) -> str | None:
        return super().__call__(text[:MAX_SEGMENT_CHARS], fn)


@dataclass(slots=True)
class TextMemos:
    """Bounded caches of pure functions of prompt text, owned by one :class:`RiskStage`.

    ``prompts``: pattern hit and fingerprint per whole prompt (system and newest user text):
    retries, evaluation harnesses and prompts shared by an app's users repeat it exactly, and a
    hit skips normalising, the anchor search and the fingerprint's sentence split (about half of
    the stage's local work). Its entries hold only for the :class:`PatternSet` they were made
    with (a different one empties it). On a miss, ``folded``: normalised system prompts (pattern
    matching); ``segments``: template id per system prompt / head / tail sentence. Worst case
    about 8 MB (``prompts``: 2048 keys of at most 4096 characters), 4 MB and 5 MB; typically far
    less (prompts and sentences are short, system prompts few)."""

    folded: Memo[str] = field(default_factory=lambda: Memo(256, 8192))
    segments: Memo[str | None] = field(default_factory=lambda: _SegmentMemo(8192, MAX_SEGMENT_CHARS))
    prompts: Memo[tuple[PatternHit, Fingerprint]] = field(default_factory=lambda: Memo(2048, 4096))
    patterns: PatternSet | None = None  # the PatternSet the ``prompts`` entries were made with

    def fold_system(self, text: str) -> str:
        return self.folded(text, normalize)

    def analyse(self, patterns: PatternSet, system: str, user: str) -> tuple[PatternHit, Fingerprint]:
        """``patterns.match_prompt`` and :func:`fingerprint` of a prompt, remembered by its text."""
        if patterns is not self.patterns:
            self.prompts = Memo(2048, 4096)
            self.patterns = patterns

        def compute(_key: str) -> tuple[PatternHit, Fingerprint]:
            hit = patterns.match_prompt(system, user, self.fold_system)
            return hit, fingerprint(system, user, self.segments) if user or system else NO_FINGERPRINT

        # The length of ``system`` first: "a" + "bc" and "ab" + "c" must be different keys.
        return self.prompts(f"{len(system)}:{system}{user}", compute)


def local_signals(ctx: RequestContext, patterns: PatternSet, settings: RiskSettings,
                  out: dict[str, float], memos: TextMemos | None = None) -> LocalSignals:
    view = ctx.request
    prompt = extract_prompt(view)
    if memos is None:
        hit = patterns.match(prompt.combined)
        fp = fingerprint(prompt.system, prompt.user) if prompt.user or prompt.system else NO_FINGERPRINT
    else:
        hit, fp = memos.analyse(patterns, prompt.system, prompt.user)
    flags = {
        "logprobs": 1.0 if view.logprobs or view.top_logprobs else 0.0,
        "logit_bias": 1.0 if view.logit_bias else 0.0,
        "n_gt_1": 1.0 if view.n > 1 else 0.0,
        "budget_max": 1.0 if (view.reasoning_budget or 0) >= settings.reasoning_budget_ceiling
        or _effort_high(view.body) else 0.0,
        "max_tokens_ceiling": 1.0 if (view.max_tokens or 0) >= settings.max_tokens_ceiling else 0.0,
    }
    out.update(flags)
    shape = max(flags.values())
    single = prompt.user_turns <= 1
    out["cot"] = hit.strength
    out["shape"] = shape
    out["single_turn"] = 1.0 if single else 0.0
    return LocalSignals(hit.strength, hit.families, shape, single, fp)


def _effort_high(body: object) -> bool:
    if not isinstance(body, dict):
        return False
    effort = body.get("reasoning_effort")
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict):
        effort = reasoning.get("effort", effort)
    return effort == "high"


def plan(ctx: RequestContext, local: LocalSignals, settings: RiskSettings) -> Plan:
    """The store operations for this request (nothing is sent yet)."""
    principal, client = ctx.principal, ctx.client
    entity = principal.org or principal.account or (f"ip:{client.ip}" if client.ip else "")
    window = settings.fan_in_window
    cluster_hl = settings.cluster_half_life
    ops: list[Op] = []
    p = Plan(ops, [])
    evidence = (1.0, local.evidence)
    candidates = local.fingerprint.candidates
    if entity:
        templates = p.templates
        for _kind, tid in candidates:
            ops.append(HllAdd(f"t:{tid}", entity, window))
            ops.append(DecayAdd(f"tr:{tid}", evidence, cluster_hl))
            templates.append(tid)
        ip = client.ip
        if ip is not None:
            ip_text, prefix = client.network(ip)
            p.prefix = prefix_id = f"p:{prefix}"
            ops.append(HllAdd(f"ip:{ip_text}", entity, window))
            ops.append(HllAdd(prefix_id, entity, window))
            ops.append(DecayAdd(f"ce:{prefix_id}", evidence, cluster_hl))
            created = principal.created_at
            if created is not None and ctx.wall_time - created < settings.new_account_age:
                p.new = True
                ops.append(HllAdd(f"pn:{prefix}", entity, window))
            if client.asn is not None:
                p.asn = asn_id = f"asn:{client.asn}"
                ops.append(HllAdd(asn_id, entity, window))
                ops.append(DecayAdd(f"ce:{asn_id}", evidence, cluster_hl))
    account = principal.account
    if account:
        focus_id = candidates[-1][1] if candidates else ""
        amounts = (1.0, local.cot, 1.0 if local.single_turn else 0.0, local.shape)
        p.account = True
        ops.append(AccountTouch(f"a:{account}", amounts, focus_id, settings.account_half_life,
                                settings.account_ttl))
        ops.append(StateGet(f"fr:{account}"))
    return p


def _mean(pair: tuple[float, ...]) -> float:
    return pair[1] / pair[0] if pair and pair[0] > 0 else 0.0


def read(ctx: RequestContext, p: Plan, result: BatchResult, settings: RiskSettings,
         out: dict[str, float]) -> tuple[str | None, list[Candidate]]:
    """Fill ``out`` with the shared signals; return the template id and cluster candidates."""
    res = result.results
    candidates: list[Candidate] = []
    template_id: str | None = None
    best = 0
    i = 0
    for tid in p.templates:
        count = int(res[i])
        pair = res[i + 1]
        i += 2
        if count > best or template_id is None:
            best, template_id = count, tid
            out["template_rate"] = pair[0] * math.log(2) / settings.cluster_half_life * 3600.0
        candidates.append(Candidate(f"t:{tid}", count, _mean(pair)))
    if template_id is not None:
        out["template_accounts"] = float(best)
    prefix = p.prefix
    if prefix is not None:
        prefix_size, prefix_evidence = res[i + 1], res[i + 2]
        out["ip_accounts"] = float(res[i])
        out["prefix_accounts"] = float(prefix_size)
        i += 3
        new = res[i] if p.new else None
        i += p.new
        asn = p.asn
        if asn is not None:
            asn_size = res[i]
            out["asn_accounts"] = float(asn_size)
        if new is not None:
            out["new_accounts"] = float(new)
        candidates.append(Candidate(prefix, int(prefix_size), _mean(prefix_evidence)))
        if asn is not None:
            candidates.append(Candidate(asn, int(asn_size), _mean(res[i + 1])))
            i += 2
    client = ctx.client
    out["anonymiser"] = 1.0 if (client.is_anonymous or client.is_anonymous_vpn or client.is_tor_exit_node
                                or client.is_public_proxy or client.is_residential_proxy) else 0.0
    out["hosting"] = 1.0 if client.is_hosting_provider else 0.0
    if p.account:
        _account(ctx, res[i], result.now, settings, out)
        if res[i + 1]:
            out["friction_active"] = 1.0
    return template_id, candidates


def _account(ctx: RequestContext, state: AccountState, now: float, settings: RiskSettings,
             out: dict[str, float]) -> None:
    n = state.counts[_REQ]
    out["requests"] = n
    # A decayed count with half-life h holds h/ln2 × (1 - 2^(-age/h)) seconds of steady traffic
    # (the decay kernel integrated over the account's age): young accounts are not under-rated.
    hl = settings.account_half_life
    age = max(0.0, now - state.first_seen)
    window = max(MIN_RATE_WINDOW, hl / math.log(2) * (1.0 - math.pow(2.0, -age / hl)))
    rate = n / window * 3600.0
    out["rate_per_hour"] = rate
    tiers = settings.tier_rates
    out["velocity"] = rate / tiers.get(ctx.principal.tier or "default", tiers.get("default", 120.0))
    out["cot_share"] = state.counts[_COT] / n
    out["single_turn_share"] = state.counts[_SINGLE] / n
    out["shape_share"] = state.counts[_SHAPE] / n
    out["gaps"] = float(state.gaps)
    cv = state.gap_cv
    if cv is not None and state.gaps >= settings.min_gaps:
        out["gap_cv"] = cv
    if n >= 5:
        out["focus"] = min(1.0, state.top_count / n)
    out["hours_active"] = float(state.hours.bit_count())
    created = ctx.principal.created_at
    first = min(created, state.first_seen) if created is not None else state.first_seen
    out["account_age_days"] = max(0.0, now - first) / 86400.0
