"""The risk stage: distillation signals and scores into ``ctx.risk`` before the policy reads them.

Order: identity → client_ip → geo → **risk** → match → quota → friction. Never short-circuits:
what to do about a score is the policy's decision. A store failure is counted and the request is
scored from its local signals only (``risk.signals.store_error = 1``): risk scoring fails open,
friction state set earlier is then not seen for that request.

Never logs or audits prompt text: ``ctx.audit["risk"]`` holds numbers, family names and ids.
"""

from __future__ import annotations

import logging

from gateway.context import Decision, RequestContext
from gateway.risk.behind import BehindSignalStore
from gateway.risk.patterns import PatternSet, load_patterns
from gateway.risk.score import Scorer
from gateway.risk.settings import RiskSettings, StoreSettings
from gateway.risk.signals import Candidate, TextMemos, local_signals, plan, read
from gateway.risk.sigstore import MemorySignalStore, SignalStore
from gateway.store.base import StoreError

log = logging.getLogger(__name__)


def create_signal_store(settings: StoreSettings) -> SignalStore:
    """The configured backend (the caller closes it at shutdown)."""
    if settings.backend == "redis":
        from gateway.risk.redis_sigstore import RedisSignalStore

        assert settings.urls  # enforced by parse_risk_settings
        redis = RedisSignalStore.from_url(settings.urls, cluster=settings.cluster, prefix=settings.prefix,
                                          deadline=settings.deadline)
        if settings.mode == "behind":
            return BehindSignalStore(redis, max_entries=settings.mirror_entries)
        return redis
    return MemorySignalStore()


class RiskStage:
    """Computes signals, the account and cluster scores; fills ``ctx.risk``."""

    def __init__(self, settings: RiskSettings, store: SignalStore,
                 patterns: PatternSet | None = None) -> None:
        self._settings = settings
        self._store = store
        self._patterns = patterns if patterns is not None else load_patterns(settings.patterns)
        self._memos = TextMemos()
        self._scorer = Scorer(settings)
        self.store_errors = 0

    @property
    def store(self) -> SignalStore:
        return self._store

    async def __call__(self, ctx: RequestContext) -> Decision | None:
        settings = self._settings
        if not settings.enabled:
            return None
        risk = ctx.risk
        signals = risk.signals
        local = local_signals(ctx, self._patterns, settings, signals, self._memos)
        ops = plan(ctx, local, settings)
        template_id: str | None = None
        candidates: list[Candidate] = []
        if ops.ops:
            try:
                result = await self._store.batch(ops.ops)
            except StoreError as exc:
                self.store_errors += 1
                signals["store_error"] = 1.0
                log.warning("risk signal store unavailable: %s", exc)
            else:
                template_id, candidates = read(ctx, ops, result, settings, signals)
        risk.template_id = template_id or local.fingerprint.primary
        self._scorer.apply(risk, candidates)
        ctx.audit["risk"] = {
            "score": risk.score,
            "cluster_id": risk.cluster_id,
            "cluster_score": risk.cluster_score,
            "cluster_size": risk.cluster_size,
            "template_id": risk.template_id,
            "families": list(local.families),
        }
        return None

    def status(self) -> dict[str, int]:
        out = {"store_errors": self.store_errors}
        if isinstance(self._store, BehindSignalStore):
            out.update(self._store.status())
        return out

    async def close(self) -> None:
        await self._store.close()
