"""An append-only, hash-chained audit log (JSON lines).

Each entry carries the SHA-256 of the previous entry's hash and its own canonical JSON, so editing,
dropping or reordering any entry breaks every hash after it; `verify` recomputes the chain. The file is
opened for appending only; nothing in the controller rewrites it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def _digest(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class ChainProblem:
    seq: int
    problem: str


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        entries = self.entries()
        self._seq = len(entries)
        self._last = entries[-1]["hash"] if entries else GENESIS

    def append(self, kind: str, actor: str, data: dict[str, Any]) -> dict[str, Any]:
        """Record one event; returns the entry with its sequence number and hash."""
        with self._lock:
            entry: dict[str, Any] = {
                "seq": self._seq,
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "kind": kind,
                "actor": actor,
                "data": data,
                "prev": self._last,
            }
            entry["hash"] = _digest(entry)
            with self.path.open("a") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
            self._seq += 1
            self._last = entry["hash"]
            return entry

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def verify(self) -> list[ChainProblem]:
        """Every break of the chain; an empty list means the log is intact."""
        problems = []
        prev = GENESIS
        for index, entry in enumerate(self.entries()):
            if entry.get("seq") != index:
                problems.append(ChainProblem(index, f"sequence number {entry.get('seq')} where {index} belongs"))
            if entry.get("prev") != prev:
                problems.append(ChainProblem(index, "does not link to the previous entry's hash"))
            if _digest(entry) != entry.get("hash"):
                problems.append(ChainProblem(index, "content does not match its hash (edited after writing)"))
            prev = str(entry.get("hash"))
        return problems
