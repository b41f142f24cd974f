"""benchmarks/time_to_reward.py: the step that first reaches the target's trailing mean."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("time_to_reward", ROOT / "benchmarks" / "time_to_reward.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_first_step_whose_trailing_mean_reaches_the_target() -> None:
    first = _bench().first_reaching
    lines = [{"step": i + 1, "reward_mean": r} for i, r in enumerate([0.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0])]
    assert first(lines, 0.9, 3)["step"] == 7  # steps 5-7 average 1.0; every window before at most 0.83
    assert first(lines, 0.8, 3)["step"] == 4  # steps 2-4 average 0.83; the first full window (1-3) 0.67
    assert first(lines, 1.1, 3) is None
    assert first([{"step": 1, "reward_mean": None}, {"step": 2, "reward_mean": 1.0}], 0.5, 2)["step"] == 2
