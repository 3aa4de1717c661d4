"""The sandbox CRM as a raw ASGI app: the contract's data API, fault injection, control API.

Data API (see ``crm_assets.contract``)::

    GET /v1/{resource}?api_key=..&offset=0&limit=100&updated_since=2025-03-01T12:00:00Z
    -> 200 {"data": [records in (updated_at, id) order], "total": <matching the filter>}
    -> 400 / 401 / 404 {"error": "..."}

Control API (JSON in and out, no API key), under ``/_sandbox/``::

    GET    health | state | faults | schedules | latency | log[?resource=]
    GET    {resource}/records
    POST   {resource}/update | add | delete | schedule
    POST   faults (a rule, a list of rules or {"rules": [...]}) | latency {"ms": n} | reset
    DELETE faults | schedules | log

The app is raw ASGI rather than a framework because a page is served hundreds of times per
second: it is a bisect in a sorted key list plus a join of pre-serialized JSON bytes.
The API key is never logged, echoed or stored in the request log (only whether it was right).

Environment variables: ``CRM_SANDBOX_API_KEY`` (read by ``api_key_from_env``; the expected API
key, default ``sandbox-key``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson

from crm_assets.contract import (
    API_VERSION_PREFIX,
    CRM_RESOURCES,
    CURSOR_FIELD,
    MAX_PAGE_SIZE,
    PRIMARY_KEY,
    CrmResource,
)
from crm_assets.sandbox.data import SandboxStore, format_us, parse_us

API_KEY_ENV = "CRM_SANDBOX_API_KEY"
DEFAULT_SANDBOX_API_KEY = "sandbox-key"
CONTROL_PREFIX = "/_sandbox/"
# Bounded so a long benchmark cannot grow the server without limit (~50 MB when full).
REQUEST_LOG_SIZE = 50_000

MALFORMED_KINDS = (
    "not_json",
    "missing_data",
    "data_not_list",
    "error_key",
    "missing_total",
    "truncated",
    "record_without_id",
    "record_bad_value",
    "record_without_cursor",
)
# Pagination faults: APIs whose paging would never end (see FaultRule).
PAGINATION_KINDS = ("ignore_offset", "endless")
# The value of a field added by an ``extra_field`` fault (not personal data, easy to find).
EXTRA_FIELD_VALUE = "sandbox-extra-field"
_CONTRACT_FIELDS = frozenset(c.name for r in CRM_RESOURCES for c in r.columns)
SCHEDULE_ACTIONS = ("update", "add", "delete")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = b"application/json"
_HTML = b"text/html; charset=utf-8"
_STATUS_ERRORS = {
    401: "invalid api_key",
    403: "forbidden",
    429: "rate limit exceeded",
    500: "internal server error",
    502: "bad gateway",
    503: "service unavailable",
    504: "gateway timeout",
}
# Wrong-typed stand-ins per contract type, for the record_bad_value fault; a text column gets a
# number. Types are tried in this order so that the damage is a classic one (string in a number).
_BAD_VALUES: Mapping[str, object] = {
    "bigint": "1,234",
    "bool": "yes",
    "decimal": "12,50 EUR",
    "date": "31/12/2025",
    "timestamp": "yesterday",
    "text": 12345,
}
_NOT_JSON_BODY = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Bad Gateway</h1><p>The upstream server is temporarily unavailable.</p>"
    b"</body></html>\n"
)

logger = logging.getLogger(__name__)


def api_key_from_env() -> str:
    """The API key the data API expects: ``CRM_SANDBOX_API_KEY`` or ``sandbox-key``."""
    return os.environ.get(API_KEY_ENV) or DEFAULT_SANDBOX_API_KEY


class BadRequest(ValueError):
    """A request the sandbox rejects with 400 (the message is safe to return)."""


# --- fault rules and scheduled mutations ---------------------------------------------------------


@dataclass
class FaultRule:
    """One injected fault: which data requests it hits and what it does to them.

    A rule counts the data requests that match it (``resource`` or ``"*"``, and ``offset`` if
    set) from when it was added, lets ``after`` of them pass and then fires on ``count`` of
    them; used-up rules are dropped. When several rules would fire on one request the oldest
    wins and the others count it as passed. Only requests with a valid key and valid
    parameters are matched (401/400 answers never consume a fault).

    Effects (exactly one): ``status`` (with an optional ``retry_after``), ``hang_seconds``
    (sleeps, then answers normally), ``malformed`` (see ``MALFORMED_KINDS``), ``pagination``
    (``ignore_offset``: every page is the one at offset 0; ``endless``: the page at
    ``offset % matching records`` with a ``total`` of ``offset + 2 * limit``, i.e. an API that
    wraps around and always promises more), ``total`` (a correct page whose ``total`` lies and
    says this number) and ``extra_field`` (every record of the page gets this field, a field the
    contract does not know, valued ``EXTRA_FIELD_VALUE``).
    """

    id: int
    resource: str = "*"
    after: int = 0
    count: int = 1
    offset: int | None = None
    status: int | None = None
    retry_after: int | str | None = None
    hang_seconds: float | None = None
    malformed: str | None = None
    pagination: str | None = None
    total: int | None = None
    extra_field: str | None = None
    seen: int = 0
    fired: int = 0

    def matches(self, resource: str, offset: int) -> bool:
        """Whether a data request for ``resource`` at ``offset`` is one this rule counts."""
        return self.resource in ("*", resource) and self.offset in (None, offset)

    def effect(self) -> str:
        """A short description of the effect for the request log, e.g. ``status=503``."""
        if self.status is not None:
            return f"status={self.status}"
        if self.hang_seconds is not None:
            return f"hang_seconds={self.hang_seconds:g}"
        if self.pagination is not None:
            return f"pagination={self.pagination}"
        if self.total is not None:
            return f"total={self.total}"
        if self.extra_field is not None:
            return f"extra_field={self.extra_field}"
        return f"malformed={self.malformed}"

    def to_json(self) -> dict[str, Any]:
        """The rule and its progress as JSON-ready data."""
        return dataclasses.asdict(self)


_EFFECTS = ("status", "hang_seconds", "malformed", "pagination", "total", "extra_field")
_RULE_FIELDS = frozenset({"resource", "after", "count", "offset", "retry_after", *_EFFECTS})


def parse_fault_rule(data: object, resources: Iterable[str], rule_id: int) -> FaultRule:
    """Validates one fault rule from JSON; ``BadRequest`` says what is wrong with it."""
    if not isinstance(data, dict):
        raise BadRequest("a fault rule must be a JSON object")
    _reject_unknown_keys(data, _RULE_FIELDS, "fault rule")
    resource = data.get("resource", "*")
    if resource != "*" and resource not in resources:
        raise BadRequest(f"fault rule: unknown resource {resource!r} (use a name or '*')")
    rule = FaultRule(
        id=rule_id,
        resource=resource,
        after=_int_arg(data, "after", 0, minimum=0),
        count=_int_arg(data, "count", 1, minimum=1),
        offset=_int_arg(data, "offset", None, minimum=0),
        status=_int_arg(data, "status", None, minimum=100, maximum=599),
    )
    effects = [k for k in _EFFECTS if data.get(k) is not None]
    if len(effects) != 1:
        raise BadRequest(f"a fault rule needs exactly one of {', '.join(_EFFECTS)}")
    retry_after = data.get("retry_after")
    if retry_after is not None:
        if rule.status is None:
            raise BadRequest("retry_after only goes with status")
        # An int is seconds; a string is sent as is (e.g. an HTTP date).
        if isinstance(retry_after, bool) or not isinstance(retry_after, (int, str)):
            raise BadRequest("retry_after must be an integer number of seconds or a string")
        if isinstance(retry_after, int) and retry_after < 0:
            raise BadRequest("retry_after must be >= 0")
        rule.retry_after = retry_after
    hang = data.get("hang_seconds")
    if hang is not None:
        if isinstance(hang, bool) or not isinstance(hang, (int, float)) or not 0 < hang <= 3600:
            raise BadRequest("hang_seconds must be a number in (0, 3600]")
        rule.hang_seconds = float(hang)
    malformed = data.get("malformed")
    if malformed is not None:
        if malformed not in MALFORMED_KINDS:
            raise BadRequest(f"malformed must be one of {', '.join(MALFORMED_KINDS)}")
        rule.malformed = malformed
    pagination = data.get("pagination")
    if pagination is not None:
        if pagination not in PAGINATION_KINDS:
            raise BadRequest(f"pagination must be one of {', '.join(PAGINATION_KINDS)}")
        rule.pagination = pagination
    rule.total = _int_arg(data, "total", None, minimum=0)
    extra_field = data.get("extra_field")
    if extra_field is not None:
        if not isinstance(extra_field, str) or not extra_field.isidentifier():
            raise BadRequest("extra_field must be a field name (letters, digits, underscores)")
        if extra_field in _CONTRACT_FIELDS:
            raise BadRequest(f"extra_field {extra_field!r} is a contract field, not a new one")
        rule.extra_field = extra_field
    return rule


@dataclass
class ScheduledMutation:
    """A mutation applied just before the ``before_request``-th data request for a resource.

    Requests are counted (1-based) from when it was scheduled; like faults, only requests with a
    valid key and parameters count. The ids it touches are fixed when it is scheduled.
    """

    id: int
    resource: str
    before_request: int
    action: str
    ids: list[str]
    tie_with_max: bool = False
    seen: int = 0

    def to_json(self) -> dict[str, Any]:
        """The schedule and its progress as JSON-ready data."""
        return dataclasses.asdict(self)


# --- helpers -------------------------------------------------------------------------------------


def _reject_unknown_keys(data: Mapping[str, object], allowed: Iterable[str], what: str) -> None:
    # Typos like "cout" would otherwise silently fall back to defaults and confuse a test.
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise BadRequest(f"{what}: unknown field(s) {', '.join(unknown)}")


def _int_arg(
    data: Mapping[str, object],
    key: str,
    default: int | None,
    minimum: int | None = None,
    maximum: int | None = None,
) -> Any:
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise BadRequest(_range_message(key, minimum or 0, maximum))
    return value


def _ids_arg(data: Mapping[str, object]) -> list[str] | None:
    ids = data.get("ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise BadRequest("ids must be a list of strings")
    return ids


def _fraction_arg(data: Mapping[str, object]) -> float | None:
    fraction = data.get("fraction")
    if fraction is None:
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise BadRequest("fraction must be a number")
    return float(fraction)


def _bool_arg(data: Mapping[str, object], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false")
    return value


def _parse_count(raw: str, name: str, minimum: int, maximum: int | None) -> int:
    # int() would also accept " 5", "+5" and "5_000"; the API only takes plain digits.
    if not (raw.isascii() and raw.isdigit()):
        raise BadRequest(_range_message(name, minimum, maximum))
    value = int(raw)
    if value < minimum or (maximum is not None and value > maximum):
        raise BadRequest(_range_message(name, minimum, maximum))
    return value


def _range_message(name: str, minimum: int, maximum: int | None) -> str:
    if maximum is None:
        return f"{name} must be an integer >= {minimum}"
    return f"{name} must be an integer between {minimum} and {maximum}"


def _logged_value(raw: str | None) -> int | str | None:
    if raw is not None and raw.isascii() and raw.isdigit():
        return int(raw)
    return raw


def _page_body(chunks: Sequence[bytes], total: int | None) -> bytes:
    data = b'{"data":[' + b",".join(chunks) + b"]"
    if total is None:
        return data + b"}"
    return data + b',"total":' + str(total).encode() + b"}"


def _error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = _JSON,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


# --- the app -------------------------------------------------------------------------------------


@dataclass
class _Answer:
    status: int
    body: bytes
    content_type: bytes = _JSON
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class SandboxApp:
    """The ASGI app: serves ``store`` under the contract's paths and the control API.

    All state lives in one event loop, so no locks are needed.
    """

    def __init__(self, store: SandboxStore, api_key: str, latency_ms: int = 0) -> None:
        self.store = store
        self._api_key = api_key.encode("utf-8")
        self.initial_latency_ms = latency_ms
        self.latency_ms = latency_ms
        self.faults: list[FaultRule] = []
        self.schedules: list[ScheduledMutation] = []
        self.request_log: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_SIZE)
        self._next_id = 1
        self._data_prefix = API_VERSION_PREFIX + "/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith(self._data_prefix):
                await self._data_request(scope, send)
            elif path.startswith(CONTROL_PREFIX):
                await self._control_request(scope, receive, send)
            else:
                await _respond(send, 404, _error_body("not found"))
        elif kind == "lifespan":
            # Nothing to set up (the store is built before serving); acknowledge politely.
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    def reset(self) -> None:
        """Back to the initial state: records, clock, faults, schedules, latency and log."""
        self.store.reset()
        self.faults.clear()
        self.schedules.clear()
        self.request_log.clear()
        self.latency_ms = self.initial_latency_ms

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    # --- data API --------------------------------------------------------------------------------

    async def _data_request(self, scope: Scope, send: Send) -> None:
        name = scope["path"][len(self._data_prefix) :]
        params = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        values: dict[str, list[str]] = {}
        for key, value in params:
            values.setdefault(key, []).append(value)
        keys = values.get("api_key", [])
        key_ok = bool(keys) and all(hmac.compare_digest(k.encode(), self._api_key) for k in keys)
        # Logged on arrival (status filled in when answered) so a hanging request shows up too.
        # Only parameter names and whether the key was right: never the key itself.
        entry: dict[str, Any] = {
            "resource": name,
            "offset": _logged_value(values.get("offset", [None])[0]),
            "limit": _logged_value(values.get("limit", [None])[0]),
            "updated_since": values.get("updated_since", [None])[0],
            "query_keys": [key for key, _ in params],
            "api_key_ok": key_ok,
            "status": None,
            "fault": None,
            "scheduled": [],
        }
        self.request_log.append(entry)
        if scope["method"] not in ("GET", "HEAD"):
            answer = _Answer(405, _error_body("method not allowed"), headers=[(b"allow", b"GET")])
        else:
            answer = await self._answer_data(name, values, key_ok, entry)
        entry["status"] = answer.status
        await _respond(send, answer.status, answer.body, answer.content_type, answer.headers)

    async def _answer_data(
        self, name: str, values: dict[str, list[str]], key_ok: bool, entry: dict[str, Any]
    ) -> _Answer:
        table = self.store.tables.get(name)
        if table is None:
            return _Answer(404, _error_body(f"unknown resource {name!r}"))
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000)
        if not key_ok:
            missing = not values.get("api_key")
            return _Answer(401, _error_body("missing api_key" if missing else "invalid api_key"))
        try:
            offset, limit, since_us = self._parse_params(values)
        except BadRequest as exc:
            return _Answer(400, _error_body(str(exc)))
        for mutation in self._due_mutations(name):
            entry["scheduled"].append(self._apply_mutation(mutation))
        rule = self._take_fault(name, offset)
        if rule is not None:
            entry["fault"] = rule.effect()
            if rule.hang_seconds is not None:
                await asyncio.sleep(rule.hang_seconds)
            if rule.status is not None:
                headers = []
                if rule.retry_after is not None:
                    headers.append((b"retry-after", str(rule.retry_after).encode()))
                message = _STATUS_ERRORS.get(rule.status, "injected fault")
                return _Answer(rule.status, _error_body(message), headers=headers)
        # The page is cut after any sleep, so it reflects the state when the answer is sent.
        chunks, total = table.page(offset, limit, since_us)
        if rule is not None:
            if rule.malformed is not None:
                return self._malformed(rule.malformed, table.resource, chunks, total)
            if rule.pagination == "ignore_offset":
                chunks, total = table.page(0, limit, since_us)
            elif rule.pagination == "endless":
                # ``total`` is the real number of matching records: wrap around it.
                chunks, _ = table.page(offset % total if total else 0, limit, since_us)
                total = offset + 2 * limit
            elif rule.total is not None:
                total = rule.total
            elif rule.extra_field is not None:
                chunks = [_with_field(c, rule.extra_field) for c in chunks]
        return _Answer(200, _page_body(chunks, total))

    @staticmethod
    def _parse_params(values: dict[str, list[str]]) -> tuple[int, int, int | None]:
        for key in ("offset", "limit", "updated_since"):
            if len(values.get(key, ())) > 1:
                raise BadRequest(f"duplicate query parameter {key}")
        offset_raw = values.get("offset", ["0"])[0]
        limit_raw = values.get("limit", [str(MAX_PAGE_SIZE)])[0]
        offset = _parse_count(offset_raw, "offset", 0, None)
        limit = _parse_count(limit_raw, "limit", 1, MAX_PAGE_SIZE)
        since_raw = values.get("updated_since", [None])[0]
        since_us = None
        if since_raw is not None:
            try:
                since_us = parse_us(since_raw)
            except (ValueError, OverflowError):
                raise BadRequest(
                    "updated_since must be an ISO-8601 timestamp with an explicit UTC offset, "
                    "e.g. 2025-03-01T12:00:00Z or 2025-03-01T12:00:00%2B00:00 "
                    "(a literal '+' in a query string means a space)"
                ) from None
        return offset, limit, since_us

    def _take_fault(self, name: str, offset: int) -> FaultRule | None:
        chosen: FaultRule | None = None
        for rule in self.faults:
            if not rule.matches(name, offset):
                continue
            rule.seen += 1
            if chosen is None and rule.seen > rule.after:
                chosen = rule
                rule.fired += 1
        if chosen is not None and chosen.fired >= chosen.count:
            self.faults.remove(chosen)
        return chosen

    def _due_mutations(self, name: str) -> list[ScheduledMutation]:
        due = []
        for mutation in self.schedules:
            if mutation.resource == name:
                mutation.seen += 1
                if mutation.seen >= mutation.before_request:
                    due.append(mutation)
        for mutation in due:
            self.schedules.remove(mutation)
        return due

    def _apply_mutation(self, mutation: ScheduledMutation) -> dict[str, Any]:
        store, name = self.store, mutation.resource
        if mutation.action == "update":
            ids = store.update(name, ids=mutation.ids, missing_ok=True)
        elif mutation.action == "delete":
            ids = store.delete(name, ids=mutation.ids, missing_ok=True)
        else:
            ids = store.add(name, tie_with_max=mutation.tie_with_max, reserved_ids=mutation.ids)
        return {"action": mutation.action, "ids": ids}

    @staticmethod
    def _malformed(kind: str, resource: CrmResource, chunks: list[bytes], total: int) -> _Answer:
        if kind == "not_json":
            return _Answer(200, _NOT_JSON_BODY, content_type=_HTML)
        if kind == "missing_data":
            return _Answer(200, orjson.dumps({"total": total}))
        if kind == "data_not_list":
            return _Answer(200, orjson.dumps({"data": {"x": 1}, "total": total}))
        if kind == "error_key":
            return _Answer(200, orjson.dumps({"error": "internal", "data": [], "total": total}))
        if kind == "missing_total":
            return _Answer(200, _page_body(chunks, None))
        if kind == "truncated":
            body = _page_body(chunks, total)
            return _Answer(200, body[: len(body) // 2])
        # The record_* kinds damage one record in the middle of the page (an empty page has
        # nothing to damage and is served as is).
        if chunks:
            chunks = list(chunks)
            middle = len(chunks) // 2
            record = orjson.loads(chunks[middle])
            if kind == "record_without_id":
                record.pop(PRIMARY_KEY, None)
            elif kind == "record_without_cursor":
                record.pop(CURSOR_FIELD, None)
            else:
                name, value = _bad_value_field(resource)
                record[name] = value
            chunks[middle] = orjson.dumps(record)
        return _Answer(200, _page_body(chunks, total))

    # --- control API -----------------------------------------------------------------------------

    async def _control_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        parts = [p for p in scope["path"][len(CONTROL_PREFIX) :].split("/") if p]
        query = dict(parse_qsl(scope["query_string"].decode("latin-1")))
        raw = await _read_body(receive) if method in ("POST", "PUT", "DELETE") else b""
        try:
            payload = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            await _respond(send, 400, _error_body("request body is not valid JSON"))
            return
        try:
            result = self._control(method, parts, query, payload)
        except LookupError as exc:
            await _respond(send, 404, _error_body(str(exc.args[0]) if exc.args else "not found"))
            return
        except (ValueError, TypeError) as exc:
            await _respond(send, 400, _error_body(str(exc)))
            return
        except Exception:
            # A sandbox bug: keep serving, say so, and leave the traceback on stderr.
            logger.exception("control request %s %s failed", method, "/".join(parts))
            await _respond(send, 500, _error_body("sandbox control request failed"))
            return
        if result is None:
            await _respond(send, 405, _error_body(f"{method} not allowed here"))
            return
        body = result if isinstance(result, bytes) else orjson.dumps(result)
        await _respond(send, 200, body)

    def _control(
        self, method: str, parts: list[str], query: Mapping[str, str], payload: Any
    ) -> Any:
        """Dispatches a control request; returns JSON-ready data, bytes, or None for 405."""
        route = "/".join(parts)
        if route == "health" and method == "GET":
            return {"status": "ok", "resources": list(self.store.tables)}
        if route == "state" and method == "GET":
            return self._state()
        if route == "reset" and method == "POST":
            self.reset()
            return {"reset": True}
        if route == "log":
            if method == "GET":
                wanted = query.get("resource")
                return [e for e in self.request_log if wanted in (None, e["resource"])]
            if method == "DELETE":
                self.request_log.clear()
                return {"cleared": True}
            return None
        if route == "faults":
            return self._faults_route(method, payload)
        if route == "schedules":
            if method == "GET":
                return [s.to_json() for s in self.schedules]
            if method == "DELETE":
                self.schedules.clear()
                return {"cleared": True}
            return None
        if route == "latency":
            if method in ("POST", "PUT"):
                if not isinstance(payload, dict):
                    raise BadRequest('expected a JSON object like {"ms": 50}')
                _reject_unknown_keys(payload, {"ms"}, "latency")
                ms = _int_arg(payload, "ms", None, minimum=0, maximum=600_000)
                if ms is None:
                    raise BadRequest("ms is required")
                self.latency_ms = ms
            elif method != "GET":
                return None
            return {"ms": self.latency_ms}
        if len(parts) == 2:
            return self._resource_route(method, parts[0], parts[1], payload)
        raise LookupError(f"no control endpoint /_sandbox/{route}")

    def _state(self) -> dict[str, Any]:
        resources = {}
        for name, table in self.store.tables.items():
            newest = table.max_updated_us
            resources[name] = {
                "count": len(table),
                "max_updated_at": None if newest is None else format_us(newest),
                "next_index": table.next_index,
            }
        return {
            "resources": resources,
            "clock": format_us(self.store.clock_us),
            "seed": self.store.seed,
            "latency_ms": self.latency_ms,
            "faults": [r.to_json() for r in self.faults],
            "schedules": [s.to_json() for s in self.schedules],
            "logged_requests": len(self.request_log),
        }

    def _faults_route(self, method: str, payload: Any) -> Any:
        if method == "GET":
            return [r.to_json() for r in self.faults]
        if method == "DELETE":
            self.faults.clear()
            return {"cleared": True}
        if method != "POST":
            return None
        if isinstance(payload, dict) and "rules" in payload:
            _reject_unknown_keys(payload, {"rules"}, "faults")
            payload = payload["rules"]
        items = payload if isinstance(payload, list) else [payload]
        # Validate all before adding any, so a bad list leaves the rules unchanged.
        rules = [parse_fault_rule(item, self.store.tables, 0) for item in items]
        for rule in rules:
            rule.id = self._new_id()
        self.faults.extend(rules)
        return [r.to_json() for r in rules]

    def _resource_route(self, method: str, name: str, action: str, payload: Any) -> Any:
        table = self.store.table(name)
        if action == "records":
            if method != "GET":
                return None
            return _page_body(table.all_json(), len(table))
        if action not in ("update", "add", "delete", "schedule"):
            raise LookupError(f"no control endpoint /_sandbox/{name}/{action}")
        if method != "POST":
            return None
        if not isinstance(payload, dict):
            raise BadRequest("expected a JSON object")
        if action == "schedule":
            return {"ids": self._schedule(name, payload)}
        return {"ids": self._mutate(name, action, payload)}

    def _mutate(self, name: str, action: str, payload: dict[str, Any]) -> list[str]:
        store = self.store
        if action == "update":
            _reject_unknown_keys(payload, {"ids", "count", "fraction"}, "update")
            return store.update(
                name,
                ids=_ids_arg(payload),
                count=_int_arg(payload, "count", None, minimum=0),
                fraction=_fraction_arg(payload),
            )
        if action == "add":
            _reject_unknown_keys(payload, {"count", "tie_with_max"}, "add")
            count = _int_arg(payload, "count", 1, minimum=1)
            return store.add(name, count, tie_with_max=_bool_arg(payload, "tie_with_max"))
        _reject_unknown_keys(payload, {"ids", "count"}, "delete")
        return store.delete(
            name, ids=_ids_arg(payload), count=_int_arg(payload, "count", None, minimum=0)
        )

    def _schedule(self, name: str, payload: dict[str, Any]) -> list[str]:
        _reject_unknown_keys(
            payload,
            {"before_request", "action", "ids", "count", "fraction", "tie_with_max"},
            "schedule",
        )
        before_request = _int_arg(payload, "before_request", None, minimum=1)
        if before_request is None:
            raise BadRequest("before_request (1-based request number) is required")
        action = payload.get("action")
        if action not in SCHEDULE_ACTIONS:
            raise BadRequest(f"action must be one of {', '.join(SCHEDULE_ACTIONS)}")
        store = self.store
        tie_with_max = False
        # The ids are fixed now, so the caller knows which records will move.
        if action == "add":
            allowed = {"before_request", "action", "count", "tie_with_max"}
            _reject_unknown_keys(payload, allowed, "add")
            ids = store.reserve_ids(name, _int_arg(payload, "count", 1, minimum=1))
            tie_with_max = _bool_arg(payload, "tie_with_max")
        else:
            allowed = {"before_request", "action", "ids", "count"}
            if action == "update":
                allowed.add("fraction")
            _reject_unknown_keys(payload, allowed, action)
            ids = _ids_arg(payload)
            count = _int_arg(payload, "count", None, minimum=0)
            fraction = _fraction_arg(payload)
            if sum(arg is not None for arg in (ids, count, fraction)) != 1:
                raise BadRequest("give exactly one of ids, count or fraction")
            if ids is not None:
                ids = store.table(name).check_ids(ids)
            else:
                ids = store.pick(name, count, fraction)
        self.schedules.append(
            ScheduledMutation(
                id=self._new_id(),
                resource=name,
                before_request=before_request,
                action=action,
                ids=list(ids),
                tie_with_max=tie_with_max,
            )
        )
        return list(ids)


def _with_field(chunk: bytes, name: str) -> bytes:
    record = orjson.loads(chunk)
    record[name] = EXTRA_FIELD_VALUE
    return orjson.dumps(record)


def _bad_value_field(resource: CrmResource) -> tuple[str, object]:
    for kind, value in _BAD_VALUES.items():
        for column in resource.columns:
            if column.type == kind and column.name not in (PRIMARY_KEY, CURSOR_FIELD):
                return column.name, value
    raise AssertionError("a resource always has created_at")  # pragma: no cover
