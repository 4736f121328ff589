"""Where kdsearch keeps its runtime files: studies, artifacts, teachers and caches.

Everything lives under one home (``KDSEARCH_HOME``, default ``studies`` in the working directory),
so a project's searches stay with the project and a test can point the whole tool elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdsearch.errors import UserError
from kdsearch.fsutil import check_writable, nearest_existing


def home_dir() -> Path:
    """``KDSEARCH_HOME``, or ``studies``; a home that exists but is not a folder is a user error."""
    home = Path(os.environ.get("KDSEARCH_HOME") or "studies")
    if home.exists() and not home.is_dir():
        raise UserError(f"KDSEARCH_HOME {home} is a file, not a folder")
    return home


def default_data_dir(dataset: str) -> Path:
    """Where torchvision-format datasets are downloaded when ``data_dir`` is not given."""
    return Path(os.environ.get("KDSEARCH_DATA", "data")) / dataset


def data_folder(dataset: str | None, data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The folder a run reads its images from: ``data_dir``, or the download folder of a torchvision
    dataset (an input like any other: no output may be written inside it)."""
    if data_dir is not None:
        return Path(data_dir)
    return default_data_dir(dataset) if dataset and dataset != "imagefolder" else None


def cache_dir() -> Path:
    """``<home>/cache``, checked writable: every cache is written there, and its lock files even to read one."""
    folder = home_dir() / "cache"
    check_writable(folder, f"the cache folder {folder} (KDSEARCH_HOME/cache)")
    return folder


def artifact_root() -> Path:
    """``KDSEARCH_ARTIFACTS`` (a folder every worker host mounts, for distributed studies), else
    ``<home>/artifacts``."""
    return Path(os.environ.get("KDSEARCH_ARTIFACTS") or home_dir() / "artifacts")


def check_artifact_root() -> Path:
    """The artifact folder, checked usable (a writable folder, or one that can be made) before a study
    trains anything; nothing is made here.

    A trial uploads its student after training; a folder found unusable only then would cost the
    trial, and every trial after it.
    """
    root = artifact_root()
    what = "KDSEARCH_ARTIFACTS" if os.environ.get("KDSEARCH_ARTIFACTS") else "the artifact folder"
    existing = nearest_existing(root)
    if not existing.is_dir():
        raise UserError(f"{what} {root} cannot be a folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {root} is not writable" + ("" if existing == root else f" ({existing} is not)"))
    return root
