"""The model card (README.md) written next to every save: what a reader of the Hub page needs to know.

Method, languages, routes, base model, parameter counts and the results the run recorded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from .routed_model import RoutedModel

CARD_NAME = "README.md"


def front_matter(poly: RoutedModel) -> str:
    base = getattr(getattr(poly.base_model, "config", None), "_name_or_path", None)
    # The Hub checks `language` against ISO 639 codes; other codes stay in the body only.
    iso_codes = [code for code in poly.registry.languages if re.fullmatch(r"[a-z]{2,3}", code)]
    lines = ["---", "library_name: polypeft", "tags:", "- polypeft", f"- {poly.poly_config.method}"]
    is_hub_id = base and re.fullmatch(r"[\w.\-]+/[\w.\-]+", base) and not Path(base).exists()
    if is_hub_id:  # the Hub links Hub ids only, not local paths
        lines.append(f"base_model: {base}")
    if iso_codes:
        lines += ["language:"] + [f"- {code}" for code in iso_codes]
    return "\n".join(lines + ["---"])


def route_lines(poly: RoutedModel) -> list[str]:
    config = poly.poly_config
    if config.language_agnostic:
        return ["One language-agnostic route: the model runs with or without `src_lang=`/`tgt_lang=`."]
    synthesis = getattr(config, "synthesis", None)
    lines = [f"Route ids, in the order the weights store them: {poly.registry.allowed()}."]
    if synthesis == "pair":
        lines.append("Pair-wise: every (src_lang, tgt_lang) pair is its own route.")
    elif synthesis == "language":
        lines.append("Language-wise: the encoder reads `src_lang`, the decoder (and decoder-only models) `tgt_lang`.")
    if poly.registry.shared_route:
        lines.append("The `shared` route (fuse distillation) serves every language with one set of weights.")
    return lines


def model_card(poly: RoutedModel, results: Optional[dict[str, Any]] = None) -> str:
    """Markdown with Hub front matter; `results` (any JSON-able mapping) appear as a table and as JSON."""
    config = poly.poly_config
    base = getattr(getattr(poly.base_model, "config", None), "_name_or_path", None) or "(not recorded)"
    counts = poly.parameter_counts().as_dict()
    parts = [
        front_matter(poly),
        f"# polypeft {config.method} routes for {type(poly.base_model).__name__}",
        f"- method: `{config.method}`\n- base model: `{base}` ({type(poly.base_model).__name__})\n"
        f"- languages: {', '.join(config.languages)}\n- base weights trained: {not config.freeze_base}",
        "## Routes\n\n" + "\n".join(route_lines(poly)),
        "## Parameter counts\n\n| count | parameters |\n|---|---|\n"
        + "\n".join(f"| {name} | {value:,} |" for name, value in counts.items()),
        "## Configuration\n\n```json\n" + json.dumps(config.to_dict(), indent=2) + "\n```",
        "## Use\n\n```python\nimport polypeft as pp\nmodel = pp.PolyModel.from_pretrained(\"<this repo or folder>\")  # loads the recorded base\n"
        "outputs = model(**batch, src_lang=..., tgt_lang=...)\n```",
    ]
    if results:
        table = "\n".join(f"| {name} | {value} |" for name, value in results.items()
                          if not isinstance(value, (dict, list)))
        parts.append("## Results\n\n" + (f"| result | value |\n|---|---|\n{table}\n\n" if table else "")
                     + "```json\n" + json.dumps(results, indent=2, default=str) + "\n```")
    return "\n\n".join(parts) + "\n"
