"""Merge `polypeft classify` results of the same recipe run as separate processes (one seed each).

Run: python bench/merge_classify.py OUT_DIR RESULT.json [RESULT.json ...]  -> OUT_DIR/classify.{json,md}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from polypeft.core.fileio import write_json, write_text
from polypeft.tasks.encoder_finetune import markdown_report, summarize


def main() -> None:
    out, paths = Path(sys.argv[1]), sys.argv[2:]
    parts = [json.loads(Path(path).read_text(encoding="utf-8")) for path in paths]
    merged = dict(parts[0])
    merged["runs"] = [run for part in parts for run in part["runs"]]
    merged["summary"] = summarize(merged["runs"])
    for part in parts:  # throughput is measured in one process only
        if "throughput" in part:
            merged["throughput"] = part["throughput"]
    merged["merged_from"] = paths
    write_json(out / "classify.json", merged)
    write_text(out / "classify.md", markdown_report(merged))
    print(markdown_report(merged))


if __name__ == "__main__":
    main()
