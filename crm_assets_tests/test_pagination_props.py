"""Property tests of page validation and ``CrmOffsetPaginator`` against malformed and hostile APIs.

Pure logic, no HTTP: responses are tiny fakes with ``json()`` (the paginator reads nothing else)
and the loop that drives the paginator is dlt's ``RESTClient.paginate`` loop, reduced to what
touches the paginator. Hypothesis runs derandomized (same examples on every run, CI included)
and without its example database, so the tests are deterministic.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from dlt.sources.helpers.requests import Request
from hypothesis import given, settings
from hypothesis import strategies as st

from crm_assets.pagination import (
    PAGE_BUDGET_SLACK,
    CrmApiError,
    CrmIncompleteReadError,
    CrmOffsetPaginator,
    CrmPageError,
    CrmPaginationLoopError,
    ResourceSyncStats,
    make_page_validator,
    record_key,
    validate_page_body,
)

PROPERTY_SETTINGS = settings(max_examples=100, derandomize=True, database=None, deadline=None)
PII = "PII-Zoë-Müller-42"  # a "record value" that must never reach an error message

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.just(PII),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=6), st.just(PII)), children, max_size=4),
    ),
    max_leaves=20,
)
# Bodies near the contract: every key of a page, each present or not, with any value.
near_pages = st.fixed_dictionaries(
    {},
    optional={
        "data": st.one_of(st.lists(json_values, max_size=4), json_values),
        "total": st.one_of(st.integers(min_value=-5, max_value=10**6), json_values),
        "error": json_values,
        PII: json_values,
    },
)


def contract_page(body: Any) -> bool:
    """The contract's definition of a page, written independently of ``validate_page_body``."""
    return (
        isinstance(body, dict)
        and "error" not in body
        and isinstance(body.get("data"), list)
        and type(body.get("total")) is int
        and body["total"] >= 0
    )


@PROPERTY_SETTINGS
@given(body=st.one_of(near_pages, json_values))
def test_validate_page_body_accepts_exactly_the_contract_pages(body: Any) -> None:
    content = orjson.dumps(body)
    if contract_page(body):
        assert validate_page_body(content) == body
    else:
        with pytest.raises(ValueError) as error:
            validate_page_body(content)
        assert PII not in str(error.value)


@PROPERTY_SETTINGS
@given(body=near_pages, cut=st.integers(min_value=0, max_value=400), junk=st.binary(max_size=40))
def test_validate_page_body_never_echoes_broken_bodies(body: Any, cut: int, junk: bytes) -> None:
    # Truncated pages, HTML error pages, binary garbage: a ValueError without the content.
    # Any other exception type escapes and fails the test.
    for content in (orjson.dumps(body)[:cut], junk, b"<html>" + PII.encode() + b"</html>"):
        try:
            validate_page_body(content)
        except ValueError as error:
            assert PII not in str(error)


@dataclass
class FakeResponse:
    """What the page hook and the paginator read of a ``requests.Response``."""

    body: Any
    content: bytes = b""
    status_code: int = 200
    request: Any = None

    def json(self, *args: Any, **kwargs: Any) -> Any:
        return self.body


@dataclass
class FakeRequest:
    url: str


@PROPERTY_SETTINGS
@given(body=st.one_of(near_pages, json_values), offset=st.integers(min_value=0, max_value=10**6))
def test_page_validator_names_resource_and_offset_never_the_body(body: Any, offset: int) -> None:
    url = f"http://127.0.0.1:1/v1/notes?api_key=k&offset={offset}&limit=100"
    response = FakeResponse(None, orjson.dumps(body), 200, FakeRequest(url))
    validate = make_page_validator("notes")
    if contract_page(body):
        validate(response)
        assert response.json() == body  # parsed once, handed to dlt
        return
    with pytest.raises(CrmPageError) as error:
        validate(response)
    message = str(error.value)
    assert f"invalid page for notes at offset {offset}:" in message
    assert PII not in message and "api_key" not in message


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
def test_page_validator_leaves_error_statuses_to_the_retry_logic(status: int) -> None:
    response = FakeResponse(None, b"<html>not a page</html>", status, FakeRequest("http://x/v1/a"))
    make_page_validator("accounts")(response)  # no exception: dlt retries or raises by status


# --- the paginator -------------------------------------------------------------------------------

Server = Callable[[int, int], tuple[list[Any], int]]  # (offset, limit) -> (records, total)


def drive(paginator: CrmOffsetPaginator, server: Server, max_requests: int) -> int:
    """dlt's paginate loop: request, ``update_state``, ``update_request``, stop when told.

    Returns the number of requests. Fails the test instead of looping past ``max_requests``.
    """
    request = Request(method="GET", url="http://127.0.0.1:1/v1/notes", params={})
    paginator.init_request(request)
    requests_made = 0
    while True:
        assert requests_made < max_requests, "pagination did not stop within its bound"
        offset, limit = int(request.params["offset"]), int(request.params["limit"])
        records, total = server(offset, limit)
        requests_made += 1
        paginator.update_state(FakeResponse({"data": records, "total": total}), records)
        paginator.update_request(request)
        if not paginator.has_next_page:
            return requests_made


def new_paginator(limit: int, max_passes: int = 3) -> CrmOffsetPaginator:
    stats = ResourceSyncStats("notes")
    return CrmOffsetPaginator("notes", stats, limit=limit, max_passes=max_passes)


def serving(records: list[Any], total: int) -> Server:
    """An API that serves ``records`` by offset and always says ``total``."""
    return lambda offset, limit: (records[offset : offset + limit], total)


def request_bound(distinct_records: int, limit: int, max_passes: int) -> int:
    """Requests a paginator may make against any API whose pages hold these distinct records."""
    per_pass = 2 * math.ceil(distinct_records / limit) + PAGE_BUDGET_SLACK + 1
    return max_passes * per_pass


@PROPERTY_SETTINGS
@given(count=st.integers(min_value=0, max_value=300), limit=st.integers(min_value=1, max_value=100))
def test_an_honest_api_is_read_completely_in_one_pass(count: int, limit: int) -> None:
    records = [{"id": f"not_{i:07d}", "n": i} for i in range(count)]
    paginator = new_paginator(limit)
    made = drive(paginator, serving(records, count), 10_000)
    assert paginator.stats.unique_records == count
    assert paginator.stats.passes == 1
    # A full last page is followed by one (empty) request: a total can be too low.
    assert made == count // limit + 1


# A hostile API: a few distinct records, served in any order, repeated, wrapped around, without
# ids, with a total that is right, too low, too high or growing with the offset.
hostile_records = st.lists(
    st.one_of(
        st.builds(lambda i: {"id": f"not_{i}"}, st.integers(min_value=0, max_value=60)),
        st.builds(lambda i: {"name": f"no id {i}"}, st.integers(min_value=0, max_value=5)),
        st.builds(lambda i: {"id": None, "x": i}, st.integers(min_value=0, max_value=5)),
        st.just({"id": {"nested": 1}}),
        st.just("not an object"),
    ),
    max_size=12,
)


@st.composite
def hostile_apis(draw: st.DrawFn) -> tuple[Server, int]:
    pages = draw(st.lists(hostile_records, min_size=1, max_size=8))
    totals = draw(
        st.lists(
            st.one_of(
                st.integers(min_value=0, max_value=200),
                st.sampled_from(["honest", "growing"]),
            ),
            min_size=1,
            max_size=8,
        )
    )
    wrap = draw(st.booleans())
    universe = {record_key(r) for page in pages for r in page}

    def server(offset: int, limit: int) -> tuple[list[Any], int]:
        index = offset // max(limit, 1)
        if index >= len(pages) and not wrap:
            records: list[Any] = []
        else:
            records = pages[index % len(pages)][:limit]
        claimed = totals[index % len(totals)]
        if claimed == "honest":
            total = sum(len(p[:limit]) for p in pages)
        elif claimed == "growing":
            total = offset + 2 * limit  # "there is always more"
        else:
            total = int(claimed)
        return records, total

    return server, len(universe)


@PROPERTY_SETTINGS
@given(
    api=hostile_apis(),
    limit=st.integers(min_value=1, max_value=12),
    max_passes=st.integers(min_value=1, max_value=3),
)
def test_pagination_always_ends_and_never_claims_a_short_read(
    api: tuple[Server, int], limit: int, max_passes: int
) -> None:
    server, distinct = api
    paginator = new_paginator(limit, max_passes)
    bound = request_bound(distinct, limit, max_passes)
    try:
        drive(paginator, server, bound)
    except CrmApiError as error:
        assert PII not in str(error)
        return
    # It ended without error: then it holds at least as many records as the API said exist.
    assert paginator.stats.unique_records >= (paginator.stats.api_total or 0)


@PROPERTY_SETTINGS
@given(
    count=st.integers(min_value=0, max_value=60),
    claimed=st.integers(min_value=0, max_value=130),
    limit=st.integers(min_value=1, max_value=12),
)
def test_a_lying_total_never_loses_records_silently(count: int, claimed: int, limit: int) -> None:
    # The API serves its records correctly by offset but its total is any number.
    records = [{"id": f"not_{i:03d}"} for i in range(count)]
    paginator = new_paginator(limit)
    try:
        drive(paginator, serving(records, claimed), request_bound(count, limit, 3))
    except CrmIncompleteReadError:
        assert claimed > count  # only a total the API cannot back fails the run
        return
    assert paginator.stats.unique_records == count


def test_an_api_that_ignores_offset_is_stopped_at_the_second_page() -> None:
    page = [{"id": f"not_{i}"} for i in range(10)]
    paginator = new_paginator(10)
    with pytest.raises(CrmPaginationLoopError, match=r"same page of notes twice \(offset 10\)"):
        drive(paginator, lambda offset, limit: (page, 1000), 100)
    assert paginator.stats.pages == 2


def test_an_api_that_wraps_around_is_stopped_by_the_page_budget() -> None:
    records = [{"id": f"not_{i}"} for i in range(25)]

    def wrapping(offset: int, limit: int) -> tuple[list[Any], int]:
        start = offset % len(records)
        return (records * 2)[start : start + limit], offset + 2 * limit

    paginator = new_paginator(10)
    with pytest.raises(CrmPaginationLoopError, match="only 25 distinct records"):
        drive(paginator, wrapping, 100)
    # 25 distinct records fill 3 pages: the budget is 2 * 3 + 10 pages.
    assert paginator.stats.pages == 2 * 3 + PAGE_BUDGET_SLACK + 1


def test_a_total_lower_than_the_records_served_does_not_stop_pagination_early() -> None:
    records = [{"id": f"not_{i:03d}"} for i in range(35)]
    paginator = new_paginator(10)
    drive(paginator, serving(records, 12), 100)
    assert paginator.stats.unique_records == 35


def test_a_total_higher_than_the_records_served_fails_after_the_rereads() -> None:
    records = [{"id": f"not_{i:03d}"} for i in range(35)]
    paginator = new_paginator(10, max_passes=2)
    with pytest.raises(CrmApiError, match="pages ended at offset 40 although its total says 90"):
        drive(paginator, serving(records, 90), 100)
    assert paginator.stats.passes == 2


def test_pages_of_records_without_ids_are_not_the_same_page() -> None:
    records = [{"name": f"no id {i}"} for i in range(30)]
    paginator = new_paginator(10)
    drive(paginator, serving(records, 30), 100)
    assert paginator.stats.unique_records == 30


def _usable_id(record: Any) -> Any:
    value = record.get("id") if isinstance(record, dict) else None
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None


@PROPERTY_SETTINGS
@given(record=json_values, other=json_values)
def test_record_key_is_the_id_else_the_content(record: Any, other: Any) -> None:
    assert record_key(record) == record_key(orjson.loads(orjson.dumps(record)))
    same_key = record_key(record) == record_key(other)
    ids = _usable_id(record), _usable_id(other)
    if None not in ids:
        assert same_key == (ids[0] == ids[1] and type(ids[0]) is type(ids[1]))
        assert record_key(record) == ids[0]
    elif ids == (None, None):
        canonical = [orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in (record, other)]
        assert same_key == (canonical[0] == canonical[1])
    else:
        assert not same_key
