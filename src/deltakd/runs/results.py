"""Typed run results: the one place ``results.json`` is written and read.

Every family writes the same common fields; what a family adds (the teacher comparison of a
distillation run, a multistage stage's structure and retrieval metrics, ...) goes in ``extra``
and is stored flat beside the common fields, so ``results.json`` stays one flat JSON object.
:class:`RunResults` is also a mapping over that object (``results["metrics"]``,
``results.get("distill")``), which is how tables and reports read any family's results.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import DeltakdError


@dataclass
class RunResults(MutableMapping[str, Any]):
    """What a finished run measured. ``metrics``: split -> metric -> value (the best model)."""

    name: str
    run_dir: str
    family: str | None = None
    task: str | None = None
    main_metric: str | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    examples: dict[str, Any] = field(default_factory=dict)
    train_steps: int = 0
    train_samples_per_second: float = float("nan")
    train_wall_time_s: float = float("nan")
    wall_time_s: float = float("nan")
    resumed_from: str | None = None
    best_step: str | None = None
    last_step: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific, stored flat

    # --- JSON --------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        clash = set(out) & set(self.extra)
        if clash:
            raise ValueError(f"results: extra keys {sorted(clash)} shadow common fields")
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RunResults":
        known = {f.name for f in fields(cls)} - {"extra"}
        if "name" not in data or "run_dir" not in data:
            raise ValueError("results: 'name' and 'run_dir' are required")
        common = {k: v for k, v in data.items() if k in known}
        return cls(**common, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def read(cls, path: str | Path) -> "RunResults":
        """``results.json`` (a file or the run directory holding it); one-line error when unreadable."""
        path = Path(path)
        file = path / "results.json" if path.is_dir() else path
        try:
            return cls.from_json(json.loads(file.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise DeltakdError(f"run '{file.parent}' has not finished (no results.json)") from None
        except (OSError, ValueError, TypeError) as e:
            raise DeltakdError(f"{file}: not a readable results file ({str(e).splitlines()[0]})") from None

    # --- a mapping over the flat JSON object -------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        if key != "extra" and key in _COMMON:
            return getattr(self, key)
        return self.extra[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(_COMMON) + len(self.extra)

    def __setitem__(self, key: str, value: Any) -> None:
        if key != "extra" and key in _COMMON:
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __delitem__(self, key: str) -> None:
        if key in _COMMON:
            raise KeyError(f"'{key}' is a common field of every run's results")
        del self.extra[key]


_COMMON = frozenset(f.name for f in fields(RunResults)) - {"extra"}
