"""The neutral CRM API contract, as data.

Everything that knows the shape of the CRM API reads it from here: the dlt source (column hints,
paths), the Dagster asset specs (descriptions, column schema), the asset checks (NOT NULL columns),
the record validation and the sandbox CRM (what it serves). Adding a fifth CRM resource is one
entry in ``CRM_RESOURCES``. The prose version of the contract is ``docs/crm-api.md``.

Environment variables: none.
"""

import datetime as dt
import decimal
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

ColumnType = Literal["text", "timestamp", "date", "bigint", "decimal", "bool"]

PRIMARY_KEY = "id"
CURSOR_FIELD = "updated_at"
API_VERSION_PREFIX = "/v1"
MAX_PAGE_SIZE = 100


@dataclass(frozen=True)
class CrmColumn:
    """One field of a CRM record: its contract type, nullability and allowed values."""

    name: str
    type: ColumnType
    nullable: bool = False
    description: str = ""
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class CrmResource:
    """One CRM resource (an API collection, a warehouse table, a Dagster asset)."""

    name: str
    description: str
    fields: tuple[CrmColumn, ...]

    @property
    def path(self) -> str:
        """The API path of the collection, e.g. ``/v1/deals``."""
        return f"{API_VERSION_PREFIX}/{self.name}"

    @property
    def columns(self) -> tuple[CrmColumn, ...]:
        """All columns: the ones every resource has, then the resource's own."""
        return COMMON_COLUMNS + self.fields

    @property
    def not_null_columns(self) -> tuple[str, ...]:
        """Names of the columns the contract declares NOT NULL."""
        return tuple(c.name for c in self.columns if not c.nullable)


COMMON_COLUMNS: tuple[CrmColumn, ...] = (
    CrmColumn("id", "text", description="Primary key, stable for the record's lifetime."),
    CrmColumn("created_at", "timestamp", description="When the record was created (UTC)."),
    CrmColumn("updated_at", "timestamp", description="Last change (UTC); the incremental cursor."),
)

CRM_RESOURCES: tuple[CrmResource, ...] = (
    CrmResource(
        name="notes",
        description="Free-text notes attached to accounts and deals.",
        fields=(
            CrmColumn("name", "text", nullable=True, description="Title."),
            CrmColumn("body", "text", nullable=True),
            CrmColumn("account_id", "text", nullable=True),
            CrmColumn("deal_id", "text", nullable=True),
            CrmColumn("author_id", "text", nullable=True),
        ),
    ),
    CrmResource(
        name="deals",
        description="Sales opportunities with stage, amount and close date.",
        fields=(
            CrmColumn("name", "text"),
            CrmColumn("account_id", "text", nullable=True),
            CrmColumn(
                "stage",
                "text",
                choices=(
                    "prospecting",
                    "qualification",
                    "proposal",
                    "negotiation",
                    "closed_won",
                    "closed_lost",
                ),
            ),
            CrmColumn("amount", "decimal", nullable=True),
            CrmColumn("currency", "text", nullable=True, description="ISO 4217 code."),
            CrmColumn("close_date", "date", nullable=True),
            CrmColumn("is_closed", "bool"),
            CrmColumn("owner_id", "text", nullable=True),
        ),
    ),
    CrmResource(
        name="accounts",
        description="Companies the CRM tracks.",
        fields=(
            CrmColumn("name", "text"),
            CrmColumn("industry", "text", nullable=True),
            CrmColumn("website", "text", nullable=True),
            CrmColumn("employee_count", "bigint", nullable=True),
            CrmColumn("annual_revenue", "decimal", nullable=True),
            CrmColumn("owner_id", "text", nullable=True),
        ),
    ),
    CrmResource(
        name="calls",
        description="Logged phone calls.",
        fields=(
            CrmColumn("name", "text", nullable=True, description="Subject."),
            CrmColumn("direction", "text", choices=("inbound", "outbound")),
            CrmColumn("duration_seconds", "bigint", nullable=True),
            CrmColumn("started_at", "timestamp", nullable=True),
            CrmColumn("outcome", "text", nullable=True),
            CrmColumn("account_id", "text", nullable=True),
            CrmColumn("deal_id", "text", nullable=True),
            CrmColumn("owner_id", "text", nullable=True),
        ),
    ),
)

RESOURCES_BY_NAME: Mapping[str, CrmResource] = {r.name: r for r in CRM_RESOURCES}
RESOURCE_NAMES: tuple[str, ...] = tuple(RESOURCES_BY_NAME)


def get_resource(name: str) -> CrmResource:
    """Returns the contract entry for ``name`` or raises a ``KeyError`` listing the valid names."""
    try:
        return RESOURCES_BY_NAME[name]
    except KeyError:
        raise KeyError(
            f"unknown CRM resource {name!r}; known resources: {', '.join(RESOURCE_NAMES)}"
        ) from None


# --- values ----------------------------------------------------------------------------------

_TIMESTAMP_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:?\d{2})$"
)
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_BIGINT_MIN, _BIGINT_MAX = -(2**63), 2**63 - 1


def parse_timestamp(value: str) -> dt.datetime:
    """Parses a contract timestamp (ISO-8601 with an explicit UTC offset) to an aware datetime."""
    if not isinstance(value, str) or not _TIMESTAMP_RE.match(value):
        raise ValueError(f"not an ISO-8601 UTC timestamp: {value!r}")
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_timestamp(value: dt.datetime) -> str:
    """Formats an aware datetime the way the contract writes timestamps (``...Z``)."""
    value = value.astimezone(dt.timezone.utc)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}"
    return text + "Z"


def value_problem(column: CrmColumn, value: Any) -> str | None:
    """Why ``value`` does not fit ``column`` (type, nullability, allowed values), or ``None``.

    The message names the field and the expected type but never repeats the value (records may
    carry personal data).
    """
    if value is None:
        return None if column.nullable else f"{column.name}: null in a NOT NULL column"
    kind = column.type
    ok: bool
    if kind == "text":
        ok = isinstance(value, str)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "bigint":
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and _BIGINT_MIN <= value <= _BIGINT_MAX
    elif kind == "decimal":
        ok = isinstance(value, (int, float, decimal.Decimal)) and not isinstance(value, bool)
        ok = ok and not (isinstance(value, float) and not math.isfinite(value))
    elif kind == "timestamp":
        try:
            parse_timestamp(value)
            ok = True
        except (ValueError, TypeError):
            ok = False
    elif kind == "date":
        ok = isinstance(value, str) and bool(_DATE_RE.match(value))
        if ok:
            try:
                dt.date.fromisoformat(value)
            except ValueError:
                ok = False
    else:  # pragma: no cover - ColumnType is closed
        raise AssertionError(kind)
    if not ok:
        return f"{column.name}: expected {kind}, got {type(value).__name__}"
    if column.choices is not None and value not in column.choices:
        return f"{column.name}: not one of the allowed values"
    return None


def record_problems(resource: CrmResource, record: Any) -> list[str]:
    """Every way ``record`` breaks the contract of ``resource`` (empty when it is valid).

    A missing NOT NULL field counts as null. Fields the contract does not know are allowed: they
    become new columns and are reported, not rejected.
    """
    if not isinstance(record, dict):
        return [f"record is a {type(record).__name__}, not an object"]
    problems = []
    for column in resource.columns:
        problem = value_problem(column, record.get(column.name))
        if problem:
            problems.append(problem)
    return problems
