"""Benchmark of crm_assets against plain dlt and the I/O limit, on the bundled sandbox CRM API.

For every case (records per resource @ added latency per request, in ms) it starts the sandbox
and runs, ``--repeat`` times, in turn:

* ``limit``    the I/O limit: the same pages fetched raw, the four resources in parallel
               (``bench/io_limit.py``: one thread + requests session per resource, orjson);
* ``peer``     plain dlt ``rest_api`` with the seed's configuration and default settings
               (``bench/peer.py``);
* ``full``     this project's full refresh as users run it:
               ``dagster job execute -m crm_assets.definitions -j crm_full_refresh_job``;
* ``incr``     this project's ``crm_incremental_job`` after 1 % of every resource changed
               (``sandbox.client.update(resource, fraction=0.01)``), into the warehouse ``full``
               just loaded;
* ``full_ip``, ``incr_ip``  the same two jobs with Dagster's in-process executor
               (``-c`` run config ``execution: {config: {in_process: {}}}``): what the jobs would
               cost if they ran their steps in one process (see docs/performance.md).

Every runner is a separate child process with its own temporary DuckDB file, dlt directory and
``DAGSTER_HOME``. Wall time is ``time.perf_counter`` around the child; CPU and peak RSS are the
kernel's accounting of the finished child (``os.wait4``, the per-child form of
``resource.getrusage(RUSAGE_CHILDREN)``): peak RSS is the largest single process among the child
and the descendants it waited for, not their sum. ``step`` is Dagster's own duration of the sync
step (from the run's log), i.e. the run without process start-up and the checks. Requests are
counted by the sandbox. After each run the warehouse is compared with the API (row counts, newest
``updated_at`` per table), so a fast wrong result cannot pass. Finally it times
``python -c "import crm_assets.definitions"`` against ``python -c "import dagster, dlt"``.

Medians of the repeats are printed with ratios and the targets of docs/performance.md.

    python bench/run.py                      # the default matrix (about 10 min on 2 cores)
    python bench/run.py --quick              # smoke run of every runner, about 1 min
    python bench/run.py --cases 200000@0/full*1
    python bench/run.py --cases 50000@0,200000@0 --runners full,full_ip
    python bench/run.py --json results.json  # also write every run's figures
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crm_assets.contract import RESOURCE_NAMES, parse_timestamp  # noqa: E402
from crm_assets.sandbox import DEFAULT_SANDBOX_API_KEY, SandboxServer  # noqa: E402

BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
DAGSTER = str(Path(sys.executable).with_name("dagster"))
RUNNERS = ("limit", "peer", "full", "incr", "full_ip", "incr_ip")
# RECORDS@LATENCY_MS[/RUNNER+RUNNER...][*REPEAT]: without a runner list a case runs every runner,
# without *REPEAT it runs --repeat times.
DEFAULT_CASES = "50000@0,10000@20/limit+peer+full+full_ip,200000@0/full*1"
QUICK_CASES = "2000@0,1000@20/limit+peer+full+full_ip"
# The in-process executor (runners *_ip): run config selecting it for `dagster job execute -c`.
IN_PROCESS_CONFIG = "execution:\n  config:\n    in_process: {}\n"
CHANGED_FRACTION = 0.01
# "Flat" peak RSS: the largest case needs at most this factor of the smallest one's.
FLAT_RSS_GROWTH = 1.10
# Environment that would change what the children do (dlt config, Dagster instance, settings).
_SCRUBBED_PREFIXES = (
    "CRM_",
    "DESTINATION__",
    "RUNTIME__",
    "NORMALIZE__",
    "LOAD__",
    "EXTRACT__",
    "DATA_WRITER__",
    "SOURCES__",
)
_SCRUBBED_NAMES = ("DAGSTER_HOME", "DLT_DATA_DIR", "DLT_PROJECT_DIR", "API_KEY")
_STEP_RE = re.compile(r'Finished execution of step "crm_dlt_assets" in ([0-9hms.]+)\.')
_DURATION_PART_RE = re.compile(r"([0-9.]+)(ms|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Case:
    """Records per resource and the sandbox's added latency per data request."""

    records: int
    latency_ms: int
    runners: tuple[str, ...] = RUNNERS
    repeat: int | None = None

    @property
    def label(self) -> str:
        return f"4 x {self.records:,} @ {self.latency_ms} ms"


@dataclass
class RunResult:
    """One run of one runner."""

    runner: str
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    requests: int
    records: int
    step_s: float | None = None
    ok: bool = True
    note: str = ""


@dataclass
class CaseResult:
    """Every run of every runner for one case."""

    case: Case
    runs: dict[str, list[RunResult]] = field(default_factory=dict)

    def median(self, runner: str, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.runs.get(runner, []) if r.ok]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None


def parse_cases(spec: str) -> list[Case]:
    cases = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        item, _, repeat = item.partition("*")
        spec, _, runners = item.partition("/")
        records, _, latency = spec.partition("@")
        chosen = tuple(r for r in runners.split("+") if r) if runners else RUNNERS
        unknown = set(chosen) - set(RUNNERS)
        if unknown:
            raise ValueError(f"unknown runners {sorted(unknown)} in {item!r}")
        cases.append(
            Case(
                int(records.replace("_", "")),
                int(latency or 0),
                chosen,
                int(repeat) if repeat else None,
            )
        )
    return cases


# The source tree whose crm_assets the Dagster runners and the import timing use (--project).
PROJECT = {"root": ROOT}


def clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_SCRUBBED_PREFIXES) and k not in _SCRUBBED_NAMES
    }
    root = str(PROJECT["root"])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_child(
    command: Sequence[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> tuple[float, float, float, int]:
    """Runs ``command``; returns wall s, cpu s, peak RSS MB (kernel accounting) and exit code."""
    with open(log, "ab") as out:
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, process.returncode


def warehouse_matches(duckdb_path: Path, sandbox: SandboxServer) -> tuple[bool, str]:
    """Row counts and newest ``updated_at`` per table equal the API's."""
    state = sandbox.client.state()["resources"]
    problems = []
    with duckdb.connect(str(duckdb_path), read_only=True) as con:
        for name in RESOURCE_NAMES:
            try:
                rows, newest_us = con.execute(
                    f"SELECT COUNT(*), epoch_us(MAX(updated_at)) FROM crm.{name}"
                ).fetchone()
            except duckdb.Error as exc:
                problems.append(f"{name}: {exc}")
                continue
            expected = state[name]
            api_newest = expected["max_updated_at"]
            api_us = None
            if api_newest:
                stamp = parse_timestamp(api_newest)
                api_us = int(stamp.timestamp()) * 1_000_000 + stamp.microsecond
            if rows != expected["count"]:
                problems.append(f"{name}: {rows} rows, API has {expected['count']}")
            elif newest_us != api_us:
                problems.append(f"{name}: newest updated_at differs from the API's")
    return not problems, "; ".join(problems)


def step_seconds(log: Path, since: int) -> float | None:
    """Duration of the sync step as Dagster logs it (``850ms``, ``12.5s``, ``1m5s``)."""
    text = log.read_bytes()[since:].decode("utf-8", "replace")
    match = _STEP_RE.search(text)
    if not match:
        return None
    parts = _DURATION_PART_RE.findall(match.group(1))
    return sum(float(value) * _UNIT_SECONDS[unit] for value, unit in parts) if parts else None


class Bench:
    """Runs the runners of one case against one sandbox."""

    def __init__(self, sandbox: SandboxServer, case: Case, workdir: Path) -> None:
        self.sandbox = sandbox
        self.case = case
        self.workdir = workdir
        self.total = case.records * len(RESOURCE_NAMES)

    def _requests(self) -> int:
        return int(self.sandbox.client.state()["logged_requests"])

    def _fresh(self, tag: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=self.workdir))
        return path

    def limit(self) -> RunResult:
        self.sandbox.client.reset_log()
        env = clean_env()
        env["CRM_API_KEY"] = DEFAULT_SANDBOX_API_KEY
        log = self._fresh("limit") / "out.log"
        command = [PYTHON, str(BENCH / "io_limit.py"), self.sandbox.url]
        wall, cpu, rss, code = run_child(command, env, log)
        result = RunResult("limit", wall, cpu, rss, self._requests(), self.total, ok=code == 0)
        if code:
            result.note = f"exit {code}, see {log}"
        return result

    def peer(self) -> RunResult:
        self.sandbox.client.reset_log()
        tmp = self._fresh("peer")
        env = clean_env()
        env["API_KEY"] = DEFAULT_SANDBOX_API_KEY
        duckdb_path = tmp / "warehouse.duckdb"
        command = [
            PYTHON,
            str(BENCH / "peer.py"),
            self.sandbox.url,
            str(duckdb_path),
            str(tmp / "pipelines"),
        ]
        wall, cpu, rss, code = run_child(command, env, tmp / "out.log", cwd=tmp)
        result = RunResult("peer", wall, cpu, rss, self._requests(), self.total, ok=code == 0)
        if code:
            result.note = f"exit {code}, see {tmp / 'out.log'}"
        else:
            result.ok, result.note = warehouse_matches(duckdb_path, self.sandbox)
        return result

    def _dagster_env(self, tmp: Path) -> dict[str, str]:
        env = clean_env()
        home = tmp / "dagster_home"
        home.mkdir(exist_ok=True)
        (home / "dagster.yaml").touch()
        env.update(
            DAGSTER_HOME=str(home),
            CRM_BASE_URL=self.sandbox.url,
            CRM_API_KEY=DEFAULT_SANDBOX_API_KEY,
            CRM_DUCKDB_PATH=str(tmp / "warehouse.duckdb"),
            CRM_PIPELINES_DIR=str(tmp / "pipelines"),
            DLT_DATA_DIR=str(tmp / "dlt"),
        )
        return env

    def _job(self, tmp: Path, job: str, runner: str, records: int, in_process: bool) -> RunResult:
        self.sandbox.client.reset_log()
        env = self._dagster_env(tmp)
        log = tmp / "out.log"
        since = log.stat().st_size if log.exists() else 0
        command = [DAGSTER, "job", "execute", "-m", "crm_assets.definitions", "-j", job]
        if in_process:
            config = tmp / "in_process.yaml"
            config.write_text(IN_PROCESS_CONFIG)
            command += ["-c", str(config)]
        wall, cpu, rss, code = run_child(command, env, log, cwd=tmp)
        result = RunResult(runner, wall, cpu, rss, self._requests(), records, ok=code == 0)
        result.step_s = step_seconds(log, since)
        if code:
            result.note = f"exit {code}, see {log}"
        else:
            result.ok, result.note = warehouse_matches(tmp / "warehouse.duckdb", self.sandbox)
        return result

    def full_and_incr(self, want_full: bool, want_incr: bool, in_process: bool) -> list[RunResult]:
        """A full refresh into a new warehouse, then (1 % changed) an incremental run."""
        tmp = self._fresh("ours")
        suffix = "_ip" if in_process else ""
        results = []
        full = self._job(tmp, "crm_full_refresh_job", "full" + suffix, self.total, in_process)
        if want_full:
            results.append(full)
        if want_incr and full.ok:
            changed = 0
            for name in RESOURCE_NAMES:
                changed += len(self.sandbox.client.update(name, fraction=CHANGED_FRACTION))
            results.append(
                self._job(tmp, "crm_incremental_job", "incr" + suffix, changed, in_process)
            )
        return results


def run_case(
    case: Case,
    sandbox: SandboxServer,
    runners: Sequence[str],
    repeat: int,
    peer_max_records: int,
    workdir: Path,
) -> CaseResult:
    bench = Bench(sandbox, case, workdir)
    result = CaseResult(case)
    sandbox.client.reset()
    sandbox.client.set_latency(case.latency_ms)
    repeat = case.repeat or repeat
    for index in range(repeat):
        produced: list[RunResult] = []
        runners = [r for r in runners if r in case.runners]
        if "limit" in runners:
            produced.append(bench.limit())
        if "peer" in runners and case.records <= peer_max_records:
            sandbox.client.reset()
            sandbox.client.set_latency(case.latency_ms)
            produced.append(bench.peer())
        for suffix in ("", "_ip"):
            want_full, want_incr = "full" + suffix in runners, "incr" + suffix in runners
            if want_full or want_incr:
                sandbox.client.reset()
                sandbox.client.set_latency(case.latency_ms)
                produced.extend(bench.full_and_incr(want_full, want_incr, suffix == "_ip"))
        for run in produced:
            result.runs.setdefault(run.runner, []).append(run)
            step = f", step {run.step_s:.2f} s" if run.step_s is not None else ""
            print(
                f"  [{case.label}] run {index + 1}/{repeat} {run.runner:<7} "
                f"{run.wall_s:7.2f} s{step}, peak {run.peak_rss_mb:6.0f} MB, "
                f"{run.requests} requests{'' if run.ok else '  FAILED: ' + run.note}",
                flush=True,
            )
    return result


def time_imports(repeat: int) -> dict[str, float]:
    """Median wall time of importing the definitions vs ``import dagster, dlt`` (interleaved)."""
    env = clean_env()
    env["CRM_API_KEY"] = ""
    ours_cmd = [PYTHON, "-c", "import crm_assets.definitions"]
    base_cmd = [PYTHON, "-c", "import dagster, dlt"]
    ours, base, ratios = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "out.log"
        for _ in range(repeat + 1):
            a = run_child(ours_cmd, env, log)[0]
            b = run_child(base_cmd, env, log)[0]
            ours.append(a)
            base.append(b)
            ratios.append(a / b)
    # The first pair warms the file cache and is not counted.
    return {
        "definitions_s": statistics.median(ours[1:]),
        "dagster_dlt_s": statistics.median(base[1:]),
        "ratio": statistics.median(ratios[1:]),
    }


def fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def report(results: list[CaseResult], imports: dict[str, float] | None) -> list[str]:
    lines = []
    header = (
        f"{'case':<24}{'runner':<8}{'wall s':>8}{'step s':>8}{'rec/s':>10}{'peak MB':>9}"
        f"{'cpu s':>8}{'requests':>9}{'/peer':>7}{'/limit':>8}{'runs':>6}"
    )
    lines += [header, "-" * len(header)]
    for res in results:
        peer = res.median("peer", "wall_s")
        limit = res.median("limit", "wall_s")
        for runner in RUNNERS:
            runs = res.runs.get(runner)
            if not runs:
                continue
            wall = res.median(runner, "wall_s")
            records = res.median(runner, "records") or 0
            ok = sum(r.ok for r in runs)
            lines.append(
                f"{res.case.label:<24}{runner:<8}{fmt(wall, '.2f'):>8}"
                f"{fmt(res.median(runner, 'step_s'), '.2f'):>8}"
                f"{fmt(records / wall if wall else None, ',.0f'):>10}"
                f"{fmt(res.median(runner, 'peak_rss_mb'), '.0f'):>9}"
                f"{fmt(res.median(runner, 'cpu_s'), '.1f'):>8}"
                f"{fmt(res.median(runner, 'requests'), '.0f'):>9}"
                f"{fmt(wall / peer if wall and peer and runner != 'peer' else None, '.2f'):>7}"
                f"{fmt(wall / limit if wall and limit and runner != 'limit' else None, '.2f'):>8}"
                f"{f'{ok}/{len(runs)}':>6}"
            )
    lines.append("")
    lines.append(
        "targets (medians; 'step' = Dagster's duration of the sync step alone; *_ip = the same "
        "job with the in-process executor):"
    )
    for res in results:
        c = res.case
        peer, limit = res.median("peer", "wall_s"), res.median("limit", "wall_s")
        for suffix in ("", "_ip"):
            full = res.median("full" + suffix, "wall_s")
            step = res.median("full" + suffix, "step_s")
            incr = res.median("incr" + suffix, "wall_s")
            incr_step = res.median("incr" + suffix, "step_s")
            name = "full" + suffix
            if c.latency_ms == 0 and peer and full:
                verdict = "met" if peer / full >= 3 else "MISSED"
                lines.append(
                    f"  {c.label}: {name} {peer / full:.2f}x faster than the peer "
                    f"(target >= 3x): {verdict}"
                )
            if c.latency_ms > 0 and limit and full:
                verdict = "met" if full / limit <= 1.5 else "MISSED"
                step_part = f" (the step alone {step / limit:.2f}x)" if step else ""
                lines.append(
                    f"  {c.label}: {name} {full / limit:.2f}x the I/O limit{step_part} "
                    f"(target <= 1.5x): {verdict}"
                )
            if incr and full:
                verdict = "met" if incr / full <= 0.10 else "MISSED"
                step_part = (
                    f" (step {100 * incr_step / step:.1f} % of step)" if incr_step and step else ""
                )
                lines.append(
                    f"  {c.label}: incr{suffix} (1 % changed) {100 * incr / full:.1f} % of "
                    f"{name}{step_part} (target <= 10 %): {verdict}"
                )
    for runner in ("full", "full_ip"):
        rss = {
            r.case.records: r.median(runner, "peak_rss_mb")
            for r in results
            if r.case.latency_ms == 0
        }
        rss = {k: v for k, v in rss.items() if v}
        if not rss:
            continue
        worst = max(rss.values())
        spread = ", ".join(f"4 x {k:,}: {v:.0f} MB" for k, v in sorted(rss.items()))
        growth = max(rss.values()) / min(rss.values())
        flat = len(rss) > 1 and growth <= FLAT_RSS_GROWTH
        verdict = "met" if worst <= 400 and flat else "MISSED"
        if len(rss) == 1:
            verdict = ("within 400 MB" if worst <= 400 else "MISSED") + ", flatness not measured"
        lines.append(
            f"  peak RSS of {runner}: {spread} (target <= 400 MB and flat, i.e. largest/smallest "
            f"<= {FLAT_RSS_GROWTH}: {growth:.2f}): {verdict}"
        )
    if imports:
        verdict = "met" if imports["ratio"] <= 1.5 else "MISSED"
        lines.append(
            f"  import crm_assets.definitions {imports['definitions_s']:.2f} s vs import dagster, "
            f"dlt {imports['dagster_dlt_s']:.2f} s: {imports['ratio']:.2f}x (target <= 1.5x): "
            f"{verdict}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument(
        "--cases",
        default=None,
        help=f"RECORDS@LATENCY_MS[/RUNNER+RUNNER][*REPEAT],... (default {DEFAULT_CASES})",
    )
    parser.add_argument(
        "--runners",
        default=",".join(RUNNERS),
        help=f"only these of {','.join(RUNNERS)} (default all a case names)",
    )
    parser.add_argument("--repeat", type=int, default=None, help="runs per runner (default 3)")
    parser.add_argument(
        "--peer-max-records",
        type=int,
        default=50_000,
        help="skip the peer above this size (it needs GBs; default %(default)s)",
    )
    parser.add_argument(
        "--import-repeat", type=int, default=None, help="import timings (default 7; 0 skips)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: --cases {QUICK_CASES} --repeat 1 --import-repeat 3",
    )
    parser.add_argument(
        "--project",
        type=Path,
        help="run this source tree's crm_assets in the Dagster runners and the import timing, "
        "e.g. an older commit exported with `git archive <commit> | tar -x -C DIR` (before/after)",
    )
    parser.add_argument("--json", type=Path, help="write every run's figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    args = parser.parse_args(argv)
    try:
        cases = parse_cases(args.cases or (QUICK_CASES if args.quick else DEFAULT_CASES))
    except ValueError as exc:
        parser.error(str(exc))
    repeat = args.repeat or (1 if args.quick else 3)
    import_repeat = (
        args.import_repeat if args.import_repeat is not None else (3 if args.quick else 7)
    )
    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    unknown = set(runners) - set(RUNNERS)
    if unknown:
        parser.error(f"unknown runners {sorted(unknown)}; known: {', '.join(RUNNERS)}")

    if args.project:
        PROJECT["root"] = args.project.resolve()
    started = time.perf_counter()
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; cases: "
        f"{', '.join(c.label for c in cases)}; runners: {', '.join(runners)}; "
        f"repeat {repeat}; crm_assets from {PROJECT['root']}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="crm-bench-"))
    results: list[CaseResult] = []
    try:
        by_size: dict[int, list[Case]] = {}
        for case in cases:
            by_size.setdefault(case.records, []).append(case)
        for records, size_cases in by_size.items():
            t0 = time.perf_counter()
            with SandboxServer(records=records, seed=1, startup_timeout=300) as sandbox:
                print(
                    f"sandbox with 4 x {records:,} records up in {time.perf_counter() - t0:.1f} s",
                    flush=True,
                )
                for case in size_cases:
                    results.append(
                        run_case(
                            case,
                            sandbox,
                            runners,
                            repeat,
                            args.peer_max_records,
                            workdir,
                        )
                    )
        imports = time_imports(import_repeat) if import_repeat else None
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")
    results.sort(key=lambda r: (r.case.latency_ms, r.case.records))
    print()
    lines = report(results, imports)
    print("\n".join(lines))
    print(f"\ntotal bench time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "cases": [
                        {
                            "case": asdict(r.case),
                            "runs": {k: [asdict(x) for x in v] for k, v in r.runs.items()},
                        }
                        for r in results
                    ],
                    "imports": imports,
                },
                indent=2,
            )
        )
    failed = [r for res in results for runs in res.runs.values() for r in runs if not r.ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
