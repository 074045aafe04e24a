"""The second factor of password users: TOTP (RFC 6238 through ``pyotp``), recovery codes
and the per-realm "required" policy (the :class:`~qimem.identity.core.Identity` facade's
part; the password grant calls :meth:`OtpAdministration.second_factor`).

* **Enrolment** stores a random 160-bit secret *wrapped under the root key* (AES-256-GCM,
  bound to the realm and user id: a row copied to another user does not unwrap), not yet
  active; :meth:`~OtpAdministration.otp_confirm` with a first right code activates it and
  makes 10 single-use **recovery codes**, stored only as HMAC-SHA-256 under a root-derived
  key, shown once. Activating or removing an active second factor ends the user's
  sessions (refresh tokens revoked, access tokens cut off, on every server).
  A user enrolling *his own* second factor proves his password first
  (:meth:`qimem.identity.logins.Logins.prove_password`: a stolen access token alone
  cannot lock the owner out).
* **Verification** accepts the code of the current 30-second step or of the one before or
  after (clock skew ±1 step). A code is single-use: the step it matched is claimed by one
  conditional ``UPDATE ... WHERE last_step < step``, so the same code (or an older one) is
  refused afterwards, also by a second login racing the first. A recovery code is claimed
  the same way (``used`` false → true).
* **Policy**: a realm whose ``otp_required`` is on refuses the login of a password user
  without an active second factor, after his password was verified, with the distinct
  ``otp_enrollment_required`` (an administrator enrolls him); wrong or missing codes are the
  uniform ``invalid_grant`` and count towards the lockout like a wrong password.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import pyotp
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qimem.errors import ConflictError, DecryptionError, NotFoundError, ValidationError
from qimem.identity import db as tables
from qimem.identity import lockout, realms, refresh, roles, users
from qimem.identity.authz_mac import encode_field
from qimem.identity.base import AccountCheck, IdentityBase
from qimem.identity.users import User

PERIOD = 30
DIGITS = 6
SKEW = 1  # steps accepted either side of the current one
RECOVERY_CODES = 10
_CODE = re.compile(r"^[0-9]{6}$")
_RECOVERY = re.compile(r"^[a-z2-7]{10}$")
_RECOVERY_LABEL = "otp-recovery-v1"
_POLICY_LABEL = "realm-policy-mac-v1"
#: Login refusals of the second factor that count towards the lockout.
OTP_FAILURES = ("otp_missing", "bad_otp", "otp_replay")
ENROLLMENT_REQUIRED = "otp_enrollment_required"

_ONE = sa.select(sa.literal(1).label("one")).subquery()
#: A login's second-factor read (built once): the user's OTP row and the realm's policy.
_SECOND_FACTOR = sa.select(
    tables.otp,
    tables.realm_policy.c.realm.label("policy_realm"),  # its presence (values may be NULL)
    tables.realm_policy.c.otp_required.label("policy_required"),
    tables.realm_policy.c.mac.label("policy_mac"),
).select_from(
    _ONE.outerjoin(
        tables.otp,
        sa.and_(
            tables.otp.c.user_id == sa.bindparam("sf_user"),
            tables.otp.c.realm == sa.bindparam("sf_user_realm"),
        ),
    ).outerjoin(tables.realm_policy, tables.realm_policy.c.realm == sa.bindparam("sf_realm"))
)


@dataclass(frozen=True)
class Enrollment:
    """A pending enrolment: the secret and its ``otpauth://`` URI, shown once."""

    secret: str = field(repr=False)
    uri: str = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"secret": self.secret, "otpauth_uri": self.uri, "confirmed": False}


def _context(realm: str, user_id: str) -> bytes:
    return b"qimem otp v1|" + realm.encode("utf-8") + b"|" + user_id.encode("ascii")


def _normal_recovery(code: str) -> str:
    return code.replace("-", "").replace(" ", "").lower()


def _new_recovery_code() -> str:
    raw = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(10))
    return f"{raw[:5]}-{raw[5:]}"


class OtpAdministration(IdentityBase):
    """Enrolment, confirmation, removal, the realm policy and the login-time check."""

    def _otp_key(self, label: str) -> bytes:
        cache: dict[str, bytes] = self.__dict__.setdefault("_otp_keys", {})
        if label not in cache:
            cache[label] = self._wrapper.derive_key(label)
        return cache[label]

    def _recovery_hash(self, user: User, code: str) -> str:
        message = b"".join(encode_field(f) for f in (user.realm, user.user_id, code))
        return hmac.new(self._otp_key(_RECOVERY_LABEL), message, hashlib.sha256).hexdigest()

    def _policy_mac(self, realm: str, required: bool) -> str:
        message = b"qimem realm policy v1\x00" + encode_field(realm) + encode_field(required)
        return hmac.new(self._otp_key(_POLICY_LABEL), message, hashlib.sha256).hexdigest()

    # -- the realm policy ----------------------------------------------------------------

    def otp_required(self, realm: str, conn: Connection | None = None) -> bool:
        """Whether ``realm`` requires a second factor of its password users (a row failing
        its MAC counts as required: the safe side)."""
        if conn is None:
            with self.db.begin() as own:
                return self.otp_required(realm, own)
        c = tables.realm_policy.c
        row = conn.execute(sa.select(c.otp_required, c.mac).where(c.realm == realm)).first()
        if row is None:
            return False
        return self._policy_says(realm, row.otp_required, row.mac)

    def _policy_says(self, realm: str, required: Any, mac: Any) -> bool:
        """What a realm's policy row says (there is one): a row failing its MAC, whatever
        its values (a NULL included), counts as required."""
        if not isinstance(required, bool) or not hmac.compare_digest(
            str(mac), self._policy_mac(realm, required)
        ):
            self._integrity_violation(realm, "realm_policy", f"OTP policy of {realm}")
            return True
        return bool(required)

    def set_otp_required(self, realm: str, required: bool, *, actor: str = "local") -> None:
        t = tables.realm_policy
        with self.db.begin() as conn:
            realms.require(conn, realm)
            conn.execute(sa.delete(t).where(t.c.realm == realm))
            mac = self._policy_mac(realm, required)
            conn.execute(sa.insert(t).values(realm=realm, otp_required=required, mac=mac))
            self.audit.record(realm, actor, "realm.otp_policy", realm, conn=conn, required=required)

    # -- enrolment -----------------------------------------------------------------------

    def _otp_user(self, conn: Connection, realm: str, username: str) -> User:
        realms.require(conn, realm)
        user = self._intact(users.get(conn, realm, username, for_update=True))
        if user.kind != "user":
            raise ValidationError(
                f"{username!r} is a service account; it has no second factor",
                code="not_a_user",
            )
        return user

    def _otp_row(self, conn: Connection, user: User) -> Any:
        c = tables.otp.c
        return conn.execute(
            sa.select(tables.otp).where(c.user_id == user.user_id, c.realm == user.realm)
        ).first()

    def otp_status(self, realm: str, username: str) -> dict[str, Any]:
        """``{"enrolled", "confirmed", "recovery_codes_left", "required"}`` of a user."""
        with self.db.begin() as conn:
            user = self._otp_user(conn, realm, username)
            row = self._otp_row(conn, user)
            r = tables.otp_recovery.c
            left = conn.execute(
                sa.select(sa.func.count())
                .select_from(tables.otp_recovery)
                .where(r.user_id == user.user_id, r.used.is_(False))
            ).scalar_one()
            required = self.otp_required(realm, conn)
        return {
            "username": username,
            "realm": realm,
            "enrolled": row is not None,
            "confirmed": bool(row is not None and row.confirmed),
            "recovery_codes_left": int(left) if row is not None and row.confirmed else 0,
            "required": required,
        }

    def otp_enroll(
        self, realm: str, username: str, *, actor: str = "local", check: AccountCheck | None = None
    ) -> Enrollment:
        """A new, not yet active TOTP secret (replacing a pending one).

        :raises ConflictError: ``otp_already_enrolled`` (remove the active one first).
        """
        secret = pyotp.random_base32()
        with self.db.begin() as conn:
            user = self._otp_user(conn, realm, username)
            if check is not None:
                check(conn, user)
            row = self._otp_row(conn, user)
            if row is not None and row.confirmed:
                raise ConflictError(
                    f"{username!r} already has an active second factor; disable it first",
                    code="otp_already_enrolled",
                )
            t = tables.otp
            conn.execute(sa.delete(t).where(t.c.user_id == user.user_id))
            conn.execute(
                sa.insert(t).values(
                    user_id=user.user_id,
                    realm=realm,
                    secret_wrapped=self._wrapper.wrap(
                        secret.encode("ascii"), _context(realm, user.user_id)
                    ),
                    confirmed=False,
                    last_step=0,
                    created_at=time.time(),
                )
            )
            self.audit.record(realm, actor, "otp.enroll", username, conn=conn, confirmed=False)
        uri = pyotp.TOTP(secret, digits=DIGITS, interval=PERIOD).provisioning_uri(
            name=username, issuer_name=f"qimem {realm}"
        )
        return Enrollment(secret, uri)

    def _secret(self, row: Any, user: User) -> str | None:
        try:
            return bytes(
                self._wrapper.unwrap(row.secret_wrapped, _context(user.realm, user.user_id))
            ).decode("ascii")
        except (DecryptionError, ValueError, UnicodeDecodeError):
            self._integrity_violation(user.realm, "otp", f"second factor of {user.username}")
            return None

    def _claim_code(self, conn: Connection, row: Any, user: User, code: str, now: float) -> str:
        """Check a TOTP ``code`` against ``row`` and claim its step: ``""`` on success, else
        ``bad_otp`` or ``otp_replay``. The three candidate steps are all computed."""
        secret = self._secret(row, user)
        if secret is None:
            return "bad_otp"
        totp = pyotp.TOTP(secret, digits=DIGITS, interval=PERIOD)
        current = int(now // PERIOD)
        matched = None
        for step in range(current - SKEW, current + SKEW + 1):
            if hmac.compare_digest(totp.at(step * PERIOD), code) and matched is None:
                matched = step
        if matched is None:
            return "bad_otp"
        c = tables.otp.c
        claimed = conn.execute(
            sa.update(tables.otp)
            .where(c.user_id == user.user_id, c.last_step < matched)
            .values(last_step=matched)
        ).rowcount
        return "" if claimed == 1 else "otp_replay"

    def otp_confirm(
        self,
        realm: str,
        username: str,
        code: str,
        *,
        actor: str = "local",
        check: AccountCheck | None = None,
    ) -> list[str]:
        """Activate the pending second factor with a first right code; returns the 10
        recovery codes (shown once).

        :raises ValidationError: ``invalid_otp`` (wrong or reused code; nothing changes).
        :raises NotFoundError: ``otp_not_enrolled``.
        """
        if not isinstance(code, str) or not _CODE.match(code):
            raise ValidationError("the code must be 6 digits", code="invalid_otp")
        codes = [_new_recovery_code() for _ in range(RECOVERY_CODES)]
        failed = False
        with self.db.begin() as conn:
            user = self._otp_user(conn, realm, username)
            if check is not None:
                check(conn, user)
            row = self._otp_row(conn, user)
            if row is None:
                raise NotFoundError(f"{username!r} has no second factor", code="otp_not_enrolled")
            if row.confirmed:
                raise ConflictError(
                    f"{username!r}'s second factor is already active", code="otp_already_enrolled"
                )
            if lockout.is_locked(user.locked_until) or self._claim_code(
                conn, row, user, code, time.time()
            ):
                failed = True  # a wrong code counts towards the lockout, as at login
                lockout.record_failure(conn, user.user_id, self.settings)
                self.audit.record(realm, actor, "otp.confirm", username, "failure", conn=conn)
            else:
                conn.execute(
                    sa.update(tables.otp)
                    .where(tables.otp.c.user_id == user.user_id)
                    .values(confirmed=True)
                )
                r = tables.otp_recovery
                conn.execute(sa.delete(r).where(r.c.user_id == user.user_id))
                conn.execute(
                    sa.insert(r),
                    [
                        {
                            "code_hash": self._recovery_hash(user, _normal_recovery(c)),
                            "user_id": user.user_id,
                            "realm": realm,
                            "used": False,
                        }
                        for c in codes
                    ],
                )
                self._end_sessions(conn, user)
                self.audit.record(
                    realm, actor, "otp.confirm", username, conn=conn, sessions="ended"
                )
        if failed:
            raise ValidationError("the code is wrong or was used already", code="invalid_otp")
        return codes

    def otp_disable(
        self,
        realm: str,
        username: str,
        *,
        code: str | None = None,
        actor: str = "local",
        check: AccountCheck | None = None,
    ) -> None:
        """Remove the second factor (and its recovery codes). With ``code`` (a user
        removing his own), the code must be right: a TOTP code or a recovery code.

        :raises NotFoundError: ``otp_not_enrolled``.
        :raises ValidationError: ``invalid_otp``.
        """
        failed = False
        with self.db.begin() as conn:
            user = self._otp_user(conn, realm, username)
            if check is not None:
                check(conn, user)
            row = self._otp_row(conn, user)
            if row is None:
                raise NotFoundError(f"{username!r} has no second factor", code="otp_not_enrolled")
            if code is not None and row.confirmed:
                failed = lockout.is_locked(user.locked_until) or bool(
                    self._verify(conn, row, user, code, time.time())
                )
            if failed:  # a wrong code counts towards the lockout, as at login
                lockout.record_failure(conn, user.user_id, self.settings)
                self.audit.record(realm, actor, "otp.disable", username, "failure", conn=conn)
            else:
                for t in (tables.otp, tables.otp_recovery):
                    conn.execute(sa.delete(t).where(t.c.user_id == user.user_id))
                if row.confirmed:
                    self._end_sessions(conn, user)
                self.audit.record(
                    realm,
                    actor,
                    "otp.disable",
                    username,
                    conn=conn,
                    sessions="ended" if row.confirmed else None,
                )
        if failed:
            raise ValidationError("the code is wrong or was used already", code="invalid_otp")

    def _end_sessions(self, conn: Connection, user: User) -> None:
        """End every session of ``user`` begun before this credential change (a second
        factor activated or removed), as a password change does: his refresh tokens are
        revoked and his access tokens issued until now are cut off, on every server (the
        ``user`` change notice of :meth:`~qimem.identity.tokens.Tokens.cut_off`). Keycloak
        logs other sessions out on a credential change; here the caller's session ends
        too, so the next login needs the new second factor."""
        keep = roles.grants_of(conn, self.sealer, user.realm, user.user_id)
        refresh.revoke_user(conn, user.user_id)
        self._cut_off(conn, user, keep)

    # -- at login ------------------------------------------------------------------------

    def _verify(self, conn: Connection, row: Any, user: User, code: str, now: float) -> str:
        """A TOTP code or a recovery code, claimed: ``""`` or the failure reason."""
        if _CODE.match(code):
            return self._claim_code(conn, row, user, code, now)
        normal = _normal_recovery(code)
        if not _RECOVERY.match(normal):
            return "bad_otp"
        r = tables.otp_recovery.c
        claimed = conn.execute(
            sa.update(tables.otp_recovery)
            .where(
                r.code_hash == self._recovery_hash(user, normal),
                r.user_id == user.user_id,
                r.used.is_(False),
            )
            .values(used=True)
        ).rowcount
        return "" if claimed == 1 else "bad_otp"

    def second_factor(
        self, conn: Connection, realm: str, user: User, code: Any, now: float | None = None
    ) -> str | None:
        """The login's second factor, in the login's transaction after the password was
        verified: None if it passes (or the user has none and the realm does not require
        one), else the refusal reason (:data:`OTP_FAILURES` or ``otp_enrollment_required``)."""
        now = time.time() if now is None else now
        row = conn.execute(  # the user's OTP row and the realm's policy in one read
            _SECOND_FACTOR,
            {"sf_user": user.user_id, "sf_user_realm": user.realm, "sf_realm": realm},
        ).one()
        if row.user_id is None or not row.confirmed:
            required = row.policy_realm is not None and self._policy_says(
                realm, row.policy_required, row.policy_mac
            )
            return ENROLLMENT_REQUIRED if required else None
        if not isinstance(code, str) or not code or len(code) > 64:
            return "otp_missing"
        return self._verify(conn, row, user, code.strip(), now) or None


__all__ = ["ENROLLMENT_REQUIRED", "OTP_FAILURES", "Enrollment", "OtpAdministration"]
