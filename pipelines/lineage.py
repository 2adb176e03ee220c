"""Which code made an output: the commit every checkpoint and report records."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(repo: str | Path | None = None) -> str:
    """HEAD's commit of the repository holding ``repo`` (default: this code), ``+dirty`` when tracked files
    differ from it; ``"not a git repo"`` when there is none (an installed package, an unpacked archive)."""
    cwd = Path(repo) if repo is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff-index", "--quiet", "HEAD", "--"], cwd=cwd, capture_output=True,
                               timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return "not a git repo"
    return head + ("+dirty" if dirty else "")
