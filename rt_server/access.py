"""Who may use the server: API keys and the browser Origin allow-list. Pure: headers in, a verdict out.

Keys are given as `Authorization: Bearer KEY` (RFC 6750 section 2.1) or, for browsers, which cannot set headers
on a WebSocket, as the query parameter `api_key` (RFC 6750 section 2.3). They are compared in constant time:
the SHA-256 digests of the presented key and of every configured key are compared with `hmac.compare_digest`,
all of them, so neither a key's length nor which key matched shows in the timing.

Origins: a browser names the page that opened a WebSocket in `Origin` (RFC 6455 section 10.2); other clients
send none. With an allow-list configured, a WebSocket whose `Origin` is not on it is refused; one without an
`Origin` (not a browser) is not, since the Origin check protects browsers, and keys protect the server.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl

from rt_server.protocol import ErrorCode

API_KEY_PARAM: Final = "api_key"
# Query strings are parsed only this far: the key is one parameter, and a flood of them is refused unparsed.
MAX_QUERY_FIELDS: Final = 32


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: the HTTP status before an upgrade, and the protocol's error code after one."""

    status: int  # 401 (no valid key) or 403 (origin not allowed)
    code: ErrorCode
    message: str


UNAUTHORIZED: Final = Refusal(401, ErrorCode.UNAUTHORIZED, "a valid API key is required")
FORBIDDEN_ORIGIN: Final = Refusal(403, ErrorCode.FORBIDDEN_ORIGIN, "this Origin may not open a session")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """A set of keys that answers "is this one of them?" in time independent of the keys."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(_digest(k) for k in keys)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def matches(self, presented: str) -> bool:
        digest = _digest(presented)
        found = False
        for known in self._digests:  # every key is compared: no early exit
            found |= hmac.compare_digest(known, digest)
        return found


def presented_key(headers: Mapping[str, str], query_string: str) -> str | None:
    """The key from `Authorization: Bearer` (the scheme is case-insensitive), else from `?api_key=`."""
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if API_KEY_PARAM not in query_string:
        return None
    try:
        fields = parse_qsl(query_string, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:  # too many fields
        return None
    for name, value in fields:
        if name == API_KEY_PARAM:
            return value
    return None


@dataclass(frozen=True)
class AccessPolicy:
    """The rules for one server. `public_paths` are served to anyone (liveness, the static web client)."""

    keys: ApiKeys
    allowed_origins: frozenset[str]  # empty: any Origin
    public_paths: frozenset[str]

    def check(self, path: str, headers: Mapping[str, str], query_string: str, *, websocket: bool) -> Refusal | None:
        """None when the request may go on; else why not. `headers` have lower-case names."""
        if websocket and self.allowed_origins:
            origin = headers.get("origin")
            if origin is not None and origin.lower() not in self.allowed_origins:
                return FORBIDDEN_ORIGIN
        if not self.keys or path in self.public_paths:
            return None
        key = presented_key(headers, query_string)
        if key is None or not self.keys.matches(key):
            return UNAUTHORIZED
        return None
