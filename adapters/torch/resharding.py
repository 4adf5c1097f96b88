"""Optimizer state of the class-parallel head at any world size: gather it into the full
(num_classes·k, in_features) layout on one rank, and load a rank's rows of it back."""

from __future__ import annotations

from typing import Any

__all__ = ["full_optimizer_state_dict", "load_full_optimizer_state_dict"]


def full_optimizer_state_dict(head: Any, optimizer: Any, dst: int = 0) -> dict[str, Any] | None:
    raise NotImplementedError


def load_full_optimizer_state_dict(head: Any, optimizer: Any, state: dict[str, Any]) -> None:
    raise NotImplementedError
