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
  warehouse merge keeps the newest version of each duplicate. It also logs progress and guards
  against APIs that would make pagination endless or lossy (see ``CrmOffsetPaginator``).

Environment variables: none.
"""

import hashlib
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


class CrmPaginationLoopError(CrmApiError):
    """The API kept serving pages without new records: pagination was stopped, nothing loaded."""


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
    # The run's log (set by the resource's paginator); retries are reported through it.
    log: Callable[[str], None] | None = field(default=None, repr=False, compare=False)

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

    def note(self, message: str) -> None:
        """Logs ``message`` through the run's log (nowhere outside a run)."""
        if self.log is not None:
            self.log(message)


def offset_of_url(request_url: str | None) -> int | None:
    """The ``offset`` query parameter of a request URL (0 when absent, None if unreadable)."""
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
        offset = offset_of_url(response.request.url if response.request else None)
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


def record_key(record: Any) -> Any:
    """What identifies a received record: its ``id`` (a str or int), else a digest of its content.

    Records without a usable ``id`` (missing, null, an object) are quarantined later, but
    pagination must still count them and must not mistake two pages of them for the same page.
    The digest is ``bytes``, so it never equals an id; the id itself is returned as is (no
    wrapper object: a full refresh keeps one key per record in memory).
    """
    if isinstance(record, dict):
        value = record.get(PRIMARY_KEY)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return value
    try:
        content = orjson.dumps(record, option=orjson.OPT_SORT_KEYS, default=repr)
    except (TypeError, orjson.JSONEncodeError):
        content = repr(record).encode("utf-8", "replace")
    return hashlib.blake2b(content, digest_size=16).digest()


# Pages a pass may serve beyond twice the pages its distinct records fill (see the class).
PAGE_BUDGET_SLACK = 10


class CrmOffsetPaginator(OffsetPaginator):
    """``OffsetPaginator`` that detects skipped records and re-reads them in the same run.

    Hard guards, each naming resource and offset in its error (never a record value):

    * **the same page twice in a row**: an API that ignores ``offset`` would be paged forever;
    * **a page budget**: a pass may serve at most ``2 * ceil(distinct records / limit) + 10``
      pages (distinct records read in the run so far). An honest pass serves about
      ``ceil(distinct / limit)`` pages (records updated mid-sync are read twice, a few per page);
      an API that wraps around or repeats records while its ``total`` keeps promising more never
      adds distinct records and is stopped.
      (A budget from ``total`` alone cannot stop that: such a ``total`` grows with the offset.)
    * **a total lower than what the API serves**: dlt stops once the offset reaches ``total``, so
      an API that under-counts (a capped ``total``, say 10,000) would lose the rest silently.
      Here a full page is always followed by one more request: pagination ends on a short or
      empty page (one extra, empty request when the records fill the last page exactly), and a
      page reaching past ``total`` is logged as an unreliable total;
    * **a total higher than what the API serves** (an empty page before ``total``): re-read like
      skipped records; if it persists the run fails saying so, since completeness is unknowable.
    """

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
        if stats.log is None:
            # The session's retry reporter finds the run's log through the stats.
            stats.log = self.log
        self._seen: set[Any] = set()
        self._pages_in_pass = 0
        self._last_page_ids: tuple[Any, ...] | None = None
        self._total_unreliable = False
        self._ended_below_total: tuple[int, int] | None = None

    def init_request(self, request: Request) -> None:
        """Starts the first pass."""
        super().init_request(request)
        self._seen = set()
        self._pages_in_pass = 0
        self._last_page_ids = None
        self._total_unreliable = False
        self._ended_below_total = None
        self.stats.passes = 1

    def update_state(self, response: Response, data: list[Any] | None = None) -> None:
        """Advances the offset; at the end of a pass decides whether to re-read."""
        offset = self.current_value
        page = data or []
        body = response.json()
        total = int(body["total"])
        page_ids = tuple(record_key(r) for r in page)
        stats = self.stats
        stats.pages += 1
        stats.records_received += len(page)
        stats.api_total = total
        self._pages_in_pass += 1

        if page_ids and page_ids == self._last_page_ids:
            raise CrmPaginationLoopError(
                f"CRM API returned the same page of {self.resource} twice (offset {offset}); "
                "it seems to ignore 'offset'. Stopped to avoid an endless loop; nothing from "
                "this run was loaded."
            )
        self._last_page_ids = page_ids
        self._seen.update(page_ids)
        stats.unique_records = len(self._seen)
        # Distinct records of the whole run: a re-read pass may repeat pass 1, not more.
        page_budget = 2 * math.ceil(len(self._seen) / self.limit) + PAGE_BUDGET_SLACK
        if self._pages_in_pass > page_budget:
            raise CrmPaginationLoopError(
                f"CRM API pagination of {self.resource} served {self._pages_in_pass} pages "
                f"(up to offset {offset}) but only {len(self._seen)} distinct records "
                f"(API total {total}): it repeats records instead of ending. Stopped to avoid "
                "an endless loop; nothing from this run was loaded."
            )
        if page and offset + len(page) > total and not self._total_unreliable:
            self._total_unreliable = True
            self.log(
                f"{self.resource}: the page at offset {offset} holds records beyond the API's "
                f"total ({total}); the total is unreliable, so pagination goes on until a page "
                "is short or empty"
            )

        super().update_state(response, data)
        if len(page) >= self.limit:
            # dlt stops once the offset reaches the total; a full page may still have records
            # behind it when the total is too low, and asking costs one request.
            self._has_next_page = True
        if not page and offset < total:
            self._ended_below_total = (offset, total)
        missing = 0 if self._has_next_page else total - len(self._seen)
        every = self.progress_every_pages
        if every > 0 and stats.pages >= every:  # a long sync: short ones stay quiet
            if not self._has_next_page and missing <= 0:
                self.log(self.progress_line(done=True))
            elif stats.pages % every == 0:
                self.log(self.progress_line())
        if self._has_next_page or missing <= 0:
            return
        if stats.passes >= self.max_passes:
            if self._ended_below_total is not None:
                end, claimed = self._ended_below_total
                why = (
                    f"the API's pages ended at offset {end} although its total says {claimed}: "
                    "it counts records it does not serve, or deleted them while we read"
                )
            else:
                why = "records changed faster than offset pagination could read them"
            raise CrmIncompleteReadError(
                f"{self.resource}: read {len(self._seen)} unique records of the API's total "
                f"{total} after {stats.passes} passes ({why}). Nothing from this run was "
                "loaded; run it again."
            )
        stats.passes += 1
        if self._ended_below_total is not None:
            cause = (
                f"the API's pages ended at offset {self._ended_below_total[0]} below its total "
                f"{total}, {missing} record(s) short"
            )
        else:
            cause = f"{missing} record(s) were skipped while the API's data moved during pagination"
        self.log(
            f"{self.resource}: {cause}; re-reading from offset 0 (pass {stats.passes} of at "
            f"most {self.max_passes})"
        )
        self.current_value = self.initial_value
        self._pages_in_pass = 0
        self._last_page_ids = None
        self._ended_below_total = None
        self._has_next_page = True

    def progress_line(self, done: bool = False) -> str:
        """``deals: page 50, 5,000 of 50,000 records (10%), 1,234 rec/s, ETA 36s``.

        Records are the unique ids read so far; the total is the API's ``total`` for this run's
        request (every record in a full refresh, the changed ones in an incremental run). The
        rate counts every record received since the resource started (re-reads included) and
        the ETA divides what is left by it. ``done`` marks the last line of a resource.
        """
        stats = self.stats
        total = stats.api_total or 0
        read = min(stats.unique_records, total) if total else stats.unique_records
        elapsed = max(time.monotonic() - stats.started_at, 1e-6)
        rate = stats.records_received / elapsed
        line = f"{self.resource}: page {stats.pages:,}"
        if stats.passes > 1:
            line += f" (re-read pass {stats.passes})"
        line += f", {read:,} of {total:,} records"
        if total:
            line += f" ({100 * read / total:.0f}%)"
        line += f", {rate:,.0f} rec/s"
        if done:
            return line + f", done in {format_duration(elapsed)}"
        if total and rate > 0:
            line += f", ETA {format_duration(max(total - read, 0) / rate)}"
        return line


def format_duration(seconds: float) -> str:
    """``41s``, ``3m 05s``, ``2h 07m``: short enough for a log line, exact enough for an ETA."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"
