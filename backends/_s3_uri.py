"""What an ``s3://`` URI says: the bucket, the prefix and the options, parsed and checked.

The options are described in :mod:`ray_workflows.backends.s3`. Credentials never
belong in the URI: one that carries a user name or password is refused, and the
error shows it redacted.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

from ray_workflows.exceptions import StorageError
from ray_workflows.storage import check_key

_OPTIONS = ("endpoint_url", "region", "profile", "addressing_style", "conditional_writes")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass(frozen=True)
class S3Location:
    """What an ``s3://`` URI says, parsed and checked."""

    bucket: str
    prefix: str  # "" or ending with "/"
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    addressing_style: str = "auto"
    conditional_writes: bool = True


def parse_uri(uri: str) -> S3Location:
    """Parse an ``s3://bucket/prefix?...`` URI; :class:`StorageError` if it is not one."""

    def bad(why: str) -> StorageError:
        shown = _redacted(uri)
        return StorageError(f"Invalid S3 storage URI {shown!r}: {why}", uri=shown)

    parts = urlsplit(uri)
    if parts.scheme != "s3":
        raise bad("it must start with 's3://'")
    if "@" in parts.netloc:
        raise bad(
            "credentials do not belong in the URI; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or a profile, on every node"
        )
    if not parts.netloc or ":" in parts.netloc:
        raise bad("it must name a bucket: s3://bucket/prefix")
    if parts.fragment:
        raise bad("it has a '#' fragment")
    prefix = parts.path.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except ValueError as exc:
            raise bad(f"bad prefix: {exc}") from None
        prefix += "/"
    query: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name not in _OPTIONS:
            raise bad(f"unknown parameter {name!r}; known: {', '.join(_OPTIONS)}")
        if name in query:
            raise bad(f"parameter {name!r} is given twice")
        query[name] = value
    endpoint = query.get("endpoint_url") or None
    if endpoint is not None:
        ep = urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.hostname:
            raise bad(f"endpoint_url must be an http(s) URL, got {endpoint!r}")
        if ep.username is not None or ep.password is not None:
            raise bad("endpoint_url must not carry credentials")
    style = query.get("addressing_style") or ("path" if endpoint else "auto")
    if style not in ("path", "virtual", "auto"):
        raise bad(f"addressing_style must be path, virtual or auto, got {style!r}")
    flag = query.get("conditional_writes", "true").lower()
    if flag not in _BOOLEANS:
        raise bad(f"conditional_writes must be true or false, got {flag!r}")
    return S3Location(
        bucket=parts.netloc,
        prefix=prefix,
        endpoint_url=endpoint,
        region=query.get("region") or None,
        profile=query.get("profile") or None,
        addressing_style=style,
        conditional_writes=_BOOLEANS[flag],
    )


def _redacted(uri: str) -> str:
    # For the error about a URI that is refused: it may hold what it should not.
    parts = urlsplit(uri)
    query = [
        (name, urlsplit(value)._replace(netloc=urlsplit(value).netloc.rpartition("@")[2]).geturl())
        if name == "endpoint_url"
        else (name, value if name in _OPTIONS else "***")
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc, query=urlencode(query, safe=":/")).geturl()


__all__ = ["S3Location", "parse_uri"]
