"""A login name is the peer's text: the authentication lines show it, never format it."""

from __future__ import annotations

from pathlib import Path

from memory_hub import connect_client, make_hub, start_factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher


def test_braces_in_a_login_name_are_shown_not_formatted(tmp_path: Path) -> None:
    # As a format, "{log_format}" gave "Unable to format event ...": a line fail2ban's
    # "Invalid user" and "Failed password" rules did not match, for every guess.
    clock = MemoryReactorClock()
    factory = start_factory(make_hub(tmp_path, clock, keepalive="0"))
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        text = formatEvent(event)
        if event.get("log_namespace") == "hub.access.userauth" and " from " in text:
            lines.append(text)

    globalLogPublisher.addObserver(observe)
    try:
        connect_client(factory, clock, b"{log_format}{0}", password=b"guess",
                       peer="192.0.2.7")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert lines == ["Invalid user {log_format}{0} from 192.0.2.7 port 40000",
                     "Failed password for invalid user {log_format}{0} from 192.0.2.7 "
                     "port 40000 ssh2"]
