"""Cache invalidation across servers: what a change notice says, how it is sent, who acts.

Servers sharing one store cache key versions (:mod:`qimem.keycache`), verified tokens, the
revocation list and signing keys (:mod:`qimem.identity`). A change made through one server
must reach the others' caches. Two ways, both always on where the store allows:

* **Polling** (every store): the key cache checks the store's
  :meth:`~qimem.keystore.KeyStore.rotation_marker` at most every ``cache.revalidate_seconds``
  and drops every entry when it changed; the revocation list and token cut-offs are re-read
  every ``revocation_refresh_seconds``; signing keys and roles every ``cache_seconds``.
* **Push** (a backend with a change feed, see :meth:`qimem.backend.Backend.change_feed`;
  PostgreSQL's ``LISTEN/NOTIFY``): the transaction making a change sends a
  :class:`Change` notice (:func:`notify`), delivered when it commits; every server's feed
  hands it to its :class:`Invalidator`, which drops exactly the affected entries. While the
  feed is connected the key cache does not poll (entries live their TTL); when it drops,
  polling takes over until it is back, and on reconnecting the marker read right after
  subscribing is compared with the last one known, so a change missed meanwhile drops
  everything once.

A notice names things, never secrets: a kind, a realm, an identifier (a lineage id, a token
id ``jti``, a user id) and, for key changes, the store's new rotation marker. It is a hint,
never data (anyone who may connect to the database can ``NOTIFY``): it can only make a
server drop cache entries (reloaded on next use) or refuse a token until the row it names
is re-read from the database, which decides; it never admits anything. A notice that does
not parse is answered with a safe full revalidation.
"""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from qimem.lazylog import get_logger

if TYPE_CHECKING:
    from qimem.app import AppContext

log = get_logger(__name__)

#: The PostgreSQL notification channel.
CHANNEL = "qimem_invalidate"
#: Notices longer than this are not parsed (PostgreSQL allows 8000 bytes; ours are ~150).
MAX_PAYLOAD = 512

LINEAGE = "lineage"  # a key lineage's versions, states or policy changed; ident: lineage id
TOKEN = "token"  # noqa: S105 (a kind's name)  an access token was revoked; ident: its jti
USER = "user"  # a user's tokens were cut off (disable, password, role revoke); ident: user
# id (user ids are unique across realms: the realm may be "")
REALM = "realm"  # a realm was deleted (its tokens and keys); ident: ""
# A lineage was rotated: a new active version; the old ones' material, states for
# decryption and policy are unchanged, so only what encrypts by the lineage is dropped.
ROTATION = "rotation"
KINDS = frozenset({LINEAGE, ROTATION, TOKEN, USER, REALM})

_MAX_FIELD = 64


@dataclass(frozen=True)
class Change:
    """One change notice: ``kind`` (one of :data:`KINDS`), ``realm``, ``ident`` (what the
    kind names) and ``marker`` (a key change's new rotation marker, else ``""``)."""

    kind: str
    realm: str
    ident: str = ""
    marker: str = ""

    def encode(self) -> str:
        """The compact JSON payload (identifiers only; well under :data:`MAX_PAYLOAD`)."""
        body: dict[str, Any] = {"v": 1, "k": self.kind, "r": self.realm}
        if self.ident:
            body["i"] = self.ident
        if self.marker:
            body["m"] = self.marker
        return json.dumps(body, separators=(",", ":"))


def parse(payload: object) -> Change | None:
    """The notice in ``payload``, or None if it is not one this version sends (too long,
    not JSON, an unknown kind or version, fields of the wrong type or size)."""
    if not isinstance(payload, str) or len(payload) > MAX_PAYLOAD:
        return None
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict) or body.get("v") != 1 or body.get("k") not in KINDS:
        return None
    fields = [body.get("r"), body.get("i", ""), body.get("m", "")]
    if not all(isinstance(f, str) and len(f) <= _MAX_FIELD for f in fields):
        return None
    realm, ident, marker = fields
    kind = body["k"]
    if (not realm and kind != USER) or (kind != REALM and not ident):
        return None
    return Change(kind, realm, ident, marker)


def notify(conn: Any, change: Change) -> None:
    """Send ``change`` when ``conn``'s transaction commits (nothing if it rolls back).

    ``conn`` is a SQLAlchemy connection inside the transaction making the change. On
    PostgreSQL this is ``pg_notify``; other databases have no push and poll instead.
    """
    if conn.dialect.name != "postgresql":
        return
    import sqlalchemy as sa

    conn.execute(sa.text("SELECT pg_notify(:channel, :payload)"), notice(change))


def notice(change: Change) -> dict[str, str]:
    """The ``:channel`` and ``:payload`` parameters of a ``pg_notify`` sending ``change``
    (for a statement that sends it along with other work, as :func:`notify` does alone)."""
    return {"channel": CHANNEL, "payload": change.encode()}


class ChangeSink(Protocol):
    """What a change feed reports to (the :class:`Invalidator`); called on the feed's thread."""

    def connected(self, marker: object) -> None:
        """Notices flow from now on; ``marker``: the store's rotation marker read after
        subscribing (every change committed later is delivered)."""
        ...

    def disconnected(self) -> None:
        """Notices stopped (connection lost, or the feed stopped): poll until reconnected."""
        ...

    def received(self, payload: str) -> None:
        """A notice's raw payload (untrusted: see :func:`parse`)."""
        ...


class ChangeFeed(Protocol):
    """A backend's push of change notices (optional; see docs/plugins.md)."""

    def start(self, sink: ChangeSink) -> None:
        """Start delivering to ``sink`` from a thread of its own; return at once."""
        ...

    def stop(self) -> None:
        """Stop delivering (``sink.disconnected()`` is called if it was connected)."""
        ...


class Invalidator:
    """Applies change notices to one application context's caches."""

    def __init__(self, app: AppContext) -> None:
        self._app = app
        self.received_count = 0
        self.rejected_count = 0
        self.handled_count = 0  # notices fully acted on (for tests)
        self._full_at = float("-inf")  # the last full revalidation for a bad notice

    @property
    def pushing(self) -> bool:
        """Whether the feed is connected (the key cache relies on it instead of polling)."""
        return self._app.cache.pushing

    def connected(self, marker: object) -> None:
        self._app.cache.push_connected(marker)
        identity = self._identity()
        if identity is not None:  # what was missed while disconnected, re-read on next use
            identity.revalidate_all()
        log.info("cache invalidation: push connected")

    def disconnected(self) -> None:
        self._app.cache.push_lost()
        log.info("cache invalidation: push stopped; polling until it reconnects")

    def received(self, payload: str) -> None:
        self.received_count += 1
        try:
            self._received(payload)
        finally:
            self.handled_count += 1

    def _received(self, payload: str) -> None:
        change = parse(payload)
        if change is None:  # never one of ours: at most one revalidation a second
            self.rejected_count += 1
            self._revalidate_all("a notice that does not parse")
            return
        try:
            self.apply(change)
        except Exception as exc:  # e.g. the row it names could not be re-read: re-read all
            self._full_at = float("-inf")
            self._revalidate_all(f"{type(exc).__name__} applying a notice")

    def _revalidate_all(self, why: str) -> None:
        now = time.monotonic()
        if now - self._full_at < 1.0:
            return
        self._full_at = now
        log.warning("cache invalidation: %s; revalidating all (%d rejected so far)", why,
                    self.rejected_count)  # fmt: skip
        self._app.cache.recheck()
        identity = self._identity()
        if identity is not None:
            identity.revalidate_all()

    def apply(self, change: Change) -> None:
        """Drop what ``change`` affects (and nothing else)."""
        cache = self._app.cache
        if change.kind in (LINEAGE, ROTATION):
            rotation = change.kind == ROTATION
            cache.invalidate_lineage(change.ident, marker=change.marker or None, rotation=rotation)
            return
        if change.kind == REALM:
            cache.invalidate_realm(change.realm)
        identity = self._identity()
        if identity is not None:
            identity.apply_change(change.kind, change.realm, change.ident)

    def _identity(self) -> Any:
        """The identity layer if it is open (nothing of it is cached otherwise)."""
        return self._app.identity if self._app.identity_is_open else None


class Subscription:
    """A started feed and its invalidator (one per application context and process)."""

    def __init__(self, feed: ChangeFeed, invalidator: Invalidator) -> None:
        self.feed = feed
        self.invalidator = invalidator
        self.pid = os.getpid()

    def stop(self) -> None:
        self.feed.stop()


_SUBSCRIPTIONS: weakref.WeakKeyDictionary[AppContext, Subscription | None] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()
_INHERITED: list[Subscription] = []


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's feed threads: each process subscribes on its
    own. The parent's feeds are kept referenced (never closed here: their connection is
    the parent's)."""
    global _LOCK
    _LOCK = threading.Lock()
    _INHERITED.extend(s for s in _SUBSCRIPTIONS.values() if s is not None)
    _SUBSCRIPTIONS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def subscribe(app: AppContext) -> Subscription | None:
    """Start pushing changes into ``app``'s caches, once per process (a server calls it on
    each request: after the first it is one dictionary lookup). None if the backend has no
    change feed (the caches poll)."""
    try:
        return _SUBSCRIPTIONS[app]
    except KeyError:
        pass
    with _LOCK:
        if app in _SUBSCRIPTIONS:
            return _SUBSCRIPTIONS[app]
        feed = app.backend.change_feed()
        found = None
        if feed is not None:
            found = Subscription(feed, Invalidator(app))
            feed.start(found.invalidator)
        _SUBSCRIPTIONS[app] = found
        return found


def unsubscribe(app: AppContext) -> None:
    """Stop ``app``'s feed (the key cache polls again)."""
    with _LOCK:
        found = _SUBSCRIPTIONS.pop(app, None)
    if found is not None:
        found.stop()


def subscription(app: AppContext) -> Subscription | None:
    """``app``'s subscription in this process, if it has one."""
    return _SUBSCRIPTIONS.get(app)


__all__ = [
    "CHANNEL",
    "KINDS",
    "LINEAGE",
    "ROTATION",
    "MAX_PAYLOAD",
    "REALM",
    "TOKEN",
    "USER",
    "Change",
    "ChangeFeed",
    "ChangeSink",
    "Invalidator",
    "Subscription",
    "notice",
    "notify",
    "parse",
    "subscribe",
    "subscription",
    "unsubscribe",
]
