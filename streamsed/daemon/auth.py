"""Bearer tokens: who may use which endpoint (pure functions over a request's path, headers, query).

With ``[server] auth_tokens`` (or ``auth_tokens_file``) set, every websocket and HTTP endpoint
needs one of the tokens, as ``Authorization: Bearer <token>`` or ``?token=<token>`` (browsers cannot
set headers on websockets, so the pages pass on the ``?token=`` of their own URL). Exempt:

* ``/healthz`` and ``/readyz``, for load balancers and systemd;
* the static page files (HTML, JS, CSS, icon): they hold no stream names and no captions, and the
  data they show comes through the endpoints below, which do check;
* with ``public_captions = true``: captions for anyone (listeners, exports, the stream list);
  ingest still needs a token.

Tokens are compared in constant time (``hmac.compare_digest``), against every configured token.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["load_tokens", "presented_token", "needs_token", "token_ok", "PUBLIC_PATHS"]

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
CAPTION_PATHS = frozenset({"/v1/captions", "/v1/streams"})  # plus the exports under /v1/streams/


def load_tokens(tokens: Sequence[str], tokens_file: str = "") -> list[str]:
    """The configured tokens: the list, plus one per non-blank line of ``tokens_file`` (``#`` comments).
    Raises OSError when the file cannot be read."""
    found = [t.strip() for t in tokens if t.strip()]
    if tokens_file:
        for line in Path(tokens_file).expanduser().read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def presented_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The token a request carries: the Authorization header's bearer token, else ``?token=``."""
    authorization = headers.get("Authorization") or ""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return query.get("token") or None


def needs_token(path: str, *, static_pages: frozenset[str] | set[str], public_captions: bool) -> bool:
    """Whether ``path`` needs a token once tokens are configured."""
    if path in PUBLIC_PATHS or path in static_pages:
        return False
    if public_captions and (path in CAPTION_PATHS or path.startswith("/v1/streams/")):
        return False
    return True


def token_ok(tokens: Sequence[str], presented: str | None) -> bool:
    """Constant-time membership: every token is compared, whatever matched before."""
    if presented is None:
        return False
    given = presented.encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given, token.encode())
    return matched
