"""How current each issuer's key set is, as an SRE sees it (``/admin/status`` and the
``tollgate_jwks_*`` gauges): the age of the last good keys grows through an identity provider's
outage and the time left before they go stale runs down to the moment tokens start failing."""

from __future__ import annotations

import json
import math
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.component_metrics import ComponentCollector
from gateway.identity.config import JwtConfig
from gateway.identity.jwks import Freshness, KeySource
from gateway.identity.jwt import JwtVerifier
from tests.unit.identity.test_jwt import issuer_config
from tests.unit.identity.tokens import ISSUER, FakeClock, claims, public_jwk, sign

ALLOWED = frozenset({"RS256"})
OTHER_ISSUER = "https://other-idp.example.com/"


class OutageSource(KeySource):
    """Serves a key set until ``down`` is set, then fails every fetch as an unreachable
    identity provider does."""

    def __init__(self, jwk: dict[str, Any], clock: FakeClock, **kwargs: Any) -> None:
        super().__init__(ALLOWED, clock=clock, **kwargs)
        self.doc = json.dumps({"keys": [jwk]}).encode()
        self.down = False

    async def _fetch(self) -> bytes:
        if self.down:
            raise OSError("connection refused")
        return self.doc


async def test_freshness_counts_from_the_last_good_fetch_and_runs_down_to_stale(
        rsa_key: Any, clock: FakeClock) -> None:
    source = OutageSource(public_jwk(rsa_key, "k1"), clock, ttl=600, cooldown=30, max_stale=3600)
    assert source.freshness() == Freshness(age=None, stale_in=0.0, stale=True)  # never loaded
    assert await source.get("k1") is not None
    assert source.freshness() == Freshness(age=0.0, stale_in=3600.0, stale=False)

    source.down = True
    clock.advance(700)  # past the ttl: the refresh timer's fetch fails
    assert await source.refresh() is False and source.failures == 1
    assert await source.get("k1") is not None
    # The failed refresh changes nothing: the age counts from the last *successful* fetch.
    assert source.freshness() == Freshness(age=700.0, stale_in=2900.0, stale=False)

    clock.advance(2900)  # the last instant the keys are trusted
    assert source.freshness() == Freshness(age=3600.0, stale_in=0.0, stale=False)
    assert source._lookup("k1", clock()) is not None
    clock.advance(0.5)  # stale now, exactly when verification starts failing closed
    assert source.freshness() == Freshness(age=3600.5, stale_in=0.0, stale=True)
    assert await source.get("k1") is None

    source.down = False  # the provider is back: the next token's fetch makes the set fresh again
    clock.advance(30)
    assert await source.get("k1") is not None
    assert source.freshness() == Freshness(age=0.0, stale_in=3600.0, stale=False)


def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """The ``tollgate_jwks_*`` samples by (name, issuer), through Prometheus' own text parser."""
    text = generate_latest(registry).decode()
    return {(sample.name, sample.labels["issuer"]): sample.value
            for family in text_string_to_metric_families(text) if family.name.startswith("tollgate_jwks_")
            for sample in family.samples}


async def test_the_metrics_show_each_issuers_key_set_age_time_left_and_failures_at_scrape_time(
        rsa_key: Any, clock: FakeClock) -> None:
    healthy = OutageSource(public_jwk(rsa_key, "k1"), clock, ttl=600, cooldown=30, max_stale=3600)
    unreachable = OutageSource(public_jwk(rsa_key, "k1"), clock, max_stale=3600)
    unreachable.down = True
    config = JwtConfig(issuers=(issuer_config(), issuer_config(issuer=OTHER_ISSUER)))
    verifier = JwtVerifier(config, sources={ISSUER: healthy, OTHER_ISSUER: unreachable})
    registry = CollectorRegistry()
    registry.register(ComponentCollector(jwks=verifier.sources))
    try:
        await verifier.authenticate(sign(rsa_key, claims()))
        unreachable.prefetch()  # as at start-up
        await unreachable.join()
        clock.advance(120)
        assert samples(registry) == {
            ("tollgate_jwks_age_seconds", ISSUER): 120.0,
            ("tollgate_jwks_stale_in_seconds", ISSUER): 3480.0,
            ("tollgate_jwks_fetch_failures_total", ISSUER): 0.0,
            # Never fetched: an age no threshold tolerates, and no time left.
            ("tollgate_jwks_age_seconds", OTHER_ISSUER): math.inf,
            ("tollgate_jwks_stale_in_seconds", OTHER_ISSUER): 0.0,
            ("tollgate_jwks_fetch_failures_total", OTHER_ISSUER): 1.0,
        }
        clock.advance(3600)  # read at each scrape, from the source's clock: nothing cached
        later = samples(registry)
        assert later[("tollgate_jwks_stale_in_seconds", ISSUER)] == 0.0
        assert later[("tollgate_jwks_age_seconds", ISSUER)] == 3720.0
    finally:
        await verifier.close()

