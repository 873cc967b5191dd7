"""Long runs of the fuzz targets (tests/fuzz/fuzz_*.py): a million inputs each by default.

    nice -n 19 .venv/bin/python bench/fuzz_bench.py                     # every target, 1e6 each
    nice -n 19 .venv/bin/python bench/fuzz_bench.py --runs 100000 --targets stun frames
    nice -n 19 .venv/bin/python bench/fuzz_bench.py --jobs 2 --keep /tmp/fuzz-corpus

Each target starts from a fresh corpus seeded by tests/fuzz/seeds.py (or, with --keep DIR, the
corpus left in DIR by an earlier run, which it then grows), runs `-runs=N` inputs with the same
limits as the short runs of tests/unit/test_fuzz.py (-timeout, -rss_limit_mb, -malloc_limit_mb
and the targets' own address-space cap), and the table shows per target: inputs executed, wall
time, inputs per second, coverage (libFuzzer's final cov: edges and ft: features of the
instrumented meshwright code), the corpus it ended with, its peak RSS, and findings (crash-,
timeout-, oom- files; their paths are printed under the table).

Exit status: 0 if every target ran all its inputs without a finding, 1 if not. Not a test: the
rates depend on the machine and its load (run it under nice on a shared machine).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from report import table  # bench/report.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "tests" / "fuzz"
TARGETS = sorted(p.stem.removeprefix("fuzz_") for p in FUZZ.glob("fuzz_*.py"))
FINDINGS = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")
_DONE = re.compile(r"^#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)", re.MULTILINE)
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.MULTILINE)


@dataclass
class Result:
    target: str
    returncode: int
    wall: float
    executed: int = 0
    cov: int = 0
    features: int = 0
    corpus: str = "?"
    peak_rss_mb: int = 0
    findings: list[Path] = field(default_factory=list)
    log: Path | None = None

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and not self.findings


def run(target: str, runs: int, work: Path, corpus: Path, args: argparse.Namespace) -> Result:
    artifacts = work / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log = work / f"{target}.log"
    command = [
        sys.executable,
        str(FUZZ / f"fuzz_{target}.py"),
        f"-runs={runs}",
        f"-timeout={args.timeout}",
        f"-rss_limit_mb={args.rss_limit_mb}",
        f"-malloc_limit_mb={args.rss_limit_mb}",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
        str(corpus),
    ]
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(command, cwd=work, stdout=out, stderr=subprocess.STDOUT, check=False)
    result = Result(target, proc.returncode, time.monotonic() - started, log=log)
    text = log.read_text(errors="replace")
    done = _DONE.search(text)
    if done:
        result.executed, result.cov, result.features = (int(g) for g in done.groups()[:3])
        result.corpus = f"{done.group(4)} ({done.group(5)})"
    stats = {k: int(v) for k, v in _STAT.findall(text)}
    result.executed = stats.get("number_of_executed_units", result.executed)
    result.peak_rss_mb = stats.get("peak_rss_mb", 0)
    result.findings = sorted(p for p in artifacts.iterdir() if p.name.startswith(FINDINGS))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=TARGETS)
    parser.add_argument("--jobs", type=int, default=1, help="targets run at once")
    parser.add_argument("--timeout", type=int, default=5, help="seconds one input may take")
    parser.add_argument("--rss-limit-mb", type=int, default=512)
    parser.add_argument(
        "--keep", type=Path, help="corpus directory to start from and grow (default: a fresh one)"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="meshwright-fuzz-"))
    corpus_root = args.keep or work / "corpus"
    seeds = work / "seeds"
    subprocess.run([sys.executable, str(FUZZ / "seeds.py"), str(seeds)], check=True)
    for target in args.targets:
        if not (corpus_root / target).exists():
            shutil.copytree(seeds / target, corpus_root / target)

    def one(target: str) -> Result:
        result = run(target, args.runs, work / target, corpus_root / target, args)
        state = "clean" if result.clean else "FINDINGS"
        print(f"{target}: {result.executed} inputs in {result.wall:.0f} s, {state}", flush=True)
        return result

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, args.targets))
    rows = [
        (
            r.target,
            f"{r.executed:,}",
            f"{r.wall:.0f} s",
            f"{r.executed / r.wall:,.0f}" if r.wall else "-",
            str(r.cov),
            str(r.features),
            r.corpus,
            f"{r.peak_rss_mb} MiB",
            str(len(r.findings)) if r.returncode == 0 or r.findings else f"rc {r.returncode}",
        )
        for r in results
    ]
    header = ("target", "inputs", "wall", "inputs/s", "cov", "ft", "corpus", "peak RSS", "found")
    print(table([header, *rows]))
    print(
        f"{args.runs:,} runs per target, --jobs {args.jobs}, in {time.monotonic() - started:.0f} s;"
        f" logs in {work}"
    )
    for r in results:
        for finding in r.findings:
            print(f"{r.target}: {finding}")
        if not r.clean:
            print(f"{r.target}: exit {r.returncode}, see {r.log}")
    return 0 if all(r.clean for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
