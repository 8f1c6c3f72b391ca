"""``geoip:`` config section."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.yamlsource import DURATION_HELP, Node, parse_duration

_KEYS = {"country_db", "asn_db", "anonymous_db", "cache_size", "reload_interval"}


@dataclass(frozen=True, slots=True)
class GeoIpConfig:
    """Which MaxMind databases to load; each optional.

    ``country_db`` accepts a Country, City or Enterprise database; ``asn_db`` a GeoLite2-ASN (or
    GeoIP2-ISP) database; ``anonymous_db`` a GeoIP2-Anonymous-IP database. ``reload_interval``
    is how often the files are checked for replacement (0 disables watching).
    """

    country_db: Path | None = None
    asn_db: Path | None = None
    anonymous_db: Path | None = None
    cache_size: int = 65536
    reload_interval: float = 60.0

    @property
    def enabled(self) -> bool:
        return any(p is not None for p in (self.country_db, self.asn_db, self.anonymous_db))


def parse_geoip_config(node: Node | None, base_dir: Path | None = None) -> GeoIpConfig:
    """Read ``geoip:``; relative paths resolve against ``base_dir`` (default: the folder of the
    file the node came from). Errors go to ``node.issues``; files are opened later, at start."""
    default = GeoIpConfig()
    if node is None or node.value is None:
        return default
    if not node.expect_mapping():
        return default
    if base_dir is None:  # the folder of the file this section came from
        base_dir = Path(node.mark.file).parent
    node.check_keys(_KEYS)
    paths: dict[str, Path | None] = {}
    for key in ("country_db", "asn_db", "anonymous_db"):
        text = node.get(key, str, what="a file path")
        if text is not None and not text.strip():
            node.error("expected a file path, got an empty string", key)
            text = None
        paths[key] = _resolve(text, base_dir) if text else None
    cache_size = node.get("cache_size", int, default.cache_size)
    if cache_size is None or not 0 <= cache_size <= 10_000_000:
        node.error("expected an integer from 0 (no cache) to 10000000", "cache_size")
        cache_size = default.cache_size
    interval = default.reload_interval
    raw = node.child("reload_interval")
    if raw is not None:
        parsed = parse_duration(raw.value)
        if parsed is None:
            raw.error(f"expected {DURATION_HELP}")
        else:
            interval = parsed
    return GeoIpConfig(paths["country_db"], paths["asn_db"], paths["anonymous_db"], cache_size, interval)


def _resolve(text: str, base_dir: Path | None) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path
