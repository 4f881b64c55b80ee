"""The budget ledger: rounds, wall time and evaluation episodes, charged by the controller only.

The proposer sees a frozen `BudgetView` (it may plan with what is left) and has no path to the ledger: the
guard refuses any change naming `budget`, and the limits are set once from the service's configuration.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BudgetLimits:
    rounds: int
    wall_time_s: float
    episodes: int

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.wall_time_s <= 0 or self.episodes < 1:
            raise ValueError(f"budget {self}: rounds, wall time and episodes must all be positive")


@dataclass(frozen=True)
class BudgetView:
    """A read-only snapshot: what the limits are and what has been spent."""

    limits: BudgetLimits
    rounds: int
    wall_time_s: float
    episodes: int

    @property
    def exhausted(self) -> str | None:
        """Why the budget is spent, or None while some of every kind is left."""
        if self.rounds >= self.limits.rounds:
            return f"rounds spent: {self.rounds} of {self.limits.rounds}"
        if self.wall_time_s >= self.limits.wall_time_s:
            return f"wall time spent: {self.wall_time_s:.0f} s of {self.limits.wall_time_s:.0f} s"
        if self.episodes >= self.limits.episodes:
            return f"evaluation episodes spent: {self.episodes} of {self.limits.episodes}"
        return None

    def to_json(self) -> dict[str, object]:
        return {
            "limits": {
                "rounds": self.limits.rounds,
                "wall_time_s": self.limits.wall_time_s,
                "episodes": self.limits.episodes,
            },
            "spent": {"rounds": self.rounds, "wall_time_s": round(self.wall_time_s, 1), "episodes": self.episodes},
            "exhausted": self.exhausted,
        }


class BudgetLedger:
    """Charges are monotone; only the controller holds the ledger."""

    def __init__(self, limits: BudgetLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self._started = clock()
        self._rounds = 0
        self._episodes = 0

    def charge_round(self) -> None:
        self._rounds += 1

    def charge_episodes(self, episodes: int) -> None:
        if episodes < 0:
            raise ValueError(f"episodes {episodes}: a charge cannot refund")
        self._episodes += episodes

    def episodes_left(self) -> int:
        return max(0, self._limits.episodes - self._episodes)

    def view(self) -> BudgetView:
        return BudgetView(self._limits, self._rounds, self._clock() - self._started, self._episodes)
