from __future__ import annotations

from pathlib import Path

from twisted.internet.testing import MemoryReactorClock

from hub.intake.monitoring import Monitoring, status
from hub.intake.nsca import CheckResult
from hub.intake.settings import NSCASettings
from hub.store.registry import Registry


def test_results_of_one_turn_are_stored_together_with_bounded_history(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=clock.seconds)
    monitoring = Monitoring(registry, NSCASettings(history=2, strict_host=True), clock)
    for i in range(5):
        monitoring.deliver("site-a", CheckResult("site-a", "load", i % 3, f"run {i}", 100 + i))
    monitoring.deliver("site-a", CheckResult("spoof", "load", 2, "fake", 100))
    assert status(registry) == []  # not yet: stored at the end of the reactor turn
    clock.advance(0)
    [latest] = status(registry)
    assert (latest.node, latest.host, latest.output, latest.code) == ("site-a", "site-a",
                                                                     "run 4", 1)
    kept = registry.query("SELECT output FROM results ORDER BY id")
    assert kept == [("run 3",), ("run 4",)]
    monitoring.deliver("", CheckResult("lab", "", 0, "up", 200))
    monitoring.flush()  # as at shutdown
    assert [(s.node, s.host, s.service) for s in status(registry)] == [
        ("", "lab", ""), ("site-a", "site-a", "load")]
    assert status(registry, "SITE-A")[0].host == "site-a"
    clock.advance(0)  # the cancelled flush does nothing more
    assert len(registry.query("SELECT id FROM results")) == 3
