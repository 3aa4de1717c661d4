"""The contract's value checks (pure)."""

import datetime as dt

import pytest

from crm_assets.contract import (
    CrmColumn,
    format_timestamp,
    get_resource,
    parse_timestamp,
    record_problems,
    value_problem,
)


def valid_deal() -> dict[str, object]:
    return {
        "id": "dea_1",
        "created_at": "2025-03-01T12:00:00Z",
        "updated_at": "2025-03-02T12:00:00Z",
        "name": "Ünïcode déal 🚀",
        "account_id": None,
        "stage": "proposal",
        "amount": 1234.5,
        "currency": "EUR",
        "close_date": "2025-04-30",
        "is_closed": False,
        "owner_id": None,
    }


def test_valid_record_has_no_problems() -> None:
    assert record_problems(get_resource("deals"), valid_deal()) == []


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("id", None, "id: null in a NOT NULL column"),
        ("updated_at", "yesterday", "updated_at: expected timestamp, got str"),
        ("amount", "12", "amount: expected decimal, got str"),
        ("amount", float("nan"), "amount: expected decimal, got float"),
        ("is_closed", "false", "is_closed: expected bool, got str"),
        ("close_date", "2025-02-30", "close_date: expected date, got str"),
        ("stage", "won", "stage: not one of the allowed values"),
        ("name", 7, "name: expected text, got int"),
    ],
)
def test_problems_name_the_field_never_the_value(field: str, value: object, problem: str) -> None:
    record = valid_deal()
    record[field] = value
    assert record_problems(get_resource("deals"), record) == [problem]


def test_missing_not_null_field_is_a_problem() -> None:
    record = valid_deal()
    del record["stage"]
    assert record_problems(get_resource("deals"), record) == ["stage: null in a NOT NULL column"]


def test_non_object_record() -> None:
    assert record_problems(get_resource("notes"), ["x"]) == ["record is a list, not an object"]


def test_bigint_bounds_and_bools() -> None:
    column = CrmColumn("employee_count", "bigint", nullable=True)
    assert value_problem(column, 2**63) is not None
    assert value_problem(column, True) is not None
    assert value_problem(column, 12) is None


def test_timestamps_round_trip() -> None:
    value = parse_timestamp("2025-03-01T12:00:00Z")
    assert value == dt.datetime(2025, 3, 1, 12, tzinfo=dt.timezone.utc)
    assert format_timestamp(value) == "2025-03-01T12:00:00Z"
    assert parse_timestamp("2025-03-01T13:00:00+01:00") == value
    with pytest.raises(ValueError):
        parse_timestamp("2025-03-01")
