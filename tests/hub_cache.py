"""A Hugging Face Hub cache laid out as huggingface_hub lays it out, so Hub ids load offline in tests."""
from __future__ import annotations

import shutil


def lay_out_hub_cache(cache, repo_id: str, revisions: dict[str, tuple[str, object]]) -> None:
    """The folders huggingface_hub's cache holds: refs/<revision> -> commit, snapshots/<commit>/<files>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for revision, (commit, save_folder) in revisions.items():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        shutil.copytree(save_folder, repo / "snapshots" / commit, dirs_exist_ok=True)
