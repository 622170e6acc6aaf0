"""The console gateway's node chooser: a numbered menu and a tiny line editor.

Pure logic: bytes typed by the operator in, bytes to show and a decision out.
The operator's terminal is in raw mode, so echo and editing are ours.
"""

from __future__ import annotations

from attrs import define, field, frozen

PROMPT = b"Connect to node > "


@frozen
class Entry:
    name: str
    online: bool
    # A master/clone pair's entry says which member it reaches: "master site-a".
    via: str = ""


@frozen
class Select:
    node: str


@frozen
class Quit:
    pass


Decision = Select | Quit | None


@define
class Chooser:
    entries: list[Entry]
    _line: bytearray = field(factory=bytearray)
    _escape: int = 0

    def menu(self) -> bytes:
        if not self.entries:
            lines = [b"No nodes are available to you.", b"q: quit"]
        else:
            lines = [f"{i}: {e.name} ({'online' if e.online else 'offline'}"
                     f"{', pair: ' + e.via if e.via else ''})".encode()
                     for i, e in enumerate(self.entries, 1)]
            lines.append(b"q: quit")
        return b"\r\n".join(lines) + b"\r\n" + PROMPT

    def feed(self, data: bytes) -> tuple[bytes, Decision]:
        """Consume typed bytes; return what to echo and what was decided, if anything.
        Bytes after a decision are dropped (the next screen starts clean)."""
        out = bytearray()
        for byte in data:
            char = bytes([byte])
            if self._skip_escape(byte):
                continue
            if char in (b"\r", b"\n"):
                text = self._line.decode("utf-8", "replace").strip()
                self._line.clear()
                out += b"\r\n"
                if not text:
                    out += PROMPT
                    continue
                decision, message = self.choose(text)
                if decision is not None:
                    return bytes(out), decision
                out += message + PROMPT
            elif char in (b"\x7f", b"\x08"):
                if self._line:
                    del self._line[-1]
                    out += b"\x08 \x08"
            elif char == b"\x03":  # Ctrl-C: abandon the line
                self._line.clear()
                out += b"^C\r\n" + PROMPT
            elif char == b"\x04":  # Ctrl-D on an empty line leaves
                if not self._line:
                    return bytes(out) + b"\r\n", Quit()
            elif char == b"\x0c":  # Ctrl-L: show the menu again
                out += b"\r\n" + self.menu() + bytes(self._line)
            elif 0x20 <= byte < 0x7f and len(self._line) < 128:
                self._line += char
                out += char
        return bytes(out), None

    def _skip_escape(self, byte: int) -> bool:
        """Swallow terminal escape sequences (arrow keys and the like)."""
        if self._escape == 0:
            if byte == 0x1B:
                self._escape = 1
                return True
            return False
        if self._escape == 1:
            self._escape = 2 if byte in (0x5B, 0x4F) else 0  # CSI "[" or SS3 "O"
            return True
        if 0x40 <= byte <= 0x7E:
            self._escape = 0
        return True

    def choose(self, text: str) -> tuple[Decision, bytes]:
        if text.lower() in ("q", "quit", "exit"):
            return Quit(), b""
        if text.isdigit():
            index = int(text)
            if 1 <= index <= len(self.entries):
                return Select(self.entries[index - 1].name), b""
            return None, f"No node number {index}.\r\n".encode()
        for entry in self.entries:
            if entry.name.lower() == text.lower():
                return Select(entry.name), b""
        return None, f"No such node: {text}\r\n".encode()
