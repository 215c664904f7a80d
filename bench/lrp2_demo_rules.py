"""The demo's LRP2 part (`polypeft demo lrp2`) run once, its layer search then decided by every choice rule.

The demo itself uses the library's default rule; this shows whether another rule would choose other layers there.
Usage: python bench/lrp2_demo_rules.py [--out bench/experiments/lrp2_rule_power/demo_rules.json] [--demo-dir runs/demo_rules]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import time
from pathlib import Path

from polypeft.core.fileio import write_json
from polypeft.experiments import demo_lrp2
from polypeft.experiments.demo import run_demo
from polypeft.interventions.choice import RULES

KEPT = ("lirp_layer", "decision", "reason", "gain", "test_gain", "threshold", "z", "best_cell")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/experiments/lrp2_rule_power/demo_rules.json")
    parser.add_argument("--demo-dir", default="runs/demo_rules", help="the demo's output folder (a finished part "
                        "is reused by the demo, so point this at a fresh folder to search again)")
    args = parser.parse_args()
    searches = []
    search_layers = demo_lrp2.search_layers

    def capturing(*positional, **named):  # the demo's own call, kept to read every rule off the same outcomes
        searches.append(search_layers(*positional, **named))
        return searches[-1]

    demo_lrp2.search_layers = capturing
    started = time.perf_counter()
    summary = run_demo(["lrp2"], output_dir=args.demo_dir)
    if not searches:
        raise SystemExit(f"{args.demo_dir} already holds a finished LRP2 part; give a fresh --demo-dir")
    search = searches[-1]
    decided = {rule: {language: {key: value for key, value in dataclasses.replace(search, rule=rule).best(language)
                                 .items() if key in KEPT} for language in search.languages} for rule in RULES}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    write_json(args.out, {"default_rule": search.rule, "rules": decided, "demo_rows": summary["rows"],
                          "seconds": round(time.perf_counter() - started, 1), "date": time.strftime("%Y-%m-%d"),
                          "commit": commit, "machine": platform.platform()})
    for rule, languages in decided.items():
        print(rule, {language: row["lirp_layer"] for language, row in languages.items()})
    print(json.dumps(summary["rows"], indent=1, default=str))


if __name__ == "__main__":
    main()
