"""Where kdsearch keeps its runtime files: studies, artifacts, teachers and caches.

Everything lives under one home (``KDSEARCH_HOME``, default ``studies`` in the working directory),
so a project's searches stay with the project and a test can point the whole tool elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdsearch.errors import UserError


def home_dir() -> Path:
    """``KDSEARCH_HOME``, or ``studies``; a home that exists but is not a folder is a user error."""
    home = Path(os.environ.get("KDSEARCH_HOME") or "studies")
    if home.exists() and not home.is_dir():
        raise UserError(f"KDSEARCH_HOME {home} is a file, not a folder")
    return home


def cache_dir() -> Path:
    return home_dir() / "cache"


def artifact_root() -> Path:
    """``KDSEARCH_ARTIFACTS`` (a folder every worker host mounts, for distributed studies), else
    ``<home>/artifacts``."""
    return Path(os.environ.get("KDSEARCH_ARTIFACTS") or home_dir() / "artifacts")
