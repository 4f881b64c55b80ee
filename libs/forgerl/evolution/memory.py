"""The controller's memory: markdown notes of the last rounds, which the next proposal reads first."""

from __future__ import annotations

import re
from pathlib import Path

_HEADING = re.compile(r"^## Round ", re.MULTILINE)


class Memory:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, round_index: int, title: str, lines: list[str]) -> None:
        note = f"## Round {round_index}: {title}\n\n" + "".join(f"- {line}\n" for line in lines) + "\n"
        with self.path.open("a") as f:
            f.write(note)

    def recent(self, rounds: int = 5) -> str:
        """The last `rounds` notes, oldest first ('' before the first round)."""
        if not self.path.exists():
            return ""
        text = self.path.read_text()
        starts = [m.start() for m in _HEADING.finditer(text)]
        return text[starts[-rounds] :] if len(starts) > rounds else text
