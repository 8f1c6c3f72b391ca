"""A batch of reconciles adjusts each limit key and bucket once (gateway.store.reconcile.merge)."""

from __future__ import annotations

from gateway.store.base import Adjustment, Algorithm, Charge, Receipt
from gateway.store.reconcile import merge


def window(key: str, limit: int = 1000, period_ms: int = 60_000) -> Charge:
    return Charge(key, Algorithm.WINDOW, limit, period_ms, 100)


def test_same_key_and_bucket_are_summed_in_first_seen_order() -> None:
    org, acct = window("org"), window("acct")
    batch = [Adjustment(Receipt(org, 2000), -30), Adjustment(Receipt(acct, 2000), 5),
             Adjustment(Receipt(org, 2000), 12), Adjustment(Receipt(org, 4000), -1)]
    assert merge(batch) == [Adjustment(Receipt(org, 2000), -18), Adjustment(Receipt(acct, 2000), 5),
                            Adjustment(Receipt(org, 4000), -1)]


def test_deltas_that_cancel_out_are_dropped() -> None:
    org = window("org")
    assert merge([Adjustment(Receipt(org, 2000), 7), Adjustment(Receipt(org, 2000), -7)]) == []


def test_leases_and_changed_numbers_are_never_merged() -> None:
    first = Charge("conc", Algorithm.LEASE, 4, 30_000, 1, lease_id="a")
    second = Charge("conc", Algorithm.LEASE, 4, 30_000, 1, lease_id="b")
    releases = [Adjustment(Receipt(first), -1), Adjustment(Receipt(second), -1)]
    assert merge(releases) == releases
    # the same key under new numbers (a reload in between): a different bucket width
    reloaded = [Adjustment(Receipt(window("org"), 0), -5), Adjustment(Receipt(window("org", 2000), 0), -5)]
    assert merge(reloaded) == reloaded


def test_a_single_adjustment_is_returned_as_is() -> None:
    batch = [Adjustment(Receipt(window("org"), 2000), 0)]
    assert merge(batch) is batch
