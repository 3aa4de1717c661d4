"""The neutral CRM API contract, as data.

Everything that knows the shape of the CRM API reads it from here: the dlt source (column hints,
paths), the Dagster asset specs (descriptions, column schema), the asset checks (NOT NULL columns),
the record validation and the sandbox CRM (what it serves). Adding a fifth CRM resource is one
entry in ``CRM_RESOURCES``. The prose version of the contract is ``docs/crm-api.md``.

Environment variables: none.
"""

import datetime as dt
import decimal
import functools
import math
import re
from collections.abc import Callable, Mapping
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
# The spelling almost every timestamp has (``2025-03-01T12:00:00Z``): a strict subset of
# _TIMESTAMP_RE that matches in about half its time, tried first.
_PLAIN_UTC_TIMESTAMP_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", re.ASCII)
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


def is_timestamp(value: Any) -> bool:
    """True when ``value`` is a contract timestamp (what ``parse_timestamp`` accepts)."""
    if not isinstance(value, str):
        return False
    if not _PLAIN_UTC_TIMESTAMP_RE.fullmatch(value) and not _TIMESTAMP_RE.match(value):
        return False
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def is_date(value: Any) -> bool:
    """True when ``value`` is a contract date (``YYYY-MM-DD``, a real calendar day)."""
    if not isinstance(value, str) or not _DATE_RE.match(value):
        return False
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        return False
    return True


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_bigint(value: Any) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and _BIGINT_MIN <= value <= _BIGINT_MAX
    )


def _is_decimal(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (int, decimal.Decimal)) and not isinstance(value, bool)


# Per contract type: does a non-null value fit? The single definition behind ``value_problem``
# (messages) and ``record_validator`` (the per-record fast path).
_FITS_TYPE: Mapping[str, Callable[[Any], bool]] = {
    "text": _is_text,
    "bool": _is_bool,
    "bigint": _is_bigint,
    "decimal": _is_decimal,
    "timestamp": is_timestamp,
    "date": is_date,
}


def value_problem(column: CrmColumn, value: Any) -> str | None:
    """Why ``value`` does not fit ``column`` (type, nullability, allowed values), or ``None``.

    The message names the field and the expected type but never repeats the value (records may
    carry personal data).
    """
    if value is None:
        return None if column.nullable else f"{column.name}: null in a NOT NULL column"
    if not _FITS_TYPE[column.type](value):
        return f"{column.name}: expected {column.type}, got {type(value).__name__}"
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


def _value_check(column: CrmColumn) -> Callable[[Any], bool]:
    """``value_problem(column, value) is None`` for a non-null ``value``, as one predicate."""
    fits = _FITS_TYPE[column.type]
    if column.choices is None:
        return fits
    choices = column.choices
    return lambda value: fits(value) and value in choices


@functools.cache
def record_validator(resource: CrmResource) -> Callable[[Any], bool]:
    """A predicate equal to ``not record_problems(resource, record)``, several times faster.

    It stops at the first problem and builds no messages: the sync checks every record with it
    and asks ``record_problems`` for the reasons only of the records it refuses.
    """
    checks = tuple((c.name, c.nullable, _value_check(c)) for c in resource.columns)

    def is_valid(record: Any) -> bool:
        if not isinstance(record, dict):
            return False
        get = record.get
        for name, nullable, fits in checks:
            value = get(name)
            if value is None:
                if not nullable:
                    return False
            elif not fits(value):
                return False
        return True

    return is_valid
