"""``SandboxServer``: runs ``python -m crm_assets.sandbox`` in a subprocess (tests, demo).

The child is a real HTTP server on a free 127.0.0.1 port; ``url`` and ``client`` are available
once it has printed its listening line. The API key goes to the child through its environment,
never its argv (argv is visible to every user via ``ps``).

Environment variables: none read; the child process gets ``CRM_SANDBOX_API_KEY`` (the key) and
``PYTHONPATH`` (so that it imports this very copy of ``crm_assets``).
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

from crm_assets.sandbox.app import API_KEY_ENV, DEFAULT_SANDBOX_API_KEY
from crm_assets.sandbox.client import SandboxClient

_LISTENING_RE = re.compile(r"^crm sandbox listening on (http://\S+)\s*$")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_STDERR_TAIL = 4000


class SandboxStartError(RuntimeError):
    """The sandbox process did not come up; the message includes its stderr."""


def records_spec(records: int | Mapping[str, int]) -> str:
    """The ``--records`` argument for an int (every resource) or a per-resource mapping."""
    if isinstance(records, int):
        return str(records)
    return ",".join(f"{name}={count}" for name, count in records.items())


def _stop_process(process: subprocess.Popen[str], timeout: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class SandboxServer:
    """The sandbox CRM API in a child process; a context manager (or ``start()``/``stop()``).

    ``records`` is a count for every resource or a per-resource mapping (others get 1000).
    """

    def __init__(
        self,
        records: int | Mapping[str, int] = 1000,
        seed: int = 1,
        api_key: str = DEFAULT_SANDBOX_API_KEY,
        latency_ms: int = 0,
        port: int = 0,
        *,
        startup_timeout: float = 60.0,
    ) -> None:
        self.records = records
        self.seed = seed
        self.api_key = api_key
        self.latency_ms = latency_ms
        self.port = port
        self.startup_timeout = startup_timeout
        self._url: str | None = None
        self._client: SandboxClient | None = None
        self._process: subprocess.Popen[str] | None = None
        self._stderr: IO[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    def __repr__(self) -> str:
        return f"SandboxServer(url={self._url!r}, seed={self.seed})"

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:54321``."""
        if self._url is None:
            raise RuntimeError("the sandbox is not running; call start() or use `with`")
        return self._url

    @property
    def client(self) -> SandboxClient:
        """A ``SandboxClient`` for this server's control API."""
        if self._client is None:
            self._client = SandboxClient(self.url)
        return self._client

    @property
    def pid(self) -> int | None:
        """Process id of the server, ``None`` when not started."""
        return None if self._process is None else self._process.pid

    def start(self) -> SandboxServer:
        """Starts the child and waits for its listening line (``SandboxStartError`` if not)."""
        if self._process is not None:
            raise RuntimeError("the sandbox is already running")
        command = [
            sys.executable,
            "-m",
            "crm_assets.sandbox",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--seed",
            str(self.seed),
            "--records",
            records_spec(self.records),
            "--latency-ms",
            str(self.latency_ms),
        ]
        env = dict(os.environ)
        env[API_KEY_ENV] = self.api_key
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        # stderr goes to a file: a pipe nobody reads could fill up and block the server.
        self._stderr = tempfile.TemporaryFile()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self._process = process
        self._finalizer = weakref.finalize(self, _stop_process, process, 5.0)
        lines: queue.Queue[str | None] = queue.Queue()
        # Reads stdout for the whole life of the child, so its pipe never fills.
        threading.Thread(
            target=self._pump, args=(process, lines), name="sandbox-stdout", daemon=True
        ).start()
        self._url = self._wait_for_url(process, lines)
        return self

    @staticmethod
    def _pump(process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    def _wait_for_url(self, process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> str:
        deadline = time.monotonic() + self.startup_timeout
        other_output: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"did not report listening within {self.startup_timeout:g} s")
            try:
                line = lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:
                code = process.wait(5)
                self._fail(f"exited with code {code} before listening", other_output)
            match = _LISTENING_RE.match(line)
            if match:
                return match.group(1)
            other_output.append(line)

    def _fail(self, why: str, stdout: list[str] | None = None) -> None:
        stderr = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            stderr = self._stderr.read().decode("utf-8", "replace")[-_STDERR_TAIL:]
        self.stop()
        details = f"\n--- stderr ---\n{stderr.rstrip()}" if stderr.strip() else ""
        if stdout:
            details += f"\n--- stdout ---\n{''.join(stdout).rstrip()}"
        raise SandboxStartError(f"the sandbox CRM process {why}{details}")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminates the child (SIGTERM), waits ``timeout`` s, then kills it."""
        if self._client is not None:
            self._client.close()
            self._client = None
        process, self._process = self._process, None
        self._url = None
        if process is not None:
            _stop_process(process, timeout)
            if process.stdout is not None:
                process.stdout.close()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
