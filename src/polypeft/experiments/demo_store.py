"""Where each demo part keeps its result: one folder per part and settings, so a rerun reuses what finished.

A part's folder name carries a hash of its settings; a part run again with other settings lands in a new folder.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..core.fileio import write_json

RESULT_FILE = "result.json"


@dataclass
class Row:
    """One line of the demo's summary table: a method against its baseline on one task."""

    method: str
    task: str
    metric: str
    baseline_name: str
    baseline: float
    with_method: float
    higher_is_better: bool = True
    extra_train: str = "0"
    extra_inference: str = "0"
    seconds: float = 0.0
    agrees_with_full_bench: Optional[bool] = None  # None: no full benchmark to compare with
    full_bench: str = ""  # the full benchmark's figure and section, e.g. "+11.9 (RESULTS §5)"
    interval: Optional[list[float]] = None  # the gain's 95 % interval, signed as the gain
    noise: str = ""  # what the interval resamples, e.g. "879 test queries x 2 seeds"

    @property
    def gain(self) -> float:
        """Improvement over the baseline, positive when the method is better (lower CE counts as better)."""
        difference = self.with_method - self.baseline
        return difference if self.higher_is_better else -difference

    @property
    def outside_noise(self) -> Optional[bool]:
        """True when the gain's interval excludes zero; None when the row has no interval."""
        if self.interval is None:
            return None
        return self.interval[0] > 0 or self.interval[1] < 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gain": round(self.gain, 4), "outside_noise": self.outside_noise}


@dataclass
class PartResult:
    """What one part measured: its table rows, free-form notes (one line each) and its raw details."""

    part: str
    settings: dict
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    seconds: float = 0.0
    reused: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"part": self.part, "settings": self.settings, "rows": [row.as_dict() for row in self.rows],
                "notes": self.notes, "details": self.details, "seconds": round(self.seconds, 1)}

    @classmethod
    def from_dict(cls, data: dict) -> "PartResult":
        rows = [Row(**{k: v for k, v in row.items() if k not in ("gain", "outside_noise")}) for row in data["rows"]]
        return cls(data["part"], data["settings"], rows, data["notes"], data["details"], data["seconds"], reused=True)


def settings_key(settings: dict) -> str:
    """A short, stable hash of a part's settings (JSON with sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def part_dir(output_dir: str | Path, part: str, settings: dict) -> Path:
    return Path(output_dir) / f"{part}-{settings_key(settings)}"


def finished_result(output_dir: str | Path, part: str, settings: dict) -> Optional[PartResult]:
    """The stored result of this part with these very settings, or None when it has not finished."""
    path = part_dir(output_dir, part, settings) / RESULT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("settings") != json.loads(json.dumps(settings, default=str)):
        return None
    try:
        return PartResult.from_dict(data)
    except (TypeError, KeyError):  # written by an older demo: computed again
        return None


def run_part(output_dir: str | Path, part: str, settings: dict, compute: Callable[[Path], PartResult]) -> PartResult:
    """Reuse the part's finished result, or compute it in its folder, time it and store it atomically."""
    stored = finished_result(output_dir, part, settings)
    folder = part_dir(output_dir, part, settings)
    if stored is not None:
        print(f"[{part}] finished earlier with these settings, reused: {folder / RESULT_FILE}", flush=True)
        return stored
    folder.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    result = compute(folder)
    result.seconds = time.perf_counter() - started
    result.details["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    result.settings = settings
    write_json(folder / RESULT_FILE, result.as_dict())
    print(f"[{part}] done in {result.seconds:.0f} s: {folder / RESULT_FILE}", flush=True)
    return result
