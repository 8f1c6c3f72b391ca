"""Per-request cost of the identity (cached) + client IP + geo stages.

    .venv/bin/python -m bench.identity_geo [--iterations N] [--jwt]

Each iteration builds a fresh RequestContext with aiohttp-style headers (not timed), then times
the three stages back to back with perf_counter_ns. Clients come from a pool of (by default) 2,000 addresses
behind two trusted proxy hops, so the geo cache sees realistic repeat traffic. Uses MaxMind's
test databases from ../shared/geoip when present, else databases generated with mmdb-writer.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.context import ApiFamily, RequestContext, RequestView
from gateway.geo.config import GeoIpConfig
from gateway.geo.maxmind import MaxMindGeoProvider
from gateway.identity.config import JwtConfig, JwtIssuerConfig
from gateway.identity.jwt import JwtVerifier
from gateway.identity.keys import KeyRing, generate_key, hash_key
from gateway.identity.keys_edit import atomic_write as _atomic_write
from gateway.ipaddr import CidrSet
from gateway.stages.client_ip import ClientIpStage
from gateway.stages.geo import GeoStage
from gateway.stages.identity import IdentityStage

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "geoip"


def geo_config(tmp: Path) -> GeoIpConfig:
    if (SHARED / "GeoIP2-Country-Test.mmdb").exists():
        return GeoIpConfig(SHARED / "GeoIP2-Country-Test.mmdb", SHARED / "GeoLite2-ASN-Test.mmdb",
                           SHARED / "GeoIP2-Anonymous-IP-Test.mmdb", reload_interval=0)
    from tests.support.mmdb import write_anonymous_db, write_asn_db, write_country_db
    return GeoIpConfig(
        write_country_db(tmp / "c.mmdb", {"81.2.69.0/24": "GB", "1.0.0.0/8": "CN", "89.160.0.0/16": "SE"}),
        write_asn_db(tmp / "a.mmdb", {"1.0.0.0/24": (15169, "Google Inc.")}),
        write_anonymous_db(tmp / "n.mmdb", {"81.2.69.0/28": {"is_anonymous_vpn"}}), reload_interval=0)


def client_pool(n: int) -> list[str]:
    rng = random.Random(7)
    known = ["81.2.69.160", "89.160.20.112", "216.160.83.56", "1.0.0.1", "2.125.160.216", "81.2.69.1"]
    pool = [rng.choice(known) for _ in range(n // 2)]
    pool += [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(n - len(pool))]
    rng.shuffle(pool)
    return pool


async def run(iterations: int, use_jwt: bool, pool_size: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    key = generate_key()
    keys_file = tmp / "keys.yaml"
    _atomic_write(keys_file, "keys:\n" + "".join(
        f"  - {{id: key_{i:04d}, hash: '{hash_key(key if i == 7 else generate_key())}', account: acct{i}, "
        f"org: org{i}, tier: pro, attributes: {{org_country: US}}}}\n" for i in range(1000)))
    ring = KeyRing(keys_file, reload_interval=0)
    ring.load()
    verifier = None
    credential = key
    if use_jwt:
        priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(priv.public_key())) | {"kid": "k1"}
        (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
        issuer = JwtIssuerConfig("https://idp.example/", ("tollgate",), ("RS256",),
                                 jwks_file=tmp / "jwks.json")
        verifier = JwtVerifier(JwtConfig(issuers=(issuer,)))
        now = int(time.time())
        credential = jwt.encode({"iss": issuer.issuer, "aud": "tollgate", "sub": "a", "iat": now,
                                 "exp": now + 3600}, priv, algorithm="RS256", headers={"kid": "k1"})
    identity = IdentityStage(ring, verifier)
    client_ip = ClientIpStage(CidrSet.parse(["10.0.0.0/8", "172.16.0.0/12"]))
    provider = MaxMindGeoProvider(geo_config(tmp))
    await provider.start()
    geo = GeoStage(provider)
    pool = client_pool(pool_size)
    peer = ipaddress.ip_address("10.0.0.2")
    auth_header = ("x-api-key", credential) if not use_jwt else ("Authorization", f"Bearer {credential}")

    samples: list[int] = []
    for i in range(iterations + 2000):  # the first 2000 warm caches and are not recorded
        headers = CIMultiDictProxy(CIMultiDict([
            ("Host", "gw.example"), ("Content-Type", "application/json"), auth_header,
            ("X-Forwarded-For", f"{pool[i % len(pool)]}, 172.16.4.4"), ("User-Agent", "OpenAI/Python 1.0"),
        ]))
        view = RequestView(ApiFamily.OPENAI, "chat.completions", "/v1/chat/completions", "POST", headers)
        ctx = RequestContext(request_id=str(i), request=view)
        ctx.client.peer_ip = peer
        t0 = time.perf_counter_ns()
        if await identity(ctx) is not None:
            raise SystemExit("identity refused the benchmark credential")
        await client_ip(ctx)
        await geo(ctx)
        t1 = time.perf_counter_ns()
        if i >= 2000:
            samples.append(t1 - t0)
    samples.sort()
    p50 = samples[len(samples) // 2] / 1000
    p99 = samples[int(len(samples) * 0.99)] / 1000
    kind = "jwt (cached)" if use_jwt else "api key"
    print(f"identity[{kind}] + client_ip + geo over {len(samples)} requests, {len(pool)} clients: "
          f"p50 {p50:.1f} µs, p99 {p99:.1f} µs, mean {statistics.fmean(samples) / 1000:.1f} µs")
    await provider.close()
    if verifier is not None:
        await verifier.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50_000)
    parser.add_argument("--jwt", action="store_true", help="authenticate with a cached RS256 JWT")
    parser.add_argument("--pool", type=int, default=2000,
                        help="distinct client addresses (large pools measure geo cache misses)")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(args.iterations, args.jwt, args.pool))
    else:
        uvloop.run(run(args.iterations, args.jwt, args.pool))


if __name__ == "__main__":
    main()
