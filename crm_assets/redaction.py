"""The one place where secrets are removed from text, log records and errors.

dlt masks a fixed list of *parameter names* in the URLs it logs, but a connection error from
``requests``/``urllib3`` carries the full URL (``...?api_key=<secret>``) in its message, and DEBUG
logging of ``urllib3`` prints request lines with the query string. So we redact by *value*: every
form of the secret (raw and URL-encoded) is replaced wherever it could surface: in log records of
every logger and in the error a failed sync raises (a fresh exception without the original chain,
whose messages are redacted).

The log-record factory is installed by ``protect_secret``, which ``CrmApiResource`` calls before it
hands the key to anything (a sync, a sensor's probe, an asset check's probe). From then on it stays
installed for the life of the process: a secret is redacted from every log record created anywhere
in the process (any thread, any logger, any level, also after the sync that used it), so no code
path can forget to enable it. ``redacted_logging`` scopes an extra redactor to a block.

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
        self._forms: list[str] = []
        self._lock = threading.Lock()
        for secret in secrets:
            self.add(secret)

    def __bool__(self) -> bool:
        return bool(self._forms)

    def add(self, secret: str) -> None:
        """Also redacts ``secret`` from now on (thread-safe; readers never see a partial list)."""
        with self._lock:
            forms = set(self._forms) | secret_forms(secret)
            # Longest first, so that an encoded form is not half-replaced through a shorter one.
            self._forms = sorted(forms, key=len, reverse=True)

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
# Every secret ``protect_secret`` was given in this process.
_protected = Redactor()
_original_factory = logging.getLogRecordFactory()


def _redacting_factory(*args: object, **kwargs: object) -> logging.LogRecord:
    record = _original_factory(*args, **kwargs)
    redactors = [r for r in (_protected, *_active) if r]
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


def _install_factory() -> None:
    # Called with _factory_lock held. Idempotent, never stacks ours twice. Ours chains to the
    # factory that was in place when this module was imported (no library in use sets one).
    if logging.getLogRecordFactory() is not _redacting_factory:
        logging.setLogRecordFactory(_redacting_factory)


def protect_secret(secret: str) -> None:
    """Redacts ``secret`` from every log record of this process from now on.

    Call it before the secret is used for anything: urllib3 logs request lines with the query
    string at DEBUG, and a probe or a check runs outside any sync's ``redacted_logging`` block.
    """
    if not secret_forms(secret):
        return
    _protected.add(secret)
    with _factory_lock:
        _install_factory()


@contextlib.contextmanager
def redacted_logging(redactor: Redactor) -> Iterator[None]:
    """Within the block, every log record of every logger has the secrets removed."""
    if not redactor:
        yield
        return
    with _factory_lock:
        _active.append(redactor)
        _install_factory()
    try:
        yield
    finally:
        with _factory_lock:
            _active.remove(redactor)
            # Protected secrets keep the factory installed for the rest of the process.
            ours = logging.getLogRecordFactory() is _redacting_factory
            if ours and not _active and not _protected:
                logging.setLogRecordFactory(_original_factory)
