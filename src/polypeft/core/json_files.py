"""JSON files polypeft reads back (saved configs, export indexes): every problem is a ConfigError naming the file.

A file holding the wrong kind of value is named by its reader, which knows what it expected.
"""
from __future__ import annotations

import json
from typing import Any

from .config import ConfigError
from .yaml_files import read_text_file


def read_json_file(path: Any) -> Any:
    """The JSON value of a file; a missing, undecodable or invalid file is a ConfigError naming it."""
    try:
        return json.loads(read_text_file(path))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
