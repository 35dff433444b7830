"""Package version, and the source commit that result files record."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

__version__ = "0.1.0"


def source_commit() -> str | None:
    """The source commit: $ABM_RT_COMMIT when set (a copy of the tree whose .git is absent or stale, as on
    the device), else git's HEAD of this checkout, else None."""
    if os.environ.get("ABM_RT_COMMIT"):
        return os.environ["ABM_RT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
