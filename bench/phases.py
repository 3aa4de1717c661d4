"""Where a sync's time goes: this project's source and pipeline without Dagster, phase by phase.

Starts the sandbox (or uses ``--url``), builds the source exactly as the Dagster step does
(``CrmApiResource.build_session`` + ``build_crm_source`` + ``CrmWarehouseResource.pipeline``) and
times dlt's extract, normalize and load separately, with peak RSS. For trying settings:

    python bench/phases.py --records 50000
    python bench/phases.py --records 50000 --file-format jsonl
    python bench/phases.py --records 10000 --latency-ms 20 --profile extract
"""

import argparse
import cProfile
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crm_assets.contract import CRM_RESOURCES  # noqa: E402
from crm_assets.pagination import ResourceSyncStats  # noqa: E402
from crm_assets.records import RejectSink  # noqa: E402
from crm_assets.resources import CrmApiResource, CrmWarehouseResource  # noqa: E402
from crm_assets.sandbox import DEFAULT_SANDBOX_API_KEY, SandboxServer  # noqa: E402
from crm_assets.source import build_crm_source  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """CPU seconds of this process (all threads) and its finished children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def run(url: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="crm-phases-") as tmp:
        api = CrmApiResource(base_url=url, api_key=DEFAULT_SANDBOX_API_KEY)
        fields = {"duckdb_path": str(Path(tmp) / "warehouse.duckdb"), "pipelines_dir": tmp}
        if args.file_format:
            fields["loader_file_format"] = args.file_format
        warehouse = CrmWarehouseResource(**fields)
        stats = {r.name: ResourceSyncStats(r.name) for r in CRM_RESOURCES}
        source = build_crm_source(
            api.source_options(),
            api.require_key(),
            args.mode,
            CRM_RESOURCES,
            session=api.build_session(stats),
            stats=stats,
            rejects=RejectSink(),
            parallelized=not args.sequential,
        )
        t0 = time.perf_counter()
        with warehouse.pipeline() as pipeline:
            pipeline.drop()
            kwargs = {"refresh": "drop_resources"} if args.mode == "full_refresh" else {}
            phases = [
                ("extract", lambda: pipeline.extract(source, **kwargs)),
                ("normalize", pipeline.normalize),
                ("load", pipeline.load),
            ]
            if warehouse.file_format():
                fmt = warehouse.file_format()
                phases[0] = (
                    "extract",
                    lambda: pipeline.extract(source, loader_file_format=fmt, **kwargs),
                )
            setup = time.perf_counter() - t0
            print(f"setup      {setup:6.2f} s")
            for name, call in phases:
                profiler = cProfile.Profile() if args.profile == name else None
                started, cpu_started = time.perf_counter(), cpu_s()
                if profiler:
                    profiler.enable()
                call()
                if profiler:
                    profiler.disable()
                print(
                    f"{name:<10} {time.perf_counter() - started:6.2f} s, "
                    f"cpu {cpu_s() - cpu_started:6.2f} s, peak {peak_mb():.0f} MB"
                )
                if profiler:
                    stats = pstats.Stats(profiler)
                    if args.dump:
                        stats.dump_stats(args.dump)
                    stats.sort_stats(args.sort).print_stats(args.top)
        print(f"total      {time.perf_counter() - t0:6.2f} s")
        print("requests   " + ", ".join(f"{k}={s.http_attempts}" for k, s in stats.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--url", help="use a running sandbox instead of starting one")
    parser.add_argument("--mode", default="full_refresh", choices=["full_refresh", "incremental"])
    parser.add_argument("--file-format", help="loader file format (default: the warehouse's)")
    parser.add_argument(
        "--sequential", action="store_true", help="rest_api_source(parallelized=False)"
    )
    parser.add_argument("--profile", choices=["extract", "normalize", "load"])
    parser.add_argument("--sort", default="cumulative")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--dump", help="write the profile (pstats) to this file")
    args = parser.parse_args()
    if args.url:
        run(args.url, args)
        return 0
    with SandboxServer(records=args.records, latency_ms=args.latency_ms) as sandbox:
        run(sandbox.url, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
