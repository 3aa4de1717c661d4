"""Strict offset pagination for the CRM API: page validation, shift detection, progress.

dlt's ``OffsetPaginator`` trusts every 200 response: a page without ``data`` is an empty page
(pagination stops, the run "succeeds" and a full refresh deletes rows), a missing ``total``
raises an error that dumps the whole body (records are personal data), and records skipped by
offset pagination over data that changes mid-sync go unnoticed. This module wraps it in one place:

* ``make_page_validator`` is a response hook (runs before dlt parses the body) that fails the run
  on a malformed 200 page, naming resource and offset but never the body, and parses the JSON
  once for dlt's later readers.
* ``CrmOffsetPaginator`` counts the unique ids it received. When a pass ends with fewer unique ids
  than the API's ``total`` (an updated record moved to the end of the ``updated_at`` order and a
  later one slid across a page boundary), it re-reads from offset 0 within the same run; the
  warehouse merge keeps the newest version of each duplicate. It also guards against endless
  loops (an API that ignores ``offset``) and logs progress.

Environment variables: none.
"""

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from dlt.sources.helpers.requests import Request, Response
from dlt.sources.helpers.rest_client.paginators import OffsetPaginator

from crm_assets.contract import PRIMARY_KEY


class CrmApiError(Exception):
    """The CRM API answered something this project cannot load safely. Never includes records."""


class CrmPageError(CrmApiError):
    """A 200 response that is not a valid page of the contract."""

    def __init__(self, resource: str, offset: int | None, problem: str) -> None:
        self.resource, self.offset, self.problem = resource, offset, problem
        where = f"offset {offset}" if offset is not None else "unknown offset"
        super().__init__(
            f"CRM API returned an invalid page for {resource} at {where}: {problem}. "
            "Nothing from this run was loaded; the warehouse is unchanged."
        )


class CrmIncompleteReadError(CrmApiError):
    """Pagination could not read every record even after re-reading."""


@dataclass
class ResourceSyncStats:
    """What one resource's extraction did; filled by the hook and the paginator, read after."""

    resource: str
    pages: int = 0
    http_attempts: int = 0
    records_received: int = 0
    unique_records: int = 0
    passes: int = 0
    api_total: int | None = None
    started_at: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def retries(self) -> int:
        """HTTP attempts beyond one per page (429/5xx/connection errors that were retried)."""
        return max(0, self.http_attempts - self.pages)

    def __deepcopy__(self, memo: dict[int, Any]) -> "ResourceSyncStats":
        # dlt deep-copies source configs and pipes; the copies must keep counting into this object.
        return self

    def count_attempt(self) -> None:
        """Counts one HTTP attempt (called from the transport, possibly from another thread)."""
        with self.lock:
            self.http_attempts += 1


def _offset_of(request_url: str | None) -> int | None:
    if not request_url:
        return None
    values = parse_qs(urlsplit(request_url).query).get("offset")
    try:
        return int(values[0]) if values else 0
    except ValueError:
        return None


def validate_page_body(content: bytes) -> dict[str, Any]:
    """Parses a 200 response body and checks it is a page of the contract.

    Returns the parsed body. Raises ``ValueError`` with a short reason that never contains the
    body (records are personal data).
    """
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise ValueError("the body is not JSON") from None
    if not isinstance(body, dict):
        raise ValueError(f"the body is a JSON {type(body).__name__}, not an object")
    if "error" in body:
        raise ValueError("the page carries an 'error' field")
    if "data" not in body:
        raise ValueError("the page has no 'data' field")
    if not isinstance(body["data"], list):
        raise ValueError(f"'data' is a {type(body['data']).__name__}, not a list")
    total = body.get("total")
    if total is None:
        raise ValueError("the page has no 'total' field")
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError("'total' is not a non-negative integer")
    return body


def make_page_validator(resource: str) -> Callable[..., None]:
    """A ``requests`` response hook that rejects malformed 200 pages of ``resource``.

    Non-200 responses are left to dlt's retry logic and ``raise_for_status``.
    """

    def validate_page(response: Response, *args: Any, **kwargs: Any) -> None:
        if response.status_code != 200:
            return
        offset = _offset_of(response.request.url if response.request else None)
        try:
            body = validate_page_body(response.content)
        except ValueError as exc:
            raise CrmPageError(resource, offset, str(exc)) from None
        # dlt parses the body twice more (data selector, total); hand it the parsed object.
        response.json = lambda *a, **k: body  # type: ignore[method-assign]

    return validate_page


class RunLog:
    """A log function shared by every (deep-copied) paginator of a run.

    dlt deep-copies paginators; Dagster's log manager cannot be copied (nor should it be).
    """

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self._log = log

    def __call__(self, message: str) -> None:
        """Logs ``message`` through the run's logger, if there is one."""
        if self._log is not None:
            self._log(message)

    def __deepcopy__(self, memo: dict[int, Any]) -> "RunLog":
        return self


class CrmOffsetPaginator(OffsetPaginator):
    """``OffsetPaginator`` that detects skipped records and re-reads them in the same run."""

    def __init__(
        self,
        resource: str,
        stats: ResourceSyncStats,
        limit: int = 100,
        max_passes: int = 3,
        progress_every_pages: int = 50,
        log: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(limit=limit, total_path="total")
        self.resource = resource
        self.stats = stats
        self.max_passes = max_passes
        self.progress_every_pages = progress_every_pages
        self.log = log if isinstance(log, RunLog) else RunLog(log)
        self._seen: set[Any] = set()
        self._pages_in_pass = 0
        self._last_page_ids: tuple[Any, ...] | None = None

    def init_request(self, request: Request) -> None:
        """Starts the first pass."""
        super().init_request(request)
        self._seen = set()
        self._pages_in_pass = 0
        self._last_page_ids = None
        self.stats.passes = 1

    def update_state(self, response: Response, data: list[Any] | None = None) -> None:
        """Advances the offset; at the end of a pass decides whether to re-read."""
        offset = self.current_value
        page = data or []
        body = response.json()
        total = int(body["total"])
        page_ids = tuple(r.get(PRIMARY_KEY) if isinstance(r, dict) else None for r in page)
        stats = self.stats
        stats.pages += 1
        stats.records_received += len(page)
        stats.api_total = total
        self._pages_in_pass += 1

        if page_ids and page_ids == self._last_page_ids:
            raise CrmApiError(
                f"CRM API returned the same page of {self.resource} twice (offset {offset}); "
                "it seems to ignore 'offset'. Stopped to avoid an endless loop."
            )
        self._last_page_ids = page_ids
        self._seen.update(page_ids)
        stats.unique_records = len(self._seen)
        page_budget = math.ceil(max(total, stats.unique_records) / self.limit) + 10
        if self._pages_in_pass > page_budget:
            raise CrmApiError(
                f"CRM API pagination of {self.resource} did not end after {self._pages_in_pass} "
                f"pages for a total of {total}; stopped to avoid an endless loop."
            )

        super().update_state(response, data)
        if stats.pages % self.progress_every_pages == 0:
            self.log(self.progress_line())
        if self._has_next_page:
            return
        missing = total - len(self._seen)
        if missing <= 0:
            return
        if stats.passes >= self.max_passes:
            raise CrmIncompleteReadError(
                f"{self.resource}: read {len(self._seen)} unique records of the API's total "
                f"{total} after {stats.passes} passes (records changed faster than offset "
                "pagination could read them). Nothing from this run was loaded; run it again."
            )
        stats.passes += 1
        self.log(
            f"{self.resource}: {missing} record(s) were skipped while the API's data moved "
            f"during pagination; re-reading from offset 0 (pass {stats.passes} of at most "
            f"{self.max_passes})"
        )
        self.current_value = self.initial_value
        self._pages_in_pass = 0
        self._last_page_ids = None
        self._has_next_page = True

    def progress_line(self) -> str:
        """``deals: 5,000 of 50,000 records (10%), 1,234 rec/s, ETA 41s``."""
        stats = self.stats
        total = stats.api_total or 0
        done = min(stats.unique_records, total) if total else stats.unique_records
        elapsed = max(time.monotonic() - stats.started_at, 1e-6)
        rate = stats.records_received / elapsed
        line = f"{self.resource}: {done:,} of {total:,} records"
        if total:
            line += f" ({100 * done / total:.0f}%)"
        line += f", {rate:,.0f} rec/s"
        if total and rate > 0:
            line += f", ETA {max(total - done, 0) / rate:.0f}s"
        return line
