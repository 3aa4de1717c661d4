"""End-to-end demo: the bundled sandbox CRM API, a real ``dagster job execute``, DuckDB.

``python -m crm_assets.demo`` starts the sandbox on a free loopback port, runs
``dagster job execute -m crm_assets.definitions -j crm_full_refresh_job`` against it exactly as a
user would (then ``crm_incremental_job``, which finds nothing new), and prints one line per table:
records in the API, rows in the warehouse. It exits non-zero when they differ.

Environment variables: ``CRM_DUCKDB_PATH`` (default ``data/warehouse.duckdb``) and
``DAGSTER_HOME`` (default ``data/dagster_home``); ``CRM_BASE_URL`` and ``CRM_API_KEY`` are set
for the child process to point at the sandbox.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb

from crm_assets.contract import RESOURCE_NAMES
from crm_assets.sandbox import DEFAULT_SANDBOX_API_KEY, SandboxServer
from crm_assets.settings import DEFAULT_DUCKDB_PATH, settings_from_env

LOCAL_DAGSTER_YAML = """\
# Written by crm_assets for local runs (make demo / make dev); edit freely.
# One CRM sync step at a time: dlt has no lock and DuckDB allows a single writer.
concurrency:
  pools:
    default_limit: 1
# No usage statistics leave the machine.
telemetry:
  enabled: false
"""


def ensure_local_dagster_home(home: Path) -> Path:
    """Creates ``home`` with a ``dagster.yaml`` limiting the sync pool to 1, if it has none."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(LOCAL_DAGSTER_YAML)
    return home


def _dagster_cli() -> str:
    candidate = Path(sys.executable).with_name("dagster")
    return str(candidate) if candidate.exists() else "dagster"


def run_job(job: str, env: dict[str, str]) -> None:
    """Runs ``job`` with ``dagster job execute`` in a child process; raises when it fails."""
    command = [
        _dagster_cli(),
        "job",
        "execute",
        "-m",
        "crm_assets.definitions",
        "-j",
        job,
        "--tags",
        json.dumps({"crm/trigger": "cli"}),
    ]
    print(f"$ {' '.join(command[:7])}", flush=True)
    subprocess.run(command, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000, help="records per resource")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--init-home", metavar="DIR", help="only create a local DAGSTER_HOME in DIR and exit"
    )
    args = parser.parse_args(argv)
    if args.init_home:
        ensure_local_dagster_home(Path(args.init_home))
        return 0

    env = dict(os.environ)
    env.setdefault("CRM_DUCKDB_PATH", DEFAULT_DUCKDB_PATH)
    ensure_local_dagster_home(
        Path(env.setdefault("DAGSTER_HOME", str(Path("data/dagster_home").absolute())))
    )
    duckdb_path = Path(env["CRM_DUCKDB_PATH"])

    with SandboxServer(records=args.records, seed=args.seed) as sandbox:
        print(f"sandbox CRM API on {sandbox.url} ({args.records} records per resource)")
        env.update(CRM_BASE_URL=sandbox.url, CRM_API_KEY=DEFAULT_SANDBOX_API_KEY)
        env.pop("CRM_DESTINATION", None)
        settings = settings_from_env(env)
        run_job("crm_full_refresh_job", env)
        run_job("crm_incremental_job", env)
        api_counts = {name: len(sandbox.client.records(name)) for name in RESOURCE_NAMES}

    print(f"\nwarehouse {duckdb_path} (dataset {settings.dataset_name}):")
    print(f"{'table':<12}{'API records':>12}{'warehouse rows':>16}")
    ok = True
    with duckdb.connect(str(duckdb_path), read_only=True) as con:
        for name in RESOURCE_NAMES:
            (rows,) = con.execute(
                f'SELECT COUNT(*) FROM "{settings.dataset_name}"."{name}"'
            ).fetchone() or (0,)
            ok &= rows == api_counts[name]
            print(f"{name:<12}{api_counts[name]:>12,}{rows:>16,}")
    print("OK: the warehouse equals the API" if ok else "MISMATCH between API and warehouse")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
