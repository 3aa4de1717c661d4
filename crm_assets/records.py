"""Record-level checks between the API and the warehouse: nothing is dropped silently.

``RecordGate`` is a dlt pipe step that sees every page before dlt's incremental step. Records
that break the contract (no ``id``, a value that does not fit its declared type, a null in a NOT
NULL column, a missing cursor) are taken out of the page and handed to a ``RejectSink``; the
sync writes them to ``<dataset>._rejected_records`` (resource, record id, reason, raw JSON, load
id) right after the main load and reports their number. Rejected records never reach the cursor,
so a record fixed in the CRM (which changes its ``updated_at``) is read again.

Why not a dlt table variant in the same load: a variant inherits the resource's column hints
(its NOT NULL contract columns), so the quarantine rows would fail normalization.

In a full refresh the gate also stamps the resource state with ``last_full_refresh_at``; the
state is committed atomically with the load, so the drift sensor can trust it.

Environment variables: none.
"""

import datetime as dt
import threading
from dataclasses import dataclass, field
from typing import Any

import dlt
import orjson
from dlt.extract.items_transform import ItemTransform

from crm_assets.contract import (
    PRIMARY_KEY,
    CrmResource,
    format_timestamp,
    record_problems,
    record_validator,
)

STATE_KEY = "crm"
LAST_FULL_REFRESH_KEY = "last_full_refresh_at"
REJECTED_TABLE = "_rejected_records"
_MAX_RAW_CHARS = 100_000


@dataclass(frozen=True)
class RejectedRecord:
    """One record kept out of the warehouse table, and why."""

    resource: str
    record_id: str | None
    reason: str
    raw_json: str
    rejected_at: str

    def as_row(self) -> dict[str, Any]:
        """The row written to ``_rejected_records``."""
        return {
            "resource": self.resource,
            "record_id": self.record_id,
            "reason": self.reason,
            "raw_json": self.raw_json,
            "rejected_at": self.rejected_at,
        }


@dataclass
class RejectSink:
    """Collects rejected records of one run, per resource."""

    rejected: list[RejectedRecord] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, record: RejectedRecord) -> None:
        """Adds one rejected record (thread-safe)."""
        with self._lock:
            self.rejected.append(record)

    def count(self, resource: str) -> int:
        """How many records of ``resource`` were rejected."""
        return sum(1 for r in self.rejected if r.resource == resource)

    def __deepcopy__(self, memo: dict[int, Any]) -> "RejectSink":
        # dlt deep-copies pipes; every copy must report into this one sink.
        return self


class RecordGate(ItemTransform[Any, Any]):
    """Pipe step: passes valid records on, diverts invalid ones to a ``RejectSink``."""

    # 0 = before dlt's incremental step (affinity 1): rejected records never move the cursor.
    placement_affinity = 0.0

    def __init__(self, resource: CrmResource, sink: RejectSink, stamp_full_refresh: bool) -> None:
        super().__init__(lambda item: item)
        self.resource = resource
        self.sink = sink
        self.stamp_full_refresh = stamp_full_refresh
        # Exactly ``not record_problems(resource, record)``, without building messages: every
        # record goes through it, only refused ones through ``record_problems`` (for the reasons).
        self._is_valid = record_validator(resource)
        self._stamped = False

    def __call__(self, item: Any, meta: Any = None) -> Any:
        """Filters one page (or one record) and returns what may be loaded."""
        if self.stamp_full_refresh and not self._stamped:
            state = dlt.current.resource_state(self.resource.name)
            state.setdefault(STATE_KEY, {})[LAST_FULL_REFRESH_KEY] = format_timestamp(
                dt.datetime.now(dt.timezone.utc)
            )
            self._stamped = True
        records = item if isinstance(item, list) else [item]
        is_valid = self._is_valid
        if all(map(is_valid, records)):
            return item
        good = [r for r in records if is_valid(r)]
        rejected_at = format_timestamp(dt.datetime.now(dt.timezone.utc))
        for record in records:
            if is_valid(record):
                continue
            problems = record_problems(self.resource, record)
            record_id = record.get(PRIMARY_KEY) if isinstance(record, dict) else None
            raw = orjson.dumps(record, default=str).decode()[:_MAX_RAW_CHARS]
            self.sink.add(
                RejectedRecord(
                    resource=self.resource.name,
                    record_id=None if record_id is None else str(record_id),
                    reason="; ".join(problems) or "invalid record",
                    raw_json=raw,
                    rejected_at=rejected_at,
                )
            )
        # An empty page still travels on, so dlt sees the resource (and its state) in this run.
        return good
