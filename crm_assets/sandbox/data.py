"""Deterministic CRM records for the sandbox: a contract-driven generator and the in-memory store.

Everything is derived from ``crm_assets.contract``: a resource added to ``CRM_RESOURCES`` gets
records with no change here. Values come from the column's contract type (with ``choices`` and
nullability respected), and well-known field names (``name``, ``body``, ``website``,
``currency``, ``*_id`` ...) get nicer, realistic values.

The store keeps each record only as pre-serialized JSON bytes (orjson) plus a list of sort keys
``(updated_at as epoch microseconds, id)``, so a page is a bisect plus a ``b",".join`` and 4 x
200,000 records fit in a few hundred MB. Ordering and ``updated_since`` filtering use the numeric
key, never string comparison of timestamps.

Environment variables: none.
"""

from __future__ import annotations

import bisect
import datetime as dt
import functools
import random
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import orjson

from crm_assets.contract import (
    CRM_RESOURCES,
    CURSOR_FIELD,
    PRIMARY_KEY,
    CrmColumn,
    CrmResource,
    format_timestamp,
    parse_timestamp,
)

DEFAULT_RECORDS = 1000
NULL_PROBABILITY = 0.15
# Share of records forced to share their updated_at with another record, so that pagination and
# cursor handling always meet ties (random minutes alone rarely collide in small data sets).
TIE_FRACTION = 0.05
# Share of generated records that were never changed after creation (created_at == updated_at).
UNCHANGED_FRACTION = 0.25
ID_DIGITS = 7
CREATED_AT_FIELD = "created_at"

RANGE_START = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
RANGE_END = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

T = TypeVar("T")

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_ONE_US = dt.timedelta(microseconds=1)
US_PER_SECOND = 1_000_000
US_PER_MINUTE = 60 * US_PER_SECOND
_US_PER_DAY = 24 * 60 * US_PER_MINUTE


# --- time and ids --------------------------------------------------------------------------------


def to_us(value: dt.datetime) -> int:
    """Epoch microseconds of an aware datetime (exact integer arithmetic, no float rounding)."""
    return (value - _EPOCH) // _ONE_US


def from_us(us: int) -> dt.datetime:
    """The aware UTC datetime of epoch microseconds."""
    return _EPOCH + dt.timedelta(microseconds=us)


_START_US = to_us(RANGE_START)
_END_US = to_us(RANGE_END)
_DAY_PREFIXES: dict[int, str] = {}
_CLOCK_MINUTES = tuple(f"{m // 60:02d}:{m % 60:02d}:" for m in range(24 * 60))
_CLOCK_SECONDS = tuple(f"{s:02d}Z" for s in range(60))


def format_us(us: int) -> str:
    """Formats epoch microseconds exactly like ``contract.format_timestamp``, but fast.

    Generation formats two timestamps per record (1.6 million at 4 x 200,000), so whole-second
    values reuse the contract's formatting of their day and only append ``HH:MM:SS``; anything
    with a fraction goes through ``format_timestamp`` itself.
    """
    day, rest = divmod(us, _US_PER_DAY)
    if rest % US_PER_SECOND:
        return format_timestamp(from_us(us))
    prefix = _DAY_PREFIXES.get(day)
    if prefix is None:
        # "YYYY-MM-DDT" as the contract writes it for midnight of that day.
        prefix = _DAY_PREFIXES[day] = format_timestamp(from_us(day * _US_PER_DAY))[:11]
    minute, second = divmod(rest // US_PER_SECOND, 60)
    return prefix + _CLOCK_MINUTES[minute] + _CLOCK_SECONDS[second]


def parse_us(text: str) -> int:
    """Epoch microseconds of a contract timestamp (``Z``, ``+00:00``, other offsets, fractions).

    Raises ``ValueError`` for anything that is not an ISO-8601 timestamp with an explicit offset.
    """
    return to_us(parse_timestamp(text))


def id_prefix(resource_name: str) -> str:
    """The id prefix of a resource: the first three letters of its name (``deals`` -> ``dea``)."""
    return resource_name[:3]


def make_id(resource_name: str, index: int) -> str:
    """The id of the ``index``-th (1-based) record of a resource, e.g. ``dea_0000001``."""
    return f"{id_prefix(resource_name)}_{index:0{ID_DIGITS}d}"


def seed_for(seed: int, resource_name: str) -> int:
    """The generator seed of one resource: stable across processes (crc32, never ``hash()``)."""
    return seed + zlib.crc32(resource_name.encode("utf-8"))


# --- value pools ---------------------------------------------------------------------------------
# Deliberately full of what breaks naive pipelines: accents, CJK, emoji (with ZWJ sequences),
# apostrophes and double quotes, backslashes, newlines.
# fmt: off

_FIRST_NAMES = (
    "Anna", "José", "Zoë", "François", "Łukasz", "Søren", "Ngozi", "Yuki", "Mei", "Jürgen",
    "Aoife", "Siddharth", "Chloé", "Dmitri", "Ana-María", "Björn", "Fatima", "Oğuz", "Liam",
    "Émilie", "Kenji", "Priya", "Nuño", "Sarah",
)
_LAST_NAMES = (
    "Müller", "García", "Nakamura", "Kowalski", "Ólafsson", "李", "Nguyễn", "Dubois", "O'Connor",
    "Smith", "Øvergaard", "Çelik", "Andersson", "Rossi", "田中", "Schröder", "Dvořák", "Peña",
    "van der Berg", "Okafor", "Johansson", "Brontë",
)
_COMPANY_CORES = (
    "Acme", "Müller & Söhne", "Nordlicht", "Café Crème", "株式会社サクラ", "Zoë's Bakery",
    "O'Brien Logistics", "Ærø Shipping", "Björk Design", "Şeker", "Żabka Trading", "北京星辰科技",
    "Société Générale du Nord", "Peña Hermanos", "Dvořák Audio", "Blue Harbor", "Globex",
    "Initech", "Umbrella Health", "Stark Industries", "\"Quotes\" & Co", "Ōkami Games",
    "Smørrebrød Catering", "Kaffeehaus Wien", "Ñandú Software", "Rocket 🚀 Labs",
)
_COMPANY_SUFFIXES = ("GmbH", "AG", "Ltd", "Inc.", "S.A.", "K.K.", "Oy", "SARL", "BV", "", "")
_DEAL_PRODUCTS = (
    "Enterprise licence", "Renewal 2025", "Pilot", "Onboarding package", "Support upgrade",
    "Expansion (EMEA)", "Migración", "導入支援", "Data add-on", "Seats +50", "Multi-year 💼",
    "Proof of concept", "Upsell \u2013 Analytics",
)
_SUBJECTS = (
    "Intro call", "Discovery", "Demo follow-up", "Pricing question", "Rückruf", "Support ☎️",
    "Quarterly review", "Contract renewal", "打ち合わせ", "Kick-off 🚀", "Renewal risk ⚠️",
    "“Quick” sync", "Angebot überarbeiten", "見積もりの確認", "Notes from the 'big' demo",
    "Follow-up: pricing", "Meeting notes — Q3 review", "Réunion de suivi",
)
_SENTENCES = (
    "Customer asked for a revised quote by Friday.",
    "Spoke with the CFO; budget is approved for Q3.",
    "They said: \"we'll sign once legal is happy\".",
    "Prefers email over calls — don't phone before 10:00.",
    "Décision attendue après la réunion du comité.",
    "Angebot wurde überarbeitet, Rabatt 5 % eingeräumt.",
    "見積もりを再送しました。来週に返答予定です。",
    "客户希望下周安排演示。",
    "Great call 🎉 next step: technical deep-dive 👩‍💻",
    "Competitor 'X' is cheaper, but lacks SSO.",
    "Shared file at C:\\Shares\\Sales\\offer_v2.xlsx",
    "Follow up in 2 weeks.",
    "Champion moved to another team 😕",
    "Asked about GDPR & data residency (EU only).",
    "¿Podemos reunirnos el martes?",
    "Tab\tseparated\tnotes from the import.",
)
_SENTENCE_JOINERS = (" ", "\n", "\n\n", "\r\n")
_INDUSTRIES = (
    "Software", "Manufacturing", "Retail", "Healthcare", "Financial services", "Logistics",
    "Education", "Energy", "Media", "Agriculture", "Hospitality", "Biotech", "Télécoms",
)
_CURRENCIES = ("EUR", "USD", "GBP", "JPY", "CHF", "SEK", "BRL", "CNY", "INR")
_OUTCOMES = (
    "connected", "left voicemail", "no answer", "busy", "wrong number", "meeting booked",
)
_CITIES = ("Berlin", "São Paulo", "Zürich", "東京", "Kraków", "Reykjavík", "Montréal", "Lagos")
_COUNTRIES = ("DE", "BR", "CH", "JP", "PL", "IS", "CA", "NG", "US", "GB", "FR", "IN")
_STATUSES = ("active", "inactive", "pending")
_PRIORITIES = ("low", "medium", "high")
_JOB_TITLES = ("CEO", "Head of Sales", "Procurement", "CTO", "Office manager", "Directrice")
_WORDS = (
    "blue", "north", "Ñandú", "café", "delta", "übung", "星", "🚀", "O'Neil", "\"alpha\"",
    "zeta", "smørrebrød", "ωmega", "river", "42",
)
_TLDS = ("com", "de", "co.uk", "fr", "co.jp", "io", "com.br")
# fmt: on
# People-like references have no resource of their own; they point at a small pool of users.
_USER_STEMS = frozenset({"owner", "author", "user", "assignee", "creator", "rep", "manager"})
_USER_PREFIX = "usr"
_USER_POOL = 60
_UNKNOWN_REFERENCE_POOL = 500
_BODY_FIELDS = frozenset(
    {"body", "description", "content", "comment", "comments", "summary", "text", "notes"}
)
_PERSON_RESOURCES = frozenset({"contacts", "leads", "users", "people", "persons", "employees"})
_MAX_DECIMAL = 99_999_999_999.99


@functools.lru_cache(maxsize=4096)
def ascii_slug(text: str, separator: str = "-") -> str:
    """Lower-case ASCII of ``text`` for e-mail addresses and host names (accents dropped)."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    words = "".join(ch if ch.isalnum() else " " for ch in folded).split()
    return separator.join(words)


# --- value factories -----------------------------------------------------------------------------


def _below(rng: random.Random, n: int) -> int:
    """A uniform int in ``range(n)``, several times faster than ``randrange``.

    Generation draws millions of them; the tiny float bias is irrelevant for fake data.
    """
    return int(rng.random() * n)


def _pick(rng: random.Random, options: Sequence[T]) -> T:
    """A uniform choice, the fast way (see ``_below``)."""
    return options[int(rng.random() * len(options))]


@dataclass(slots=True)
class RecordContext:
    """What a value factory may look at: the record's number and timestamps."""

    index: int
    created_us: int
    updated_us: int


Factory = Callable[[random.Random, RecordContext], object]


def _person_name(rng: random.Random, ctx: RecordContext) -> str:
    return f"{_pick(rng, _FIRST_NAMES)} {_pick(rng, _LAST_NAMES)}"


def _company_name(rng: random.Random, ctx: RecordContext) -> str:
    return f"{_pick(rng, _COMPANY_CORES)} {_pick(rng, _COMPANY_SUFFIXES)}".rstrip()


def _deal_name(rng: random.Random, ctx: RecordContext) -> str:
    return f"{_pick(rng, _COMPANY_CORES)} \u2013 {_pick(rng, _DEAL_PRODUCTS)}"


def _subject(rng: random.Random, ctx: RecordContext) -> str:
    return _pick(rng, _SUBJECTS)


def _body(rng: random.Random, ctx: RecordContext) -> str:
    # Mostly short, sometimes long (a few KB), always from the unicode-heavy sentence pool.
    count = 1 + _below(rng, 4) if rng.random() < 0.95 else 10 + _below(rng, 31)
    parts = [_pick(rng, _SENTENCES)]
    for _ in range(count - 1):
        parts.append(_pick(rng, _SENTENCE_JOINERS))
        parts.append(_pick(rng, _SENTENCES))
    return "".join(parts)


def _generic_text(rng: random.Random, ctx: RecordContext) -> str:
    return f"{_pick(rng, _WORDS)} {_pick(rng, _WORDS)}"


def _website(rng: random.Random, ctx: RecordContext) -> str:
    slug = ascii_slug(_pick(rng, _COMPANY_CORES)) or f"company{ctx.index}"
    scheme = "https://" if rng.random() < 0.9 else "http://"
    www = "www." if rng.random() < 0.7 else ""
    return f"{scheme}{www}{slug}.{_pick(rng, _TLDS)}"


def _email(rng: random.Random, ctx: RecordContext) -> str:
    local = ascii_slug(f"{_pick(rng, _FIRST_NAMES)} {_pick(rng, _LAST_NAMES)}", ".")
    domain = ascii_slug(_pick(rng, _COMPANY_CORES)) or "example"
    return f"{local or 'user' + str(ctx.index)}@{domain}.example.com"


def _phone(rng: random.Random, ctx: RecordContext) -> str:
    country = _pick(rng, (1, 33, 44, 49, 55, 81))
    return f"+{country} {10 + _below(rng, 90)} {_below(rng, 10_000_000):07d}"


def _choice_factory(options: Sequence[object]) -> Factory:
    size = len(options)

    def factory(rng: random.Random, ctx: RecordContext) -> object:
        return options[int(rng.random() * size)]

    return factory


def _reference_factory(field_name: str, references: Mapping[str, int]) -> Factory:
    """``account_id`` -> ids of accounts (within the accounts that exist), owners -> user ids."""
    stem = field_name[: -len("_id")]
    target = next((name for name in references if name in (stem, f"{stem}s", f"{stem}es")), None)
    if target is not None:
        prefix, pool = id_prefix(target), max(references[target], 1)
    elif stem in _USER_STEMS:
        prefix, pool = _USER_PREFIX, _USER_POOL
    else:
        prefix, pool = (stem[:3] or "ref"), _UNKNOWN_REFERENCE_POOL

    template = f"{prefix}_%0{ID_DIGITS}d"

    def factory(rng: random.Random, ctx: RecordContext) -> str:
        return template % (1 + int(rng.random() * pool))

    return factory


def _money(mu: float, sigma: float) -> Factory:
    def factory(rng: random.Random, ctx: RecordContext) -> float:
        return round(min(rng.lognormvariate(mu, sigma), _MAX_DECIMAL), 2)

    return factory


def _employee_count(rng: random.Random, ctx: RecordContext) -> int:
    return min(int(rng.lognormvariate(3.5, 1.6)) + 1, 2_000_000)


def _duration_seconds(rng: random.Random, ctx: RecordContext) -> int:
    # Unanswered calls last 0 seconds.
    return 0 if rng.random() < 0.1 else int(rng.expovariate(1 / 420))


def _small_count(rng: random.Random, ctx: RecordContext) -> int:
    return _below(rng, 251)


def _generic_bigint(rng: random.Random, ctx: RecordContext) -> int:
    return _below(rng, 1_000_000)


def _generic_decimal(rng: random.Random, ctx: RecordContext) -> float:
    return round(rng.uniform(0, 10_000), 2)


def _generic_bool(rng: random.Random, ctx: RecordContext) -> bool:
    return rng.random() < 0.5


def _created_at(rng: random.Random, ctx: RecordContext) -> str:
    return format_us(ctx.created_us)


def _event_before_creation(rng: random.Random, ctx: RecordContext) -> str:
    # E.g. a call's started_at: it happened shortly before it was logged, to the second.
    us = ctx.created_us - _below(rng, 3 * 24 * 3600 + 1) * US_PER_SECOND
    return format_us(max(us, _START_US))


def _generic_timestamp(rng: random.Random, ctx: RecordContext) -> str:
    seconds = _below(rng, (_END_US - _START_US) // US_PER_SECOND)
    return format_us(_START_US + seconds * US_PER_SECOND)


def _date_after_creation(rng: random.Random, ctx: RecordContext) -> str:
    # E.g. a close date: up to half a year after the record was created.
    day = from_us(ctx.created_us).date() + dt.timedelta(days=_below(rng, 181))
    return day.isoformat()


_TYPE_FALLBACKS: Mapping[str, Factory] = {
    "text": _generic_text,
    "bigint": _generic_bigint,
    "decimal": _generic_decimal,
    "bool": _generic_bool,
    "timestamp": _generic_timestamp,
    "date": _date_after_creation,
}

_NAME_BY_RESOURCE: Mapping[str, Factory] = {
    "accounts": _company_name,
    "companies": _company_name,
    "deals": _deal_name,
    "opportunities": _deal_name,
    "notes": _subject,
    "calls": _subject,
    "meetings": _subject,
    "tasks": _subject,
}


def _known_text_factory(
    resource: CrmResource, name: str, references: Mapping[str, int]
) -> Factory | None:
    if name == "name":
        if resource.name in _PERSON_RESOURCES:
            return _person_name
        return _NAME_BY_RESOURCE.get(resource.name, _subject)
    if name.endswith("_id"):
        return _reference_factory(name, references)
    simple: Mapping[str, Factory] = {
        "title": _subject,
        "subject": _subject,
        "industry": _choice_factory(_INDUSTRIES),
        "outcome": _choice_factory(_OUTCOMES),
        "first_name": _choice_factory(_FIRST_NAMES),
        "last_name": _choice_factory(_LAST_NAMES),
        "full_name": _person_name,
        "job_title": _choice_factory(_JOB_TITLES),
        "city": _choice_factory(_CITIES),
        "country": _choice_factory(_COUNTRIES),
        "country_code": _choice_factory(_COUNTRIES),
        "status": _choice_factory(_STATUSES),
        "priority": _choice_factory(_PRIORITIES),
    }
    if name in simple:
        return simple[name]
    if name in _BODY_FIELDS:
        return _body
    if name == "currency" or name.endswith("_currency"):
        return _choice_factory(_CURRENCIES)
    if name in ("website", "url", "homepage") or name.endswith("_url"):
        return _website
    if name == "email" or name.endswith("_email"):
        return _email
    if name == "phone" or name.endswith("_phone"):
        return _phone
    return None


def column_factory(
    resource: CrmResource, column: CrmColumn, references: Mapping[str, int]
) -> Factory:
    """The value factory of one column: choices, else a well-known name, else its contract type.

    ``references`` maps resource names to how many records they have, so that ``*_id`` fields
    point at records that exist.
    """
    if column.choices:
        return _choice_factory(column.choices)
    name, kind = column.name, column.type
    known: Factory | None = None
    if kind == "text":
        known = _known_text_factory(resource, name, references)
    elif kind == "decimal":
        if name in ("annual_revenue", "revenue"):
            known = _money(14.0, 2.0)
        elif name in ("amount", "price", "value", "total") or name.endswith("_amount"):
            known = _money(9.5, 1.2)
    elif kind == "bigint":
        if name in ("employee_count", "employees"):
            known = _employee_count
        elif name.endswith("_seconds"):
            known = _duration_seconds
        elif name.endswith("_count"):
            known = _small_count
    elif kind == "timestamp":
        if name == CREATED_AT_FIELD:
            known = _created_at
        elif name.endswith("_at"):
            known = _event_before_creation
    return known or _TYPE_FALLBACKS[kind]


def _apply_derived_fields(values: dict[str, object]) -> None:
    """Keeps fields that depend on each other consistent (a closed stage means is_closed)."""
    stage = values.get("stage")
    if isinstance(stage, str) and isinstance(values.get("is_closed"), bool):
        values["is_closed"] = stage.startswith("closed")


# --- records -------------------------------------------------------------------------------------


class RecordBuilder:
    """Builds records of one resource; the plan of column factories is made once."""

    def __init__(self, resource: CrmResource, references: Mapping[str, int]) -> None:
        self.resource = resource
        prefix = id_prefix(resource.name)

        def record_id(rng: random.Random, ctx: RecordContext) -> str:
            return f"{prefix}_{ctx.index:0{ID_DIGITS}d}"

        def cursor(rng: random.Random, ctx: RecordContext) -> str:
            return format_us(ctx.updated_us)

        self._factories: dict[str, tuple[bool, Factory]] = {}
        for column in resource.columns:
            if column.name == PRIMARY_KEY:
                self._factories[column.name] = (False, record_id)
            elif column.name == CURSOR_FIELD:
                self._factories[column.name] = (False, cursor)
            else:
                factory = column_factory(resource, column, references)
                self._factories[column.name] = (column.nullable, factory)
        # Flat (name, nullable, factory) triples in contract order: the hot loop of generation.
        self._plan = [(name, n, f) for name, (n, f) in self._factories.items()]
        self.decimal_fields: tuple[str, ...] = tuple(
            c.name for c in resource.columns if c.type == "decimal"
        )
        self.mutable_fields: tuple[str, ...] = tuple(
            c.name
            for c in resource.columns
            if c.name not in (PRIMARY_KEY, CURSOR_FIELD, CREATED_AT_FIELD)
        )

    def build(
        self, rng: random.Random, index: int, created_us: int, updated_us: int
    ) -> dict[str, object]:
        """A new record (a dict in contract column order) for the ``index``-th id."""
        values: dict[str, object] = {}
        ctx = RecordContext(index, created_us, updated_us)
        draw = rng.random
        for name, nullable, factory in self._plan:
            values[name] = None if nullable and draw() < NULL_PROBABILITY else factory(rng, ctx)
        _apply_derived_fields(values)
        return values

    def new_value(self, rng: random.Random, name: str, record: Mapping[str, object]) -> object:
        """A fresh value for field ``name`` of an existing record (used by updates)."""
        created = record.get(CREATED_AT_FIELD)
        created_us = parse_us(created) if isinstance(created, str) else _START_US
        ctx = RecordContext(0, created_us, created_us)
        nullable, factory = self._factories[name]
        return None if nullable and rng.random() < NULL_PROBABILITY else factory(rng, ctx)

    def encode(self, record: dict[str, object]) -> bytes:
        """JSON bytes of a record; decimals are written with exactly two decimal places.

        Modifies ``record`` in place (decimals become orjson fragments): pass a fresh dict.
        """
        for name in self.decimal_fields:
            value = record.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                record[name] = orjson.Fragment(b"%.2f" % value)
        # orjson returns its (multi-KB) write buffer without shrinking it; an exact-size copy
        # keeps 4 x 200,000 stored records at a few hundred MB instead of several GB.
        return memoryview(orjson.dumps(record)).tobytes()


@dataclass(frozen=True)
class GeneratedTable:
    """The initial records of one resource: sort keys in order and the JSON of every id."""

    keys: list[tuple[int, str]]
    rows: dict[str, tuple[int, bytes]]
    next_index: int


def generate_table(
    resource: CrmResource, count: int, seed: int, references: Mapping[str, int]
) -> GeneratedTable:
    """Generates ``count`` records of ``resource`` deterministically from ``seed``.

    updated_at values are whole minutes in 2024-2025; at least ~5% of records share theirs with
    another record; created_at <= updated_at; ids are numbered in creation order.
    """
    rng = random.Random(seed_for(seed, resource.name))
    builder = RecordBuilder(resource, references)
    span_minutes = (_END_US - _START_US) // US_PER_MINUTE
    updated = [_below(rng, span_minutes) for _ in range(count)]
    if count >= 2:
        for _ in range(max(1, round(count * TIE_FRACTION))):
            i = _below(rng, count)
            j = (i + 1 + _below(rng, count - 1)) % count
            updated[i] = updated[j]
    max_age = 400 * 24 * 60
    pairs = []
    for minute in updated:
        age = 0 if rng.random() < UNCHANGED_FRACTION else _below(rng, min(minute, max_age) + 1)
        pairs.append((minute - age, minute))
    # Ids follow creation order, like a real CRM's sequence.
    pairs.sort()
    keys: list[tuple[int, str]] = []
    rows: dict[str, tuple[int, bytes]] = {}
    for index, (created_minute, updated_minute) in enumerate(pairs, start=1):
        created_us = _START_US + created_minute * US_PER_MINUTE
        updated_us = _START_US + updated_minute * US_PER_MINUTE
        record = builder.build(rng, index, created_us, updated_us)
        record_id = record[PRIMARY_KEY]
        assert isinstance(record_id, str)
        keys.append((updated_us, record_id))
        rows[record_id] = (updated_us, builder.encode(record))
    keys.sort()
    return GeneratedTable(keys=keys, rows=rows, next_index=count + 1)


def generate_tables(
    resources: Sequence[CrmResource], counts: Mapping[str, int], seed: int
) -> dict[str, GeneratedTable]:
    """Generates every resource (``counts`` also sizes the pools ``*_id`` fields point into).

    Pure Python, ~12-15 us per record: 4 x 1,000 records take ~0.05 s, 4 x 200,000 ~12 s.
    (Forked workers were tried: on 2 cores they saved only ~20% once results are shipped back.)
    """
    return {r.name: generate_table(r, counts[r.name], seed, counts) for r in resources}


def resolve_counts(
    records: int | Mapping[str, int], resources: Sequence[CrmResource] = CRM_RESOURCES
) -> dict[str, int]:
    """Record counts per resource: an int applies to all; a mapping overrides the default.

    Resources missing from a mapping get ``DEFAULT_RECORDS``. Raises ``ValueError`` for
    unknown names or negative counts.
    """
    names = [r.name for r in resources]
    if isinstance(records, int):
        counts = dict.fromkeys(names, records)
    else:
        unknown = sorted(set(records) - set(names))
        if unknown:
            raise ValueError(
                f"unknown CRM resource(s) {', '.join(unknown)}; known: {', '.join(names)}"
            )
        counts = {name: records.get(name, DEFAULT_RECORDS) for name in names}
    for name, count in counts.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"record count of {name} must be a non-negative integer")
    return counts


# --- the store -----------------------------------------------------------------------------------


class UnknownRecordsError(LookupError):
    """Ids that are not (or no longer) in the store."""


def _spread(total: int, count: int) -> list[int]:
    """``count`` distinct positions spread evenly over ``range(total)`` (deterministic)."""
    return [(2 * i + 1) * total // (2 * count) for i in range(count)]


class ResourceTable:
    """The live records of one resource, ordered by (updated_at epoch microseconds, id)."""

    def __init__(self, resource: CrmResource, initial: GeneratedTable) -> None:
        self.resource = resource
        self.initial = initial
        self.keys: list[tuple[int, str]] = []
        self.rows: dict[str, tuple[int, bytes]] = {}
        self.next_index = 1
        self.reset()

    def reset(self) -> None:
        """Back to the generated state (the JSON bytes are shared, only the indexes are copied)."""
        self.keys = list(self.initial.keys)
        self.rows = dict(self.initial.rows)
        self.next_index = self.initial.next_index

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def max_updated_us(self) -> int | None:
        """The largest updated_at (epoch microseconds), ``None`` when the table is empty."""
        return self.keys[-1][0] if self.keys else None

    def start_index(self, since_us: int | None) -> int:
        """Position of the first record with updated_at >= ``since_us`` (0 without a filter)."""
        if since_us is None:
            return 0
        # (since_us,) sorts before every (since_us, id): ties at the cursor are included.
        return bisect.bisect_left(self.keys, (since_us,))

    def page(self, offset: int, limit: int, since_us: int | None) -> tuple[list[bytes], int]:
        """The JSON of one page and the total number of records matching the filter."""
        start = self.start_index(since_us)
        rows = self.rows
        chunk = self.keys[start + offset : start + offset + limit]
        return [rows[record_id][1] for _, record_id in chunk], len(self.keys) - start

    def all_json(self) -> list[bytes]:
        """The JSON of every record, in contract order."""
        rows = self.rows
        return [rows[record_id][1] for _, record_id in self.keys]

    def record(self, record_id: str) -> dict[str, object]:
        """One record as a fresh dict."""
        return orjson.loads(self.rows[record_id][1])

    def pick(self, count: int | None = None, fraction: float | None = None) -> list[str]:
        """Ids of ``count`` records (or ``fraction`` of them) spread over the whole order."""
        total = len(self.keys)
        if fraction is not None:
            if not 0 < fraction <= 1:
                raise ValueError("fraction must be in (0, 1]")
            count = max(1, round(total * fraction)) if total else 0
        if count is None or count < 0:
            raise ValueError("count must be a non-negative integer")
        if count > total:
            raise ValueError(f"{self.resource.name} has only {total} records, asked for {count}")
        return [self.keys[i][1] for i in _spread(total, count)]

    def check_ids(self, ids: Iterable[str]) -> list[str]:
        """``ids`` as a list, after checking that they all exist."""
        ids = list(ids)
        missing = [i for i in ids if i not in self.rows]
        if missing:
            shown = ", ".join(missing[:10])
            raise UnknownRecordsError(f"unknown {self.resource.name} id(s): {shown}")
        return ids

    def remove(self, ids: Sequence[str]) -> None:
        """Removes records (their JSON and their sort keys)."""
        if len(ids) > 64:
            # One pass beats many O(n) list pops for big batches.
            doomed = set(ids)
            self.keys = [key for key in self.keys if key[1] not in doomed]
        else:
            for record_id in ids:
                key = (self.rows[record_id][0], record_id)
                del self.keys[bisect.bisect_left(self.keys, key)]
        for record_id in ids:
            del self.rows[record_id]

    def put(self, record_id: str, updated_us: int, body: bytes) -> None:
        """Inserts a record that is not in the table (keeps the keys sorted)."""
        key = (updated_us, record_id)
        if not self.keys or key > self.keys[-1]:
            self.keys.append(key)
        else:
            bisect.insort(self.keys, key)
        self.rows[record_id] = (updated_us, body)


class SandboxStore:
    """All resources' records plus the logical clock that stamps mutations.

    The clock starts one minute after the newest generated updated_at; every mutation batch
    advances it by one second and stamps the records it touches, so updated records move to
    the end of the order and the records of one batch tie.
    """

    def __init__(
        self,
        records: int | Mapping[str, int] = DEFAULT_RECORDS,
        seed: int = 1,
        resources: Sequence[CrmResource] = CRM_RESOURCES,
    ) -> None:
        self.seed = seed
        self.resources: dict[str, CrmResource] = {r.name: r for r in resources}
        self.counts = resolve_counts(records, resources)
        generated = generate_tables(resources, self.counts, seed)
        self.tables: dict[str, ResourceTable] = {
            resource.name: ResourceTable(resource, generated[resource.name])
            for resource in resources
        }
        self.clock_us = 0
        self._rng = random.Random()
        self.reset()

    def reset(self) -> None:
        """Back to the initial generated state, clock and mutation randomness included."""
        for table in self.tables.values():
            table.reset()
        newest = [t.max_updated_us for t in self.tables.values() if t.max_updated_us is not None]
        self.clock_us = (max(newest) if newest else _START_US) + US_PER_MINUTE
        # Mutations draw from their own stream so they never disturb the generated data.
        self._rng = random.Random(seed_for(self.seed, "sandbox-mutations"))

    def table(self, name: str) -> ResourceTable:
        """The table of resource ``name``; ``LookupError`` naming the known resources."""
        try:
            return self.tables[name]
        except KeyError:
            raise LookupError(
                f"unknown CRM resource {name!r}; known: {', '.join(self.tables)}"
            ) from None

    def builder(self, name: str) -> RecordBuilder:
        """A record builder whose ``*_id`` values point at the records that exist now."""
        references = {n: t.next_index - 1 for n, t in self.tables.items()}
        return RecordBuilder(self.table(name).resource, references)

    def _tick(self) -> int:
        self.clock_us += US_PER_SECOND
        return self.clock_us

    def update(
        self,
        name: str,
        ids: Sequence[str] | None = None,
        count: int | None = None,
        fraction: float | None = None,
        *,
        missing_ok: bool = False,
    ) -> list[str]:
        """Touches records: a new value in one non-key field and updated_at = the clock.

        Give exactly one of ``ids``, ``count`` or ``fraction``. Returns the ids touched, in
        their new order. With ``missing_ok`` unknown ids are skipped instead of rejected.
        """
        table = self.table(name)
        ids = self._select(table, ids, count, fraction, missing_ok)
        if not ids:
            return []
        builder = self.builder(name)
        stamp = self._tick()
        stamped = format_us(stamp)
        updated: list[tuple[str, bytes]] = []
        for record_id in sorted(set(ids)):
            record = table.record(record_id)
            self._change_one_field(builder, record)
            record[CURSOR_FIELD] = stamped
            updated.append((record_id, builder.encode(record)))
        table.remove([record_id for record_id, _ in updated])
        for record_id, body in updated:
            table.put(record_id, stamp, body)
        return [record_id for record_id, _ in updated]

    def _change_one_field(self, builder: RecordBuilder, record: dict[str, object]) -> None:
        fields = list(builder.mutable_fields)
        self._rng.shuffle(fields)
        for name in fields:
            # A few tries: a nullable field may draw null twice, a choice the same option, and a
            # derived field (is_closed) is recomputed from its source and may not change at all.
            for _ in range(8):
                trial = dict(record)
                trial[name] = builder.new_value(self._rng, name, record)
                _apply_derived_fields(trial)
                if trial != record:
                    record.update(trial)
                    return

    def reserve_ids(self, name: str, count: int) -> list[str]:
        """Allocates ``count`` fresh ids now (used by scheduled adds to report their ids)."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError("count must be a positive integer")
        table = self.table(name)
        first = table.next_index
        table.next_index += count
        return [make_id(name, index) for index in range(first, first + count)]

    def add(
        self,
        name: str,
        count: int = 1,
        tie_with_max: bool = False,
        *,
        reserved_ids: Sequence[str] | None = None,
    ) -> list[str]:
        """Creates ``count`` records with fresh ids (numbering continues) and returns the ids.

        They get created_at = updated_at = the advanced clock, or, with ``tie_with_max``, the
        current maximum updated_at of the resource (ties exactly at a sync's cursor).
        """
        table = self.table(name)
        ids = list(reserved_ids) if reserved_ids is not None else self.reserve_ids(name, count)
        builder = self.builder(name)
        current_max = table.max_updated_us
        stamp = current_max if tie_with_max and current_max is not None else self._tick()
        for record_id in ids:
            index = int(record_id.rsplit("_", 1)[1])
            record = builder.build(self._rng, index, stamp, stamp)
            table.put(record_id, stamp, builder.encode(record))
        return ids

    def delete(
        self,
        name: str,
        ids: Sequence[str] | None = None,
        count: int | None = None,
        *,
        missing_ok: bool = False,
    ) -> list[str]:
        """Hard-deletes records given by ``ids`` or ``count`` (spread over the order)."""
        table = self.table(name)
        ids = sorted(set(self._select(table, ids, count, None, missing_ok)))
        if ids:
            self._tick()
            table.remove(ids)
        return ids

    def pick(self, name: str, count: int | None = None, fraction: float | None = None) -> list[str]:
        """Ids that an update/delete with ``count``/``fraction`` would touch right now."""
        return self.table(name).pick(count, fraction)

    def _select(
        self,
        table: ResourceTable,
        ids: Sequence[str] | None,
        count: int | None,
        fraction: float | None,
        missing_ok: bool,
    ) -> list[str]:
        given = [arg is not None for arg in (ids, count, fraction)]
        if sum(given) != 1:
            raise ValueError("give exactly one of ids, count or fraction")
        if ids is not None:
            if isinstance(ids, str) or not all(isinstance(i, str) for i in ids):
                raise ValueError("ids must be a list of strings")
            if missing_ok:
                return [i for i in ids if i in table.rows]
            return table.check_ids(ids)
        return table.pick(count, fraction)
