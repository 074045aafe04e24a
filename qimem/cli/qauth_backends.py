"""What ``qauth`` commands run on: the local store (:class:`LocalBackend`, full control) or
a qimem server's ``/v1/auth`` API (:class:`RemoteBackend`, with the caller's token).

Both return JSON-ready data, so each command prints the same thing either way.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any

from qimem.errors import AuthError, ValidationError

if TYPE_CHECKING:
    from qimem.app import AppContext
    from qimem.http_client import HttpClient
    from qimem.identity.password_policy import PasswordPolicy

__all__ = ["Backend", "LocalBackend", "RemoteBackend"]


class Backend:
    """The operations behind the commands, returning JSON-ready data."""

    def password_policy(self, realm: str) -> PasswordPolicy:
        """The realm's password policy, for generating passwords (a server checks its own)."""
        from qimem.identity.password_policy import PasswordPolicy

        return PasswordPolicy()

    def create_realm(self, name: str) -> dict[str, Any]:
        raise NotImplementedError

    def list_realms(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def delete_realm(self, name: str) -> None:
        raise NotImplementedError

    def add_user(
        self, realm: str, username: str, password: str, roles: list[str]
    ) -> dict[str, Any]:
        raise NotImplementedError

    def list_users(self, realm: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def set_password(self, realm: str, username: str, password: str) -> None:
        raise NotImplementedError

    def set_enabled(self, realm: str, username: str, enabled: bool) -> None:
        raise NotImplementedError

    def create_role(
        self, realm: str, name: str, perms: list[str], description: str
    ) -> dict[str, Any]:
        raise NotImplementedError

    def list_roles(self, realm: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def grant(self, realm: str, username: str, role: str, scope: str | None) -> bool:
        raise NotImplementedError

    def revoke(self, realm: str, username: str, role: str, scope: str | None) -> None:
        raise NotImplementedError

    def create_client(self, realm: str, client_id: str, roles: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def token(
        self, realm: str, username: str, password: str | None, otp: str | None = None
    ) -> dict[str, Any]:
        raise NotImplementedError

    def rotate_signing_key(self, realm: str) -> str:
        raise NotImplementedError

    def realm_providers(self, realm: str) -> dict[str, Any]:
        raise NotImplementedError

    def set_realm_providers(self, realm: str, document: Any) -> dict[str, Any]:
        raise NotImplementedError

    def add_external_user(self, realm: str, username: str, provider: str) -> dict[str, Any]:
        raise NotImplementedError

    def audit(
        self, realm: str, limit: int, action: str | None, actor: str | None
    ) -> list[dict[str, Any]]:
        raise NotImplementedError


class LocalBackend(Backend):
    """The local store (config + root key): full control."""

    def __init__(self, app: AppContext) -> None:
        from qimem.services import identity  # imported on use: keeps --help fast

        self.app = app
        self.ids = identity

    def password_policy(self, realm: str) -> PasswordPolicy:
        return self.ids.password_policy(self.app, realm)

    def create_realm(self, name: str) -> dict[str, Any]:
        return self.ids.create_realm(self.app, name).to_dict()

    def list_realms(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.ids.list_realms(self.app)]

    def delete_realm(self, name: str) -> None:
        self.ids.delete_realm(self.app, name)

    def add_user(
        self, realm: str, username: str, password: str, roles: list[str]
    ) -> dict[str, Any]:
        return self.ids.add_user(self.app, realm, username, password, roles).to_dict()

    def list_users(self, realm: str) -> list[dict[str, Any]]:
        return [u.to_dict() for u in self.ids.list_users(self.app, realm)]

    def set_password(self, realm: str, username: str, password: str) -> None:
        self.ids.set_password(self.app, realm, username, password)

    def set_enabled(self, realm: str, username: str, enabled: bool) -> None:
        self.ids.set_user_enabled(self.app, realm, username, enabled)

    def create_role(
        self, realm: str, name: str, perms: list[str], description: str
    ) -> dict[str, Any]:
        return self.ids.create_role(self.app, realm, name, perms, description).to_dict()

    def list_roles(self, realm: str) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.ids.list_roles(self.app, realm)]

    def grant(self, realm: str, username: str, role: str, scope: str | None) -> bool:
        return self.ids.grant_role(self.app, realm, username, role, scope)

    def revoke(self, realm: str, username: str, role: str, scope: str | None) -> None:
        self.ids.revoke_role(self.app, realm, username, role, scope)

    def create_client(self, realm: str, client_id: str, roles: list[str]) -> dict[str, Any]:
        made = self.ids.create_client(self.app, realm, client_id, roles)
        return {**made.user.to_dict(), "client_id": client_id, "client_secret": made.secret}

    def token(
        self, realm: str, username: str, password: str | None, otp: str | None = None
    ) -> dict[str, Any]:
        if password is not None:
            params = {"grant_type": "password", "username": username, "password": password}
            if otp:
                params["otp"] = otp
            return self.ids.token(self.app, realm, params).to_dict()
        try:
            return self.ids.mint_token(self.app, realm, username).to_dict()
        except ValidationError:
            # A disabled user gets no token: an authentication failure (exit 4, like a
            # password login), not bad input.
            if self._disabled(realm, username):
                raise AuthError(f"user {username!r} is disabled", code="user_disabled") from None
            raise

    def _disabled(self, realm: str, username: str) -> bool:
        users = self.ids.list_users(self.app, realm)
        return any(u.username == username and not u.enabled for u in users)

    def rotate_signing_key(self, realm: str) -> str:
        return self.ids.rotate_signing_key(self.app, realm)

    def realm_providers(self, realm: str) -> dict[str, Any]:
        from qimem.services import auth_providers

        return auth_providers.realm_providers(self.app, realm).to_dict()

    def set_realm_providers(self, realm: str, document: Any) -> dict[str, Any]:
        from qimem.services import auth_providers

        return auth_providers.set_realm_providers(self.app, realm, document).to_dict()

    def add_external_user(self, realm: str, username: str, provider: str) -> dict[str, Any]:
        from qimem.services import auth_providers

        made = auth_providers.add_external_user(self.app, realm, username, provider)
        return {**made.to_dict(), "provider": provider}

    def audit(
        self, realm: str, limit: int, action: str | None, actor: str | None
    ) -> list[dict[str, Any]]:
        found = self.ids.audit_events(self.app, realm, limit=limit, action=action, actor=actor)
        return [r.to_dict() for r in found]


class RemoteBackend(Backend):
    """A qimem server's /v1/auth API, with the caller's bearer token."""

    def __init__(self, client: HttpClient) -> None:
        self.client = client

    def _path(self, realm: str, suffix: str = "") -> str:
        return "/v1/auth/realms/" + urllib.parse.quote(realm, safe="") + suffix

    def create_realm(self, name: str) -> dict[str, Any]:
        return self.client.request("POST", "/v1/auth/realms", {"name": name})

    def list_realms(self) -> list[dict[str, Any]]:
        return self.client.request("GET", "/v1/auth/realms")["realms"]

    def delete_realm(self, name: str) -> None:
        self.client.request("DELETE", self._path(name))

    def add_user(
        self, realm: str, username: str, password: str, roles: list[str]
    ) -> dict[str, Any]:
        body = {"username": username, "password": password, "roles": roles}
        return self.client.request("POST", self._path(realm, "/users"), body)

    def list_users(self, realm: str) -> list[dict[str, Any]]:
        return self.client.request("GET", self._path(realm, "/users"))["users"]

    def _user(self, realm: str, username: str) -> str:
        return self._path(realm, "/users/" + urllib.parse.quote(username, safe=""))

    def set_password(self, realm: str, username: str, password: str) -> None:
        self.client.request("PATCH", self._user(realm, username), {"password": password})

    def set_enabled(self, realm: str, username: str, enabled: bool) -> None:
        self.client.request("PATCH", self._user(realm, username), {"enabled": enabled})

    def create_role(
        self, realm: str, name: str, perms: list[str], description: str
    ) -> dict[str, Any]:
        body = {"name": name, "permissions": perms, "description": description}
        return self.client.request("POST", self._path(realm, "/roles"), body)

    def list_roles(self, realm: str) -> list[dict[str, Any]]:
        return self.client.request("GET", self._path(realm, "/roles"))["roles"]

    def grant(self, realm: str, username: str, role: str, scope: str | None) -> bool:
        body = {"role": role, "scope": scope}
        path = self._user(realm, username) + "/roles"
        return bool(self.client.request("POST", path, body)["added"])

    def revoke(self, realm: str, username: str, role: str, scope: str | None) -> None:
        body = {"role": role, "scope": scope}
        self.client.request("DELETE", self._user(realm, username) + "/roles", body)

    def create_client(self, realm: str, client_id: str, roles: list[str]) -> dict[str, Any]:
        body = {"client_id": client_id, "roles": roles}
        return self.client.request("POST", self._path(realm, "/clients"), body)

    def token(
        self, realm: str, username: str, password: str | None, otp: str | None = None
    ) -> dict[str, Any]:
        if password is None:
            raise ValidationError("with --server, qauth token needs --password-stdin")
        params = {"grant_type": "password", "username": username, "password": password}
        if otp:
            params["otp"] = otp
        return self.client.request(
            "POST", self._path(realm, "/token"), params, form=True, auth=False
        )

    def rotate_signing_key(self, realm: str) -> str:
        return self.client.request("POST", self._path(realm, "/signing-key/rotate"))["kid"]

    def realm_providers(self, realm: str) -> dict[str, Any]:
        return self.client.request("GET", self._path(realm, "/providers"))

    def set_realm_providers(self, realm: str, document: Any) -> dict[str, Any]:
        if document is None:
            return self.client.request("DELETE", self._path(realm, "/providers"))
        return self.client.request("PUT", self._path(realm, "/providers"), document)

    def add_external_user(self, realm: str, username: str, provider: str) -> dict[str, Any]:
        body = {"username": username, "provider": provider}
        return self.client.request("POST", self._path(realm, "/providers/users"), body)

    def audit(
        self, realm: str, limit: int, action: str | None, actor: str | None
    ) -> list[dict[str, Any]]:
        query = {"limit": str(limit)}
        if action:
            query["action"] = action
        if actor:
            query["actor"] = actor
        path = self._path(realm, "/audit?" + urllib.parse.urlencode(query))
        return self.client.request("GET", path)["events"]
