"""Command line: ``python -m crm_assets.sandbox`` serves the sandbox CRM API on a loopback port.

::

    python -m crm_assets.sandbox --host 127.0.0.1 --port 8765 --seed 1 \\
        --records notes=1000,deals=1000,accounts=1000,calls=1000 [--latency-ms 0]

``--records 500`` means 500 for every resource; ``--records 500,deals=20`` sets a default and an
override; resources not named get 1000. ``--port 0`` picks a free port. Once the server accepts
connections it prints exactly one line to stdout, ``crm sandbox listening on http://HOST:PORT``.
Only loopback hosts are accepted (127.0.0.0/8, ::1, localhost): the control API has no auth.

Environment variables: ``CRM_SANDBOX_API_KEY`` (the API key the data API expects, default
``sandbox-key``; read from the environment so it never shows up in ``ps``).
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from collections.abc import Sequence

from crm_assets.contract import RESOURCE_NAMES
from crm_assets.sandbox.data import DEFAULT_RECORDS

LISTENING_MESSAGE = "crm sandbox listening on {url}"


def loopback_host(host: str) -> str:
    """The address to bind for ``host``; ``ValueError`` unless it is a loopback address.

    ``localhost`` binds 127.0.0.1 (not whatever the resolver says), so the sandbox is never
    reachable from another machine.
    """
    if host.strip().lower() == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(
            f"refusing to listen on {host!r}: the sandbox only binds loopback addresses "
            "(127.0.0.0/8, ::1 or localhost) because its control API has no authentication"
        )
    return str(address)


def parse_records(spec: str, names: Sequence[str] = RESOURCE_NAMES) -> dict[str, int]:
    """Parses ``--records``: ``500``, ``notes=10,deals=20`` or ``500,deals=20``.

    Returns a count for every resource in ``names``; ``ValueError`` on unknown names or bad
    numbers.
    """
    default = DEFAULT_RECORDS
    overrides: dict[str, int] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, number = item.rpartition("=")
        if not (number.isascii() and number.isdigit()):
            raise ValueError(f"--records: {item!r} is not COUNT or RESOURCE=COUNT")
        if not name:
            default = int(number)
        elif name in names:
            overrides[name] = int(number)
        else:
            raise ValueError(f"--records: unknown resource {name!r}; known: {', '.join(names)}")
    return {name: overrides.get(name, default) for name in names}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the CLI."""
    parser = argparse.ArgumentParser(
        prog="python -m crm_assets.sandbox",
        description="Serve the sandbox CRM API (the crm_assets contract) on a loopback port.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="loopback address (default %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated data")
    parser.add_argument(
        "--records",
        default=str(DEFAULT_RECORDS),
        help="records per resource: N, or name=N,... (default %(default)s each)",
    )
    parser.add_argument(
        "--latency-ms", type=int, default=0, help="added to every data request (default 0)"
    )
    return parser


def serve(sock: socket.socket, url: str, app: object) -> None:
    """Serves ``app`` with uvicorn on an already bound socket; announces ``url`` when ready."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        # Printed after startup() has created the listening server, i.e. once connections are
        # accepted; SandboxServer waits for exactly this line.
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if not self.should_exit:
                print(LISTENING_MESSAGE.format(url=url), flush=True)

    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        loop="auto",  # uvloop when installed
        http="auto",  # httptools when installed
        lifespan="off",
        # The query string carries the API key: no access log, ever.
        access_log=False,
        log_level="warning",
        server_header=False,
        timeout_graceful_shutdown=1,
    )
    AnnouncingServer(config).run(sockets=[sock])


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        host = loopback_host(args.host)
        counts = parse_records(args.records)
    except ValueError as exc:
        parser.error(str(exc))
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if args.latency_ms < 0:
        parser.error("--latency-ms must be >= 0")

    # Bind before generating (seconds for big data sets) so a busy port fails fast; clients get
    # "connection refused" until uvicorn starts listening on it.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, args.port))
    except OSError as exc:
        print(f"crm sandbox: cannot bind {host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    url = f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"

    from crm_assets.sandbox.app import SandboxApp, api_key_from_env
    from crm_assets.sandbox.data import SandboxStore

    store = SandboxStore(counts, seed=args.seed)
    app = SandboxApp(store, api_key_from_env(), latency_ms=args.latency_ms)
    try:
        serve(sock, url, app)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
