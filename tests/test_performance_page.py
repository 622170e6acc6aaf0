"""docs/performance.md shows the current figures only, with their machine and commands first."""

from __future__ import annotations

import re
from pathlib import Path

PAGE = Path(__file__).parent.parent / "docs" / "performance.md"


def test_the_page_opens_with_the_figures_their_machine_and_commands() -> None:
    text = PAGE.read_text()
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert headings[:3] == ["The figures at a glance", "The machine", "Commands"]
    assert "git log -p docs/performance.md" in text.split("\n## ")[0]


def test_earlier_rounds_live_in_git_history_not_on_the_page() -> None:
    text = PAGE.read_text().lower()
    for earlier in ("previous round", "earlier write-up", "earlier runs", "this round",
                    "what changed since"):
        assert earlier not in text, earlier
