"""``identity:`` config section: API keys file, accepted headers, JWT issuers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from gateway.yamlsource import Node, read_duration

# Asymmetric algorithms only: with a shared-secret (HS*) algorithm allowed, a verifier handed
# an RSA public key can be tricked into using it as an HMAC secret ("alg confusion").
ASYMMETRIC_ALGORITHMS = frozenset({
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "ES256K", "EdDSA",
})
REQUIRED_CLAIMS_DEFAULT = ("exp", "iat", "iss", "aud")
CREDENTIAL_HEADERS = ("authorization", "x-api-key")


@dataclass(frozen=True, slots=True)
class ClaimMapping:
    """Where principal fields come from in the verified claims; a path is a tuple of keys
    into nested objects (claim names may contain dots, e.g. URL-style namespaced claims)."""

    account: tuple[str, ...] = ("sub",)
    org: tuple[str, ...] | None = None
    tier: tuple[str, ...] | None = None
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class JwtIssuerConfig:
    """One trusted identity provider. ``issuer`` is matched exactly against ``iss``."""

    issuer: str
    audience: tuple[str, ...]
    algorithms: tuple[str, ...]
    jwks_file: Path | None = None
    jwks_url: str | None = None
    required_claims: tuple[str, ...] = REQUIRED_CLAIMS_DEFAULT
    leeway: float = 30.0
    claims: ClaimMapping = field(default_factory=ClaimMapping)
    default_tier: str | None = None
    # Put in front of the account claim: issuers (and the keys file) are separate namespaces, so
    # one identity provider cannot assert another's accounts (see _check_namespaces).
    account_prefix: str = ""
    jwks_cache_ttl: float = 600.0  # refresh the key set this often (on a timer, ±10 %, traffic or not)
    jwks_refresh_cooldown: float = 30.0  # at most one fetch per cooldown, whatever the traffic
    jwks_max_stale: float = 86400.0  # keep serving last good keys this long when fetches fail
    jwks_timeout: float = 5.0
    jwks_max_bytes: int = 1 << 20
    # Accepted JOSE ``typ`` header values (e.g. ``at+jwt``, RFC 9068 access tokens), as written;
    # None: no check. Keeps an ID token or another JWT the provider signs from passing as an
    # access token.
    token_types: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class JwtConfig:
    issuers: tuple[JwtIssuerConfig, ...] = ()
    max_token_bytes: int = 8192
    cache_size: int = 10000
    cache_max_ttl: float = 3600.0  # a verified token is re-verified at least this often


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """``anonymous: allow`` lets requests without credentials through unauthenticated (a
    presented but invalid credential is still refused)."""

    anonymous: bool = False
    headers: tuple[str, ...] = CREDENTIAL_HEADERS
    keys_file: Path | None = None
    keys_reload_interval: float = 2.0
    jwt: JwtConfig | None = None


def parse_identity_config(node: Node | None, base_dir: Path | None = None) -> IdentityConfig:
    """Read ``identity:``. Errors go to ``node.issues``; relative paths resolve against ``base_dir``
    (default: the folder of the file the node came from)."""
    default = IdentityConfig()
    if node is None or node.value is None or not node.expect_mapping():
        return default
    if base_dir is None:  # the folder of the file this section came from
        base_dir = Path(node.mark.file).parent
    node.check_keys({"anonymous", "headers", "keys_file", "keys_reload_interval", "jwt"})
    anonymous = node.get("anonymous", str, "deny", what="'allow' or 'deny'")
    if anonymous not in ("allow", "deny"):
        node.error("expected 'allow' or 'deny'", "anonymous")
    headers = _str_list(node.child("headers"), CREDENTIAL_HEADERS, lower=True)
    unsupported = [h for h in headers if h not in CREDENTIAL_HEADERS]
    if unsupported:
        node.error(f"unsupported header(s) {', '.join(unsupported)}; expected any of: "
                   f"{', '.join(CREDENTIAL_HEADERS)}", "headers")
        headers = tuple(h for h in headers if h in CREDENTIAL_HEADERS)
    keys_file = node.get("keys_file", str, what="a file path")
    jwt_node = node.child("jwt")
    return IdentityConfig(
        anonymous=anonymous == "allow",
        headers=headers or CREDENTIAL_HEADERS,
        keys_file=_path(keys_file, base_dir) if keys_file else None,
        keys_reload_interval=read_duration(node, "keys_reload_interval", default.keys_reload_interval),
        jwt=_parse_jwt(jwt_node, base_dir, keys_file is not None) if jwt_node is not None else None,
    )


def _parse_jwt(node: Node, base_dir: Path | None, keys_file: bool) -> JwtConfig | None:
    if not node.expect_mapping():
        return None
    node.check_keys({"issuers", "max_token_bytes", "cache_size", "cache_max_ttl"}, required=("issuers",))
    default = JwtConfig()
    issuers: list[JwtIssuerConfig] = []
    issuer_nodes: list[Node] = []
    seen: set[str] = set()
    inode = node.child("issuers")
    if inode is not None and inode.expect_list("a list of issuers"):
        for item in inode.elements():
            parsed = _parse_issuer(item, base_dir)
            if parsed is None:
                continue
            if parsed.issuer in seen:
                item.error(f"issuer '{parsed.issuer}' is listed twice")
            seen.add(parsed.issuer)
            issuers.append(parsed)
            issuer_nodes.append(item)
    _check_namespaces(issuers, issuer_nodes, keys_file)
    return JwtConfig(
        issuers=tuple(issuers),
        max_token_bytes=_int(node, "max_token_bytes", default.max_token_bytes, 256, 65536),
        cache_size=_int(node, "cache_size", default.cache_size, 0, 10_000_000),
        cache_max_ttl=read_duration(node, "cache_max_ttl", default.cache_max_ttl),
    )


_ISSUER_KEYS = {
    "issuer", "audience", "algorithms", "jwks_file", "jwks_url", "required_claims", "leeway", "claims",
    "default_tier", "jwks_cache_ttl", "jwks_refresh_cooldown", "jwks_max_stale", "jwks_timeout",
    "jwks_max_bytes", "account_prefix", "token_types",
}
# JWKS over plain HTTP lets anyone on the path swap the signing keys; loopback stays allowed (a
# sidecar, tests).
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _parse_issuer(node: Node, base_dir: Path | None) -> JwtIssuerConfig | None:
    if not node.expect_mapping("an issuer mapping"):
        return None
    node.check_keys(_ISSUER_KEYS, required=("issuer", "audience", "algorithms"))
    d = JwtIssuerConfig("", (), ())
    issuer = node.get("issuer", str, what="the exact 'iss' value")
    audience = _str_list(node.child("audience"), (), single_ok=True)
    algorithms = _str_list(node.child("algorithms"), ())
    for alg in algorithms:
        if alg not in ASYMMETRIC_ALGORITHMS:
            node.error(f"algorithm '{alg}' is not allowed; use one of: "
                       f"{', '.join(sorted(ASYMMETRIC_ALGORITHMS))}", "algorithms")
    jwks_file, jwks_url = node.get("jwks_file", str), node.get("jwks_url", str)
    if (jwks_file is None) == (jwks_url is None):
        node.error("exactly one of 'jwks_file' or 'jwks_url' is required")
    if jwks_url is not None and not _acceptable_jwks_url(jwks_url):
        node.error("expected an https:// URL (plain http:// only to a loopback host: anyone on the "
                   "path could replace the signing keys)", "jwks_url")
    required = _str_list(node.child("required_claims"), REQUIRED_CLAIMS_DEFAULT)
    if node.has("audience") and not audience:
        node.error("expected at least one audience", "audience")
    if node.has("algorithms") and not algorithms:
        node.error("expected at least one algorithm", "algorithms")
    parsed = JwtIssuerConfig(
        issuer=issuer or "", audience=audience, algorithms=algorithms,
        jwks_file=_path(jwks_file, base_dir) if jwks_file else None, jwks_url=jwks_url,
        required_claims=required, leeway=read_duration(node, "leeway", d.leeway),
        claims=_parse_claims(node.child("claims")),
        default_tier=node.get("default_tier", str),
        jwks_cache_ttl=read_duration(node, "jwks_cache_ttl", d.jwks_cache_ttl),
        # A zero cooldown would let every unknown-kid token fetch the key set (a refetch storm
        # against us and the identity provider); a zero timeout means none at all in aiohttp.
        jwks_refresh_cooldown=read_duration(node, "jwks_refresh_cooldown", d.jwks_refresh_cooldown,
                                            low=1.0, high=3600.0),
        jwks_max_stale=read_duration(node, "jwks_max_stale", d.jwks_max_stale),
        jwks_timeout=read_duration(node, "jwks_timeout", d.jwks_timeout, low=0.1, high=60.0),
        jwks_max_bytes=_int(node, "jwks_max_bytes", d.jwks_max_bytes, 1024, 16 << 20),
        account_prefix=node.get("account_prefix", str, "", what="a text put in front of the account") or "",
        token_types=_token_types(node),
    )
    if parsed.jwks_max_stale <= parsed.jwks_cache_ttl * 1.1:
        # The timer refreshes every ttl ±10%: a key set allowed to go stale sooner would fail
        # closed between two refreshes with nothing wrong at the identity provider.
        longest_gap = parsed.jwks_cache_ttl * 1.1
        node.error(f"expected jwks_max_stale longer than jwks_cache_ttl + 10% ({longest_gap:g}s), "
                   f"got {parsed.jwks_max_stale:g}s",
                   "jwks_max_stale" if node.has("jwks_max_stale") else "jwks_cache_ttl")
    return parsed if issuer and audience and algorithms else None  # errors already reported


def _token_types(issuer: Node) -> tuple[str, ...] | None:
    """``token_types``: a non-empty list of non-empty strings, or absent (no ``typ`` check).
    Stricter than the other lists: an empty entry or an empty list is refused, not skipped,
    since either would most likely leave a check the operator meant to have silently off or
    refuse every token."""
    node = issuer.child("token_types")
    if node is None:
        return None
    if not node.expect_list("a list of token types (JOSE 'typ' values such as at+jwt)"):
        return None
    out: list[str] = []
    for item in node.elements():
        value = item.as_type(str, what="a token type (JOSE 'typ' value such as at+jwt)")
        if value is None:
            continue
        if not value.strip():
            item.error("expected a token type (JOSE 'typ' value such as at+jwt), got "
                       + ("an empty string" if not value else "only spaces"))
            continue
        out.append(value)
    if not node.value:
        issuer.error("expected at least one token type; leave token_types out to accept any 'typ'",
                     "token_types")
    return tuple(out) or None


def _acceptable_jwks_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises on a malformed port
    except ValueError:
        return False
    # No user info: in http://127.0.0.1:80@evil.example/ the host is evil.example.
    if not host or "@" in parts.netloc:
        return False
    if url.startswith("https://"):
        return True
    return url.startswith("http://") and host in _LOOPBACK_HOSTS


def _check_namespaces(issuers: list[JwtIssuerConfig], nodes: list[Node], keys_file: bool) -> None:
    """With more than one source of accounts (several issuers, or issuers beside the keys file),
    every issuer must say where its accounts live: otherwise a token from one provider whose
    ``sub`` equals another's account would *be* that account (its quotas, friction, allow-lists).
    Distinct prefixes must not be prefixes of each other ("a:" and "a:b:" would overlap); equal
    prefixes are a deliberate choice to share accounts. "" is the home namespace (the keys file's,
    and issuers the operator trusts as much): its accounts are the operator's to name."""
    if len(issuers) + keys_file < 2:
        return
    for issuer, inode in zip(issuers, nodes, strict=True):
        if not inode.has("account_prefix"):
            inode.error(f"issuer '{issuer.issuer}' shares account names with "
                        f"{'the keys file and ' if keys_file else ''}other issuers: set account_prefix "
                        "(e.g. 'partner:'), or account_prefix: '' to share them deliberately")
    prefixes = sorted({i.account_prefix for i in issuers} - {""})
    for issuer, inode in zip(issuers, nodes, strict=True):
        mine = issuer.account_prefix
        clash = next((p for p in prefixes if p != mine and mine.startswith(p)), None)
        if clash is not None:
            inode.error(f"account_prefix '{mine}' overlaps account_prefix '{clash}': an account under "
                        "one would be readable as an account under the other; use prefixes that do "
                        "not start with one another, e.g. ending in ':'", "account_prefix")

def _parse_claims(node: Node | None) -> ClaimMapping:
    if node is None or not node.expect_mapping():
        return ClaimMapping()
    node.check_keys({"account", "org", "tier", "attributes"})
    attrs: list[tuple[str, tuple[str, ...]]] = []
    anode = node.child("attributes")
    if anode is not None and anode.expect_mapping("a mapping of attribute name → claim"):
        for name, child in anode.items():
            path = _claim_path(child)
            if path:
                attrs.append((name, path))
    account = _claim_path(node.child("account")) if node.has("account") else ("sub",)
    return ClaimMapping(
        account=account or ("sub",),
        org=_claim_path(node.child("org")),
        tier=_claim_path(node.child("tier")),
        attributes=tuple(attrs),
    )


def _claim_path(node: Node | None) -> tuple[str, ...] | None:
    """A claim name (``org_id``) or a list of keys into nested claims (``[realm, org]``)."""
    if node is None:
        return None
    if isinstance(node.value, str) and node.value:
        return (node.value,)
    if node.is_list and node.value and all(isinstance(v, str) and v for v in node.value):
        return tuple(node.value)
    node.error("expected a claim name or a list of claim names (a path into nested claims)")
    return None


def _str_list(node: Node | None, default: tuple[str, ...], *, single_ok: bool = False,
              lower: bool = False) -> tuple[str, ...]:
    if node is None:
        return default
    if single_ok and isinstance(node.value, str):
        return (node.value,)
    if not node.expect_list("a list of strings"):
        return default
    out = []
    for item in node.elements():
        value = item.as_type(str)
        if value:
            out.append(value.lower() if lower else value)
    return tuple(out)



def _int(node: Node, key: str, default: int, low: int, high: int) -> int:
    value = node.get(key, int, default)
    if value is None or not low <= value <= high:
        node.error(f"expected an integer from {low} to {high}", key)
        return default
    return value


def _path(text: str, base_dir: Path | None) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path
