"""End to end: the real Dagster assets read the sandbox over HTTP and load the warehouse.

Every test runs once per warehouse backend (``WAREHOUSE_BACKENDS``): DuckDB, and PostgreSQL when
``CRM_TEST_POSTGRES_DSN`` is set (see ``conftest``). The SQL here is what both understand
(``information_schema``, plain ``SELECT``); the only backend-specific thing is the type names.

Environment variables: ``CRM_TEST_POSTGRES_DSN``, ``CRM_TEST_REQUIRE_ALL`` (through conftest).
"""

import datetime as dt
import decimal
import math

import pytest

from crm_assets.contract import CRM_RESOURCES, RESOURCE_NAMES, get_resource
from crm_assets.sandbox import SandboxClient
from crm_assets_tests.conftest import DEFAULT_RECORDS, WAREHOUSE_BACKENDS, Harness

pytestmark = pytest.mark.parametrize("warehouse_backend", WAREHOUSE_BACKENDS, indirect=True)

# Each backend's `information_schema.columns.data_type` for the contract types.
WAREHOUSE_TYPES = {
    "duckdb": {
        "text": "VARCHAR",
        "timestamp": "TIMESTAMP WITH TIME ZONE",
        "date": "DATE",
        "bigint": "BIGINT",
        "decimal": "DECIMAL(38,9)",
        "bool": "BOOLEAN",
    },
    "postgres": {
        "text": "character varying",
        "timestamp": "timestamp with time zone",
        "date": "date",
        "bigint": "bigint",
        "decimal": "numeric",
        "bool": "boolean",
    },
}
# Money keeps 9 decimal places on every backend (dlt's default decimal precision).
DECIMAL_PRECISION_SCALE = (38, 9)


def _normalize(column_type: str, value: object) -> object:
    """A sandbox (JSON) value as the warehouse returns it, for comparison."""
    if value is None:
        return None
    if column_type == "timestamp":
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if column_type == "date":
        return dt.date.fromisoformat(str(value))
    if column_type == "decimal":
        return decimal.Decimal(str(value)).quantize(decimal.Decimal("0.000000001"))
    return value


def test_full_refresh_loads_every_record_with_contract_types(
    harness: Harness, sandbox: SandboxClient
) -> None:
    result = harness.materialize("full_refresh")
    assert result.success

    types = WAREHOUSE_TYPES[harness.backend]
    for resource in CRM_RESOURCES:
        columns = {
            name: (data_type, nullable, (precision, scale))
            for name, data_type, nullable, precision, scale in harness.query(
                "SELECT column_name, data_type, is_nullable, numeric_precision, numeric_scale "
                "FROM information_schema.columns "
                f"WHERE table_schema = 'crm' AND table_name = '{resource.name}'"
            )
        }
        for column in resource.columns:
            data_type, nullable, precision_scale = columns[column.name]
            assert data_type == types[column.type], (resource.name, column.name)
            assert (nullable == "YES") == column.nullable, (resource.name, column.name)
            if column.type == "decimal":
                assert precision_scale == DECIMAL_PRECISION_SCALE, (resource.name, column.name)

        api_records = {r["id"]: r for r in sandbox.records(resource.name)}
        names = [c.name for c in resource.columns]
        rows = harness.query(f"SELECT {', '.join(names)} FROM crm.{resource.name}")
        assert len(rows) == len(api_records) == DEFAULT_RECORDS[resource.name]
        for row in rows:
            expected = api_records[row[0]]
            for column, value in zip(resource.columns, row, strict=True):
                want = _normalize(column.type, expected.get(column.name))
                if isinstance(value, dt.datetime):
                    value = value.astimezone(dt.timezone.utc)
                assert value == want, (resource.name, row[0], column.name)


def test_pagination_reads_each_page_once_with_the_key_in_the_query(
    harness: Harness, sandbox: SandboxClient
) -> None:
    sandbox.reset_log()
    assert harness.materialize("full_refresh").success
    for name in RESOURCE_NAMES:
        log = sandbox.request_log(name)
        assert len(log) == math.ceil(DEFAULT_RECORDS[name] / 100), name
        assert sorted(entry["offset"] for entry in log) == list(
            range(0, DEFAULT_RECORDS[name], 100)
        )
        assert all(entry["limit"] == 100 for entry in log)
        assert all(entry["api_key_ok"] for entry in log)
        assert all("api_key" in entry["query_keys"] for entry in log)
        assert all(entry["updated_since"] is None for entry in log)


def test_second_run_is_idempotent(harness: Harness) -> None:
    assert harness.materialize("full_refresh").success
    first = {name: harness.table_ids(name) for name in RESOURCE_NAMES}
    assert harness.materialize("full_refresh").success
    assert harness.materialize("incremental").success
    for name in RESOURCE_NAMES:
        ids = harness.table_ids(name)
        assert ids == first[name]
        assert len(ids) == len(set(ids)) == DEFAULT_RECORDS[name]


def test_one_asset_selection_loads_one_table(harness: Harness, sandbox: SandboxClient) -> None:
    sandbox.reset_log()
    result = harness.materialize("full_refresh", resources=["deals"])
    assert result.success
    tables = {
        r[0]
        for r in harness.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'crm' "
            "AND table_name NOT LIKE '\\_dlt%' ESCAPE '\\'"
        )
    }
    assert tables == {"deals"}
    assert {entry["resource"] for entry in sandbox.request_log()} == {"deals"}
    materialized = [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()]
    assert materialized == ["crm/deals"]


@pytest.mark.parametrize("resource", ["deals"])
def test_materialization_metadata_counts_rows(harness: Harness, resource: str) -> None:
    result = harness.materialize("full_refresh", resources=[resource])
    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["dagster/row_count"].value == DEFAULT_RECORDS[resource]
    assert metadata["rows_loaded"].value == DEFAULT_RECORDS[resource]
    assert metadata["sync_mode"].value == "full_refresh"
    assert metadata["pages"].value == math.ceil(DEFAULT_RECORDS[resource] / 100)
    assert get_resource(resource).not_null_columns[0] == "id"
