"""The one place where secrets are removed from text, log records and errors.

dlt masks a fixed list of *parameter names* in the URLs it logs, but a connection error from
``requests``/``urllib3`` carries the full URL (``...?api_key=<secret>``) in its message, and DEBUG
logging of ``urllib3`` prints request lines with the query string. So we redact by *value*: every
form of the secret (raw and URL-encoded) is replaced wherever it could surface: in log records of
every logger (a log-record factory, installed for the duration of a sync) and in the error a failed
sync raises (a fresh exception without the original chain, whose messages are redacted).

Environment variables: none.
"""

import contextlib
import logging
import threading
import traceback
from collections.abc import Iterable, Iterator
from urllib.parse import quote, quote_plus

REDACTED = "***"

# Short secrets would redact innocent substrings everywhere; real API keys are longer than this.
_MIN_SECRET_LENGTH = 4


def secret_forms(secret: str) -> set[str]:
    """All spellings under which ``secret`` can appear in a URL, a message or a log line."""
    if not secret or len(secret) < _MIN_SECRET_LENGTH:
        return set()
    return {secret, quote(secret, safe=""), quote_plus(secret), quote(secret)}


class Redactor:
    """Replaces known secret values in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        forms: set[str] = set()
        for secret in secrets:
            forms |= secret_forms(secret)
        # Longest first, so that an encoded form is not half-replaced through a shorter one.
        self._forms = sorted(forms, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._forms)

    def redact(self, text: str) -> str:
        """``text`` with every form of every secret replaced by ``***``."""
        for form in self._forms:
            if form in text:
                text = text.replace(form, REDACTED)
        return text


class CrmSyncError(Exception):
    """A CRM sync failed. The message is already redacted and names resource and cause."""


def redacted_error(exc: BaseException, redactor: Redactor, headline: str) -> CrmSyncError:
    """A new ``CrmSyncError`` describing ``exc`` and its causes, with secrets removed.

    The original exception objects are *not* attached (no ``__cause__``): Dagster serializes the
    whole chain into its event log, and the chain's messages and attributes carry the raw URL.
    """
    lines = [headline]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = "".join(traceback.format_exception_only(type(current), current)).strip()
        lines.append(f"  caused by: {redactor.redact(text)}")
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return CrmSyncError("\n".join(lines))


_factory_lock = threading.Lock()
_active: list[Redactor] = []
_original_factory = logging.getLogRecordFactory()


def _redacting_factory(*args: object, **kwargs: object) -> logging.LogRecord:
    record = _original_factory(*args, **kwargs)
    redactors = list(_active)
    if not redactors:
        return record
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed log call must not break the sync
        return record
    redacted = message
    for redactor in redactors:
        redacted = redactor.redact(redacted)
    if redacted != message:
        record.msg, record.args = redacted, ()
    if record.exc_info and record.exc_info[1] is not None:
        # Pre-render the traceback with secrets removed; handlers use exc_text when it is set.
        text = "".join(traceback.format_exception(*record.exc_info))
        for redactor in redactors:
            text = redactor.redact(text)
        record.exc_text, record.exc_info = text, None
    return record


@contextlib.contextmanager
def redacted_logging(redactor: Redactor) -> Iterator[None]:
    """Within the block, every log record of every logger has the secrets removed."""
    if not redactor:
        yield
        return
    with _factory_lock:
        _active.append(redactor)
        logging.setLogRecordFactory(_redacting_factory)
    try:
        yield
    finally:
        with _factory_lock:
            _active.remove(redactor)
            if not _active:
                logging.setLogRecordFactory(_original_factory)
