"""Risk score per account and per cluster, from raw signals, weights and ramps (``risk:`` config).

Each raw signal is turned into a *strength* in [0, 1] by a linear ramp (``ramps``), and the
strengths are combined by a noisy-OR: ``score = 1 - Π(1 - weight_i × strength_i)``. A noisy-OR
stays in [0, 1], never decreases when evidence is added, and reads simply: a weight is the score
that behaviour alone would give. Strengths are written to ``risk.signals.s_<name>`` for audit
and policies.

Clusters: a request belongs to up to five candidate clusters (each of its template candidates,
its /24 or /48 prefix, its ASN): accounts linked by a shared template or network (a union by
shared key, without a transitive closure, which would need global state). A candidate counts
only with at least ``cluster.min_accounts`` distinct entities; its score is
``ramp(mean evidence of its requests) × ramp(distinct entities)``. The request's cluster is the
candidate with the highest score. Guilt by association is limited: the cluster adds to an
account's score only in proportion to how much the account itself behaves like the cluster
(its chain-of-thought or request-shape share) and how young it is (full weight under
``new_account_age``, 10% at 90 days), so a normal user behind the same carrier-grade NAT or an
established customer in the same cloud as a campaign is not flagged.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from gateway.context import RiskInfo
from gateway.risk.settings import RiskSettings
from gateway.risk.signals import Candidate


def ramp(value: float, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    if lo < hi:
        return 0.0 if value <= lo else 1.0 if value >= hi else (value - lo) / (hi - lo)
    return 0.0 if value >= lo else 1.0 if value <= hi else (lo - value) / (lo - hi)


def strengths(signals: Mapping[str, float], r: Mapping[str, tuple[float, float]],
              new_account_age: float) -> dict[str, float]:
    """Behaviour strengths (0..1) keyed like ``settings.weights`` (``cluster`` excluded)."""
    get = signals.get
    s = {
        "cot_share": ramp(get("cot_share", get("cot", 0.0)), r["cot_share"]),
        "shape_share": ramp(get("shape_share", get("shape", 0.0)), r["shape_share"]),
        "hydra": ramp(get("template_accounts", 0.0), r["template_accounts"]),
        "fan_in": max(ramp(get("ip_accounts", 0.0), r["ip_accounts"]),
                      ramp(get("prefix_accounts", 0.0), r["prefix_accounts"])),
        "new_accounts": ramp(get("new_accounts", 0.0), r["new_accounts"]),
        "velocity": ramp(get("velocity", 0.0), r["velocity"]),
        "single_turn": ramp(get("single_turn_share", 0.0), r["single_turn_share"]),
        "focus": ramp(get("focus", 0.0), r["focus"]),
        "round_the_clock": ramp(get("hours_active", 0.0), r["hours_active"]),
        "anonymiser": get("anonymiser", 0.0),
        "hosting": get("hosting", 0.0),
    }
    cv = get("gap_cv")
    s["regularity"] = ramp(cv, r["gap_cv"]) if cv is not None else 0.0
    age = get("account_age_days")
    young = age is not None and age * 86400.0 < new_account_age
    s["young_volume"] = ramp(get("requests", 0.0), r["young_requests"]) if young else 0.0
    return s


def noisy_or(weights: Mapping[str, float], strengths_: Mapping[str, float]) -> float:
    keep = 1.0
    for name, strength in strengths_.items():
        keep *= 1.0 - weights.get(name, 0.0) * strength
    return 1.0 - keep


def best_cluster(candidates: list[Candidate], settings: RiskSettings) -> tuple[Candidate | None, float]:
    best: Candidate | None = None
    best_score = 0.0
    size_ramp = (settings.cluster_min_accounts - 1.0, float(settings.cluster_full_accounts))
    for cand in candidates:
        if cand.size < settings.cluster_min_accounts:
            continue
        score = ramp(cand.evidence, settings.ramps["cluster_evidence"]) * ramp(cand.size, size_ramp)
        if best is None or score > best_score:
            best, best_score = cand, score
    return best, best_score


def _youth(age_days: float | None, settings: RiskSettings) -> float:
    """1 for accounts younger than ``new_account_age``, falling to 0.1 at 90 days: an established
    account sharing a cloud ASN with a campaign is much less likely part of it than a fresh one
    (campaigns burn through new accounts; aged accounts are the attacker's scarce resource)."""
    if age_days is None:
        return 1.0
    young = settings.new_account_age / 86400.0
    return 1.0 - 0.9 * ramp(age_days, (young, max(young + 1.0, 90.0)))


def apply(risk: RiskInfo, candidates: list[Candidate], settings: RiskSettings) -> None:
    """Fill ``risk.score`` and the cluster fields from ``risk.signals``."""
    Scorer(settings).apply(risk, candidates)


_NAMES = ("cot_share", "shape_share", "hydra", "fan_in", "new_accounts", "velocity", "single_turn", "focus",
          "round_the_clock", "anonymiser", "hosting", "regularity", "young_volume", "cluster")
_SIGNAL_NAMES = MappingProxyType({name: f"s_{name}" for name in _NAMES})


class Scorer:
    """:func:`apply` for one :class:`RiskSettings`, with its ramps and weights read once: the same
    arithmetic in the same order (the strengths of :func:`strengths`, the noisy-OR of
    :func:`noisy_or`, whose zero strengths multiply by exactly 1 and are skipped)."""

    __slots__ = ("_settings", "_ramps", "_weights", "_young")

    def __init__(self, settings: RiskSettings) -> None:
        self._settings = settings
        self._ramps = dict(settings.ramps)
        self._weights = dict(settings.weights)
        self._young = settings.new_account_age

    def apply(self, risk: RiskInfo, candidates: list[Candidate]) -> None:
        signals = risk.signals
        s = strengths(signals, self._ramps, self._young)
        age = signals.get("account_age_days")
        if candidates:
            cluster, cluster_score = best_cluster(candidates, self._settings)
            if cluster is not None:
                risk.cluster_id = cluster.cluster_id
                risk.cluster_size = cluster.size
                risk.cluster_score = round(cluster_score, 4)
                likeness = max(s["cot_share"], s["shape_share"])
                s["cluster"] = cluster_score * likeness * _youth(age, self._settings)
        weights = self._weights
        names = _SIGNAL_NAMES
        keep = 1.0
        for name, value in s.items():
            if value:
                signals[names[name]] = round(value, 4)
                keep *= 1.0 - weights.get(name, 0.0) * value
        risk.score = round(1.0 - keep, 4)
