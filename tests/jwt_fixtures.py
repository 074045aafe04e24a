"""Fixtures of the JWT/OIDC provider tests (tests/test_jwt_provider*.py), once: a pytest
plugin registered by ``pytest_plugins`` in tests/conftest.py, so a test module uses them as
arguments without importing them (an import would trip ruff's F811 at every use).

* ``issuer``: a real OIDC issuer process (:mod:`oidc_issuer`) on a free loopback port,
  stopped afterwards;
* ``world``: a served SQLite identity app whose realm ``ci`` trusts that issuer: (app,
  issuer, base URL).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from identity_helpers import close_app, identity_app, serving
from oidc_issuer import OidcIssuer, realm_config

from qimem.app import AppContext
from qimem.services import auth_providers as aps
from qimem.services import identity as ids


@pytest.fixture
def issuer() -> Iterator[OidcIssuer]:
    started = OidcIssuer()
    yield started
    started.stop()


@pytest.fixture
def world(
    tmp_path: Path, root_key_b64: str, issuer: OidcIssuer
) -> Iterator[tuple[AppContext, OidcIssuer, str]]:
    app = identity_app(f"sqlite:///{tmp_path / 'qimem.db'}", root_key_b64)
    ids.create_realm(app, "ci")
    aps.set_realm_providers(app, "ci", realm_config(issuer))
    with serving(app) as url:
        yield app, issuer, url
    close_app(app)
