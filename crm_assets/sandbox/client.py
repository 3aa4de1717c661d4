"""``SandboxClient``: the sandbox's control API (``/_sandbox/...``) over HTTP, with requests.

Environment variables: none (proxy variables are deliberately ignored: the sandbox is local).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
import requests


class SandboxError(RuntimeError):
    """A control request the sandbox rejected; carries the HTTP status and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"sandbox answered {status}: {message}")
        self.status = status
        self.message = message


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


class SandboxClient:
    """Drives a running sandbox: inspect records, mutate them, inject faults, read the log."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session = requests.Session()
        # HTTP(S)_PROXY must not reroute 127.0.0.1 traffic.
        self._session.trust_env = False

    def close(self) -> None:
        """Closes the HTTP connection pool."""
        self._session.close()

    def __repr__(self) -> str:
        return f"SandboxClient({self.base_url!r})"

    def _call(self, method: str, path: str, payload: object = None, **params: str) -> Any:
        response = self._session.request(
            method,
            f"{self.base_url}/_sandbox/{path}",
            data=None if payload is None else orjson.dumps(payload),
            headers={"content-type": "application/json"} if payload is not None else None,
            params=params or None,
            timeout=self.timeout,
        )
        if response.status_code != 200:
            try:
                message = str(orjson.loads(response.content).get("error"))
            except (orjson.JSONDecodeError, AttributeError):
                message = response.text[:200]
            raise SandboxError(response.status_code, message)
        return orjson.loads(response.content)

    # --- state -----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``{"status": "ok", "resources": [...]}``."""
        return self._call("GET", "health")

    def state(self) -> dict[str, Any]:
        """Everything: per resource count/max_updated_at/next_index, clock, faults, schedules."""
        return self._call("GET", "state")

    def counts(self) -> dict[str, int]:
        """Current record count per resource."""
        return {name: r["count"] for name, r in self.state()["resources"].items()}

    def max_updated_at(self) -> dict[str, str | None]:
        """Current newest ``updated_at`` per resource (``None`` when a resource is empty)."""
        return {name: r["max_updated_at"] for name, r in self.state()["resources"].items()}

    def records(self, resource: str) -> list[dict[str, Any]]:
        """All current records of ``resource`` in contract order (updated_at, then id)."""
        return self._call("GET", f"{resource}/records")["data"]

    # --- mutations -------------------------------------------------------------------------------

    def update(
        self,
        resource: str,
        ids: Sequence[str] | None = None,
        count: int | None = None,
        fraction: float | None = None,
    ) -> list[str]:
        """Touches records (one field changes, updated_at = the advanced clock); returns ids.

        Give exactly one of ``ids``, ``count`` or ``fraction``; counts pick records spread over
        the whole order, deterministically.
        """
        payload = _without_none(
            {"ids": None if ids is None else list(ids), "count": count, "fraction": fraction}
        )
        return self._call("POST", f"{resource}/update", payload)["ids"]

    def add(self, resource: str, count: int = 1, tie_with_max: bool = False) -> list[str]:
        """Creates records with fresh ids; ``tie_with_max`` stamps them with the current max
        updated_at instead of the advanced clock. Returns the new ids."""
        payload = {"count": count, "tie_with_max": tie_with_max}
        return self._call("POST", f"{resource}/add", payload)["ids"]

    def delete(
        self, resource: str, ids: Sequence[str] | None = None, count: int | None = None
    ) -> list[str]:
        """Hard-deletes records given by ``ids`` or ``count``; returns the deleted ids."""
        payload = _without_none({"ids": None if ids is None else list(ids), "count": count})
        return self._call("POST", f"{resource}/delete", payload)["ids"]

    def schedule(
        self,
        resource: str,
        before_request: int,
        action: str,
        *,
        ids: Sequence[str] | None = None,
        count: int | None = None,
        fraction: float | None = None,
        tie_with_max: bool = False,
    ) -> list[str]:
        """Applies ``action`` (update/add/delete, same arguments as the methods) just before the
        ``before_request``-th data request for ``resource`` (1-based, counted from now).

        Returns the ids it will touch: they are chosen (or, for add, reserved) right away.
        """
        payload = _without_none(
            {
                "before_request": before_request,
                "action": action,
                "ids": None if ids is None else list(ids),
                "count": count,
                "fraction": fraction,
                "tie_with_max": tie_with_max if action == "add" else None,
            }
        )
        return self._call("POST", f"{resource}/schedule", payload)["ids"]

    def schedules(self) -> list[dict[str, Any]]:
        """Pending scheduled mutations."""
        return self._call("GET", "schedules")

    # --- faults, latency, log --------------------------------------------------------------------

    def add_fault(
        self,
        resource: str = "*",
        *,
        after: int = 0,
        count: int = 1,
        offset: int | None = None,
        status: int | None = None,
        retry_after: int | str | None = None,
        hang_seconds: float | None = None,
        malformed: str | None = None,
        pagination: str | None = None,
        total: int | None = None,
        extra_field: str | None = None,
    ) -> dict[str, Any]:
        """Adds one fault rule (exactly one of ``status``, ``hang_seconds``, ``malformed``,
        ``pagination``, ``total``, ``extra_field``; see ``crm_assets.sandbox.app.FaultRule``).

        It hits ``count`` data requests for ``resource`` (or ``"*"``; only those at ``offset``
        if given) after letting ``after`` of them pass. Returns the stored rule.
        """
        rule = _without_none(
            {
                "resource": resource,
                "after": after,
                "count": count,
                "offset": offset,
                "status": status,
                "retry_after": retry_after,
                "hang_seconds": hang_seconds,
                "malformed": malformed,
                "pagination": pagination,
                "total": total,
                "extra_field": extra_field,
            }
        )
        return self._call("POST", "faults", rule)[0]

    def add_faults(self, rules: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Adds several fault rules at once (all or none), in order."""
        return self._call("POST", "faults", {"rules": [dict(r) for r in rules]})

    def faults(self) -> list[dict[str, Any]]:
        """Fault rules not used up yet, with their progress (seen, fired)."""
        return self._call("GET", "faults")

    def clear_faults(self) -> None:
        """Removes all fault rules."""
        self._call("DELETE", "faults")

    def set_latency(self, ms: int) -> None:
        """Adds ``ms`` milliseconds to every data request (requests still run concurrently)."""
        self._call("POST", "latency", {"ms": ms})

    def request_log(self, resource: str | None = None) -> list[dict[str, Any]]:
        """Data requests since the last reset, oldest first, optionally for one resource.

        Each entry: resource, offset, limit, updated_since (as sent), query_keys (names only),
        api_key_ok, status (None while still being answered), fault, scheduled (mutations
        applied before it). The key itself is never recorded.
        """
        if resource is None:
            return self._call("GET", "log")
        return self._call("GET", "log", resource=resource)

    def reset_log(self) -> None:
        """Empties the request log."""
        self._call("DELETE", "log")

    def reset(self) -> None:
        """Back to the generated records; clears faults, schedules, log; initial latency."""
        self._call("POST", "reset")
