"""The pure builder of the seed's RESTAPIConfig and the contract's column hints."""

import pytest

from crm_assets.contract import CRM_RESOURCES, RESOURCE_NAMES, get_resource
from crm_assets.pagination import CrmOffsetPaginator
from crm_assets.source import (
    INITIAL_CURSOR,
    SourceOptions,
    build_crm_source,
    build_rest_api_config,
    column_hints,
)

OPTIONS = SourceOptions(base_url="https://api.example.com")


def test_config_is_the_seeds() -> None:
    config = build_rest_api_config(OPTIONS, "secret-key")
    assert config["client"]["base_url"] == "https://api.example.com"
    assert config["client"]["auth"] == {
        "type": "api_key",
        "name": "api_key",
        "api_key": "secret-key",
        "location": "query",
    }
    assert config["resource_defaults"] == {"primary_key": "id", "write_disposition": "merge"}
    names = [r["name"] for r in config["resources"]]  # type: ignore[index]
    assert names == list(RESOURCE_NAMES) == ["notes", "deals", "accounts", "calls"]
    for entry in config["resources"]:
        endpoint = entry["endpoint"]  # type: ignore[index]
        assert endpoint["path"] == f"/v1/{entry['name']}"  # type: ignore[index]
        assert str(endpoint["data_selector"]) == "data"
        paginator = endpoint["paginator"]
        assert isinstance(paginator, CrmOffsetPaginator)
        assert paginator.limit == 100
        assert paginator.param_name == "offset" and paginator.limit_param == "limit"
        assert str(paginator.total_path) == "total"


def test_incremental_sends_the_cursor_and_full_refresh_does_not() -> None:
    incremental = build_rest_api_config(OPTIONS, "k", "incremental")["resources"][0]
    full = build_rest_api_config(OPTIONS, "k", "full_refresh")["resources"][0]
    assert incremental["endpoint"]["params"] == {  # type: ignore[index]
        "updated_since": "{incremental.start_value}"
    }
    assert full["endpoint"]["params"] == {}  # type: ignore[index]
    for entry in (incremental, full):
        cursor = entry["endpoint"]["incremental"]  # type: ignore[index]
        assert cursor["cursor_path"] == "updated_at"
        assert cursor["initial_value"] == INITIAL_CURSOR


def test_lookback_becomes_dlt_lag() -> None:
    options = SourceOptions(base_url="https://x", lookback_seconds=900)
    entry = build_rest_api_config(options, "k")["resources"][1]
    assert entry["endpoint"]["incremental"]["lag"] == 900  # type: ignore[index]


def test_column_hints_follow_the_contract() -> None:
    hints = column_hints(get_resource("deals"))
    assert hints["id"] == {
        "name": "id",
        "data_type": "text",
        "nullable": False,
        "description": "Primary key, stable for the record's lifetime.",
        "primary_key": True,
    }
    assert hints["amount"]["data_type"] == "decimal" and hints["amount"]["nullable"]
    assert hints["close_date"]["data_type"] == "date"
    assert hints["is_closed"] == {"name": "is_closed", "data_type": "bool", "nullable": False}
    assert hints["updated_at"]["dedup_sort"] == "desc"
    for resource in CRM_RESOURCES:
        assert set(column_hints(resource)) == {c.name for c in resource.columns}


@pytest.mark.parametrize("bad", [0, 101])
def test_page_size_is_bounded(bad: int) -> None:
    with pytest.raises(ValueError, match="page size"):
        build_rest_api_config(SourceOptions(base_url="https://x", page_size=bad), "k")


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="sync mode"):
        build_rest_api_config(OPTIONS, "k", "sometimes")  # type: ignore[arg-type]


def test_source_has_one_resource_per_contract_entry_and_a_record_gate() -> None:
    source = build_crm_source(OPTIONS, "k", resources=[get_resource("calls")])
    assert list(source.resources) == ["calls"]
    steps = [type(s).__name__ for s in source.resources["calls"]._pipe.steps]
    # The gate must run before dlt's incremental step so rejected records never move the cursor.
    assert steps.index("RecordGate") < steps.index("IncrementalResourceWrapper")
