"""MemoryStore's lease book (algorithms.Leases) against a plain dict of expiries."""

from __future__ import annotations

import random

from gateway.store.algorithms import Leases, lease_renew


def test_counts_and_first_expiry_match_a_scan_of_every_lease() -> None:
    rng = random.Random(11)
    leases = Leases()
    model: dict[str, int] = {}  # lease id -> expiry, never pruned: the scan filters
    now = 0
    for step in range(5000):
        now += rng.choice([0, 1, 5, 40])
        op = rng.random()
        if op < 0.45:
            lease_id = f"l{step}"
            leases.hold(lease_id, now + rng.randint(1, 300))
            model[lease_id] = leases.expiry[lease_id]
        elif op < 0.75 and model:
            lease_id = rng.choice(list(model))
            leases.release(lease_id)
            del model[lease_id]
        elif model:
            lease_id = rng.choice(list(model))
            ttl = rng.randint(1, 300)
            expected = model[lease_id] > now
            assert lease_renew(leases, now, lease_id, ttl) is expected
            if expected:
                model[lease_id] = max(model[lease_id], now + ttl)
        live = sorted(e for e in model.values() if e > now)
        assert leases.live(now) == len(live)
        assert leases.earliest(now) == (live[0] if live else None)
    # stale heap entries (released, renewed) never outnumber the live leases for long
    assert len(leases.heap) <= 2 * len(leases.expiry) + 64


def test_an_expired_lease_is_not_renewed_and_stays_gone() -> None:
    leases = Leases()
    leases.hold("a", 100)
    assert not lease_renew(leases, 100, "a", 50)
    assert leases.live(100) == 0 and leases.earliest(100) is None
