"""A small client of the ``/v1/auth`` HTTP API, for ``qauth --server URL``.

Standard library only (urllib). Server errors come back as the matching qimem error class
with the server's message; tokens and passwords are never part of an error message.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from qimem.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    QimemError,
    StoreUnavailableError,
    ValidationError,
)

_BY_STATUS: dict[int, type[QimemError]] = {
    400: ValidationError,
    401: AuthError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    503: StoreUnavailableError,
}


class AuthClient:
    """Calls ``/v1/auth`` on ``base_url`` with an optional bearer ``token``."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30.0) -> None:
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValidationError("--server must be an http:// or https:// URL")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"<AuthClient {self.base_url}>"

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        form: bool = False,
        auth: bool = True,
    ) -> Any:
        """One request; the decoded JSON answer (None for 204)."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            if form:
                data = urllib.parse.urlencode(body).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        if auth and self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(  # noqa: S310 - the scheme is checked in __init__
            self.base_url + path, data=data, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as resp:  # noqa: S310 - same checked URL
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise _error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StoreUnavailableError(
                f"cannot reach {self.base_url}: {type(reason).__name__}"
            ) from None
        return json.loads(raw) if raw else None

    def realm_path(self, realm: str, suffix: str = "") -> str:
        return "/v1/auth/realms/" + urllib.parse.quote(realm, safe="") + suffix


def _error(exc: urllib.error.HTTPError) -> QimemError:
    try:
        detail = json.loads(exc.read())["error"]
        code, message = str(detail["code"]), str(detail["message"])
    except Exception:
        code, message = "http_error", f"the server answered HTTP {exc.code}"
    cls = _BY_STATUS.get(exc.code, QimemError)
    error = cls(message, code=code)
    return error
