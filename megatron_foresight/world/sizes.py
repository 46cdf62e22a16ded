"""The sizes of the built-in world (a light module: the command line reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorldSizes:
    cities: int = 60
    people: int = 240
    guilds: int = 40
    search_tasks: int = 2000
    math_tasks: int = 3000
    trajectories: int = 4000
    """Trajectories played on training tasks (half search, half math)."""
    validation_trajectories: int = 400
    """Trajectories played on validation tasks."""
    mc_samples: int = 8
    """Continuations per intermediate state for its Monte-Carlo success estimate (0: none)."""
    noise: tuple[float, ...] = (0.0, 0.1, 0.2, 0.35, 0.5)
    """The scripted experts' error rates, used in turn."""
    multi_hop_fraction: float = 0.5
    """Share of the search questions that take two hops (a bridge entity, then its attribute);
    the others take one."""
    math_max_steps: int = 3
    """Word problems with at most this many calculator steps (2 or 3)."""
    top_k: int = 3
    search_max_turns: int = 6
    math_max_turns: int = 6
    vocab_size: int = 2048
    """Sentencepiece vocabulary of the world's tokenizer (0: train none)."""

    def check(self) -> None:
        for name in ("cities", "people", "guilds", "search_tasks", "math_tasks", "top_k",
                     "search_max_turns", "math_max_turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("trajectories", "validation_trajectories", "mc_samples", "vocab_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.multi_hop_fraction <= 1:
            raise ValueError(f"multi_hop_fraction must lie in [0, 1], got "
                             f"{self.multi_hop_fraction}")
        if self.math_max_steps not in (2, 3):
            raise ValueError(f"math_max_steps must be 2 or 3 (the word problems take 2 or 3 "
                             f"steps), got {self.math_max_steps}")
        if not self.noise or not all(0 <= p <= 1 for p in self.noise):
            raise ValueError(f"noise levels must lie in [0, 1], got {self.noise}")
        if self.cities < 2 or self.people < 2 or self.guilds < 1:
            raise ValueError("the world needs at least 2 cities, 2 people and 1 guild")
