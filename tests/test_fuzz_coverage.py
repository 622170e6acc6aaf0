"""A short coverage-guided fuzz run of every target in tests/fuzz_coverage.py.

Each target runs in a process of its own (atheris instruments the target's
modules) for 3 s or 3,000 inputs, whichever comes first, from a seed corpus
written here; two run at a time: about 30 s of CPU for the module (measured), so
about 20 s on two idle cores.
A crash fails the test with libFuzzer's report (the input is kept as a crash-*
file in the test's temporary directory); it belongs in a regression test.
bench/fuzz_coverage.py runs the same targets longer.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fuzz_coverage import TARGETS, Run, frames, pack_frames, run_target

pytest.importorskip("atheris")

SECONDS = 3
RUNS = 3000


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    work = tmp_path_factory.mktemp("fuzz-coverage")

    def one(name: str) -> Run:
        return run_target(name, SECONDS, work, runs=RUNS, timeout=120)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(TARGETS, pool.map(one, TARGETS), strict=True))


@pytest.mark.parametrize("name", TARGETS)
def test_coverage_guided_fuzz_finds_no_crash(runs: dict[str, Run], name: str) -> None:
    run = runs[name]
    print(f"{name}: {run.executions} inputs, {run.features} features, {run.crashes} crashes")
    assert run.crashes == 0 and run.returncode == 0, run.output[-6000:]
    assert run.executions > 0 and run.features > 0, run.output[-3000:]


def test_frames_round_trip() -> None:
    items = [b"", b"\x14abc", bytes(300)]
    assert frames(pack_frames(items)) == items
    assert frames(b"\x00\x05ab") == [b"ab"]  # a length past the end takes what is left
