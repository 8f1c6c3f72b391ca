"""Shared state behind quotas and risk signals: the ``Store`` seam and its implementations."""

from gateway.store.base import (
    Adjustment,
    Algorithm,
    Charge,
    ChargeResult,
    LimitState,
    Receipt,
    Store,
    StoreError,
)

__all__ = [
    "Adjustment", "Algorithm", "Charge", "ChargeResult", "LimitState", "Receipt", "Store", "StoreError",
]
