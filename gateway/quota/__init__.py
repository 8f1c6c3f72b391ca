"""Terms-of-service quotas: the ``quota`` policy action and the quota pipeline stage."""

from gateway.quota.action import QuotaActionSpec
from gateway.quota.limits import CompiledLimit, LimitKind, QuotaAction
from gateway.quota.settings import Price, QuotaSettings, check_workers, parse_quota_settings
from gateway.quota.stage import QuotaStage
from gateway.quota.wiring import create_store

__all__ = [
    "CompiledLimit", "LimitKind", "Price", "QuotaAction", "QuotaActionSpec", "QuotaSettings",
    "QuotaStage", "check_workers", "create_store", "parse_quota_settings",
]
