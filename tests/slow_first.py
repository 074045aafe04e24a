"""Start the longest tests first (a pytest plugin, registered by ``pytest_plugins`` in
tests/conftest.py).

Under ``pytest -n 2`` (``--dist worksteal``, see pyproject.toml) a run ends when the last
test on the busier worker ends. Collected in file order, a 60 s test near the end keeps one
worker busy while the other idles; started first, it runs beside hundreds of short tests.

``SLOWEST`` lists the slowest tests of a full run (setup + call + teardown seconds, from
``--durations``; exact values do not matter, only the order). A test missing from it (new,
renamed) keeps its place after them; tests marked ``slow`` come right after the listed
ones. Refresh the list when the slowest tests change: no test depends on the order.
"""

from __future__ import annotations

import pytest

#: node id -> seconds (the larger of two full ``-n 2`` runs on a 2-core machine under load).
SLOWEST: dict[str, float] = {
    "tests/test_server_live.py::test_live_api_conforms_to_openapi[negative]": 68.4,
    "tests/test_docs.py::test_document_examples_run[docs/keys.md]": 47.6,
    "tests/test_audit_spill.py::"
    "test_postgres_stopped_for_30_seconds_under_load_loses_no_audit_record": 45.6,
    "tests/test_docs.py::test_document_examples_run[docs/identity.md]": 41.1,
    "tests/test_server_live.py::test_live_api_conforms_to_openapi[positive]": 34.6,
    "tests/test_security_proxy_tls.py::"
    "test_exposure_non_loopback_bind_without_tls_is_refused": 31.1,
    "tests/test_usage_exact.py::test_usage_limit_is_shared_by_cli_processes": 29.7,
    "tests/test_docs.py::test_document_examples_run[docs/signing.md]": 29.5,
    "tests/test_security_server.py::"
    "test_finding3_a_request_that_takes_too_long_to_arrive_is_closed": 27.0,
    "tests/test_security_server.py::test_finding3_500_trickling_clients_do_not_stop_healthz": 24.8,
    "tests/test_security_proxy_tls.py::"
    "test_exposure_a_real_server_on_every_interface_refuses_plain_http_via_its_proxy": 23.4,
    "tests/test_security_proxy_tls.py::"
    "test_exposure_the_clis_work_through_nginx_and_audit_shows_the_client": 23.3,
    "tests/test_load.py::test_mixed_load_on_two_servers_has_no_errors_and_loses_nothing": 21.0,
    "tests/test_docs.py::test_document_examples_run[README.md]": 20.2,
    "tests/test_security_server.py::"
    "test_finding3_limits_come_from_the_config_file_and_bad_values_are_refused": 20.1,
    "tests/test_load.py::test_the_final_check_catches_tampered_and_wrong_results": 20.1,
    "tests/test_docs.py::test_document_examples_run[docs/files.md]": 20.0,
    "tests/test_identity_contract.py::test_docs_identity_contract_example_passes": 19.6,
    "tests/test_faults_scale.py::test_two_servers_two_workers_through_a_postgres_restart": 19.3,
    "tests/test_server_workers.py::test_a_plugin_enabled_in_the_config_serves_after_sighup": 19.2,
    "tests/test_server_workers.py::test_a_config_change_takes_effect_after_sighup_only": 18.0,
    "tests/test_server_workers.py::test_the_purge_runs_once_per_server_not_once_per_worker": 17.3,
    "tests/test_crash_safety.py::test_rewrap_killed[postgres]": 16.8,
    "tests/test_server_workers.py::"
    "test_sighup_replaces_every_worker_without_refusing_a_connection": 16.7,
    "tests/test_server_workers.py::"
    "test_an_invalid_config_on_sighup_is_refused_and_the_workers_stay": 16.4,
    "tests/test_security_permissions.py::"
    "test_finding4_cli_refuses_a_store_others_can_access_and_init_fixes_it[416]": 16.3,
    "tests/test_secret_hygiene.py::test_full_session_leaks_no_secret[postgres]": 16.2,
    "tests/test_security_permissions.py::"
    "test_finding4_cli_refuses_a_store_others_can_access_and_init_fixes_it[432]": 14.9,
    "tests/test_security_server.py::test_finding5_allowed_hosts_in_normal_mode": 14.2,
    "tests/test_example_plugin.py::test_installed_example_round_trips_through_cli_and_http": 14.1,
    "tests/test_server_workers.py::test_workers_stop_when_the_master_is_killed": 13.4,
    "tests/test_server_workers.py::test_a_crash_loop_backs_off_and_the_master_gives_up": 13.2,
    "tests/test_security_permissions.py::"
    "test_finding4_cli_refuses_a_store_others_can_access_and_init_fixes_it[388]": 13.2,
    "tests/test_http_json_properties.py::test_any_json_body_gets_a_4xx_json_error_or_success": 13.1,
    "tests/test_security_server.py::test_finding12_aborted_server_leaves_no_core_file": 12.8,
    "tests/test_http_json_properties.py::"
    "test_manifest_strategy_reaches_valid_and_compatible_manifests": 12.6,
    "tests/test_faults.py::test_postgres_black_holed": 12.5,
    "tests/test_usage_exact.py::test_parallel_cli_encryptions_count_exactly": 12.5,
    "tests/test_security_permissions.py::"
    "test_finding4_cli_creates_store_files_0600_and_directory_0700": 12.4,
    "tests/test_docs.py::test_document_examples_run[docs/http.md]": 12.0,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Listed tests first (longest first), then tests marked ``slow``, then the rest; each
    group keeps the collection order otherwise (a stable sort, the same on every worker)."""

    def rank(item: pytest.Item) -> tuple[float, int]:
        return (-SLOWEST.get(item.nodeid, 0.0), 0 if item.get_closest_marker("slow") else 1)

    items.sort(key=rank)
