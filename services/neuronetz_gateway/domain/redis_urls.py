"""What a ``redis+sentinel://`` URL names (pure parsing; the client is in adapters).

``redis+sentinel://[user:password@]h1:p1,h2:p2/<master>[/<db>]``; a sentinel
without a port is on 26379; ``rediss+sentinel://`` speaks TLS to the
sentinels and to the master. The credentials are the master's (and the
sentinels', when they ask for them).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

__all__ = ["SENTINEL_SCHEMES", "SentinelTarget", "parse_sentinel_url"]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    tls: bool
    username: str | None
    password: str | None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """``redis+sentinel://[user:pw@]h1:p1,h2:p2/<master>/<db>``; ValueError when malformed."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a sentinel URL scheme: {parts.scheme!r}")
    netloc = parts.netloc
    username = password = None
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        user, _, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if secret else None
    sentinels: list[tuple[str, int]] = []
    for address in netloc.split(","):
        host, sep, port = address.strip().rpartition(":")
        if not sep:
            host, port = address.strip(), "26379"
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise ValueError("sentinel URL: each sentinel is host:port")
        sentinels.append((host, int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("sentinel URL: the path is /<master name>[/<db>]")
    db = path[1] if len(path) == 2 else "0"
    if not db.isdigit():
        raise ValueError("sentinel URL: the database is a number")
    return SentinelTarget(
        sentinels=tuple(sentinels),
        master=unquote(path[0]),
        db=int(db),
        tls=parts.scheme == "rediss+sentinel",
        username=username,
        password=password,
    )
