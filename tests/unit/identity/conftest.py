"""Identity test fixtures: keys are generated once per session and never written to disk."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.unit.identity.tokens import FakeClock, JwksServer, public_jwk


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def jwks_server(aiohttp_server: Any, rsa_key: rsa.RSAPrivateKey) -> tuple[JwksServer, TestServer]:
    """A local JWKS endpoint at ``/jwks.json`` serving ``rsa_key`` as ``k1``."""
    state = JwksServer([public_jwk(rsa_key, "k1")])
    app = web.Application()
    app.router.add_get("/jwks.json", state.handle)
    server = await aiohttp_server(app)
    return state, server
