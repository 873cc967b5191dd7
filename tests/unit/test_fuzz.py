"""Every fuzz target in tests/fuzz runs for a short, bounded time on a fresh corpus seeded from
real messages, and must finish clean: exit 0, and no crash, timeout or out-of-memory input
written. The long runs (a million inputs each) are bench/fuzz_bench.py's, recorded in
docs/fuzzing.md.

atheris is a pinned test dependency (requirements.lock): without it this fails, never skips.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "tests" / "fuzz"
TARGETS = sorted(p.stem.removeprefix("fuzz_") for p in FUZZ.glob("fuzz_*.py"))
SECONDS = 8
# -timeout: one input taking this long is a hang. -rss_limit_mb: growth across inputs. And
# -malloc_limit_mb, which only bites with a sanitizer's malloc hooks: the targets also cap
# their own address space (tests/fuzz/harness.py), so one huge allocation fails the run.
FLAGS = [
    f"-max_total_time={SECONDS}",
    "-rss_limit_mb=512",
    "-malloc_limit_mb=512",
    "-timeout=5",
    "-print_final_stats=1",
]
FINDINGS = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")
Results = dict[str, tuple[Path, "subprocess.CompletedProcess[str]", float]]


def test_atheris_is_installed() -> None:
    # A clear failure of its own, rather than six subprocesses failing on an import.
    assert importlib.util.find_spec("atheris") is not None, (
        "atheris is missing: `make venv` installs it from requirements.lock"
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seeds")
    subprocess.run([sys.executable, str(FUZZ / "seeds.py"), str(out)], check=True)
    return out


def test_every_target_has_seeds(corpus: Path) -> None:
    assert sorted(p.name for p in corpus.iterdir()) == TARGETS
    for target in TARGETS:
        assert len(list((corpus / target).iterdir())) >= 4, target


def run(target: str, work: Path) -> tuple[str, subprocess.CompletedProcess[str], float]:
    # Findings go to a directory of their own, where the test looks for them.
    artifacts = work / "artifacts"
    artifacts.mkdir(parents=True)
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            str(FUZZ / f"fuzz_{target}.py"),
            *FLAGS,
            f"-artifact_prefix={artifacts}/",
            str(work / "corpus"),
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=SECONDS + 40,
        check=False,
    )
    return target, proc, time.monotonic() - started


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Results:
    base = tmp_path_factory.mktemp("fuzz")
    works = {}
    for target in TARGETS:
        work = base / target
        # A fresh copy per run: libFuzzer adds what it finds to the corpus directory.
        shutil.copytree(corpus / target, work / "corpus")
        works[target] = work
    # Three at a time (two waves of about 10 s on two cores) keeps the module near 20 s.
    with ThreadPoolExecutor(max_workers=max(3, os.cpu_count() or 1)) as pool:
        done = list(pool.map(lambda t: run(t, works[t]), TARGETS))
    return {t: (works[t], proc, elapsed) for t, proc, elapsed in done}


@pytest.mark.parametrize("target", TARGETS)
def test_target_runs_clean(target: str, results: Results) -> None:
    work, proc, elapsed = results[target]
    log = proc.stderr
    findings = sorted(p.name for p in (work / "artifacts").iterdir() if p.name.startswith(FINDINGS))
    assert proc.returncode == 0 and not findings, f"{target}: {findings}\n{log[-6000:]}"
    done = re.search(r"^#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+)", log, re.MULTILINE)
    assert done, log[-3000:]
    executed, cov, features = (int(g) for g in done.groups())
    print(f"{target}: {executed} inputs, cov {cov}, ft {features} in {elapsed:.1f} s")
    # Fewer would mean the target barely got past its seeds (the slowest, relay_sites, runs
    # a few hundred inputs a second on a third of a core).
    assert executed > 200, log[-3000:]
