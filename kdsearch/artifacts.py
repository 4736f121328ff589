"""Best-student checkpoints as Optuna artifacts: the store, and keeping and fetching one with its hash.

A trial's student goes to a file-system artifact store with one folder per study, through Optuna's
``upload_artifact`` (so optuna-dashboard lists and serves it). Its SHA-256 is recorded beside the
artifact's id in the trial's user attributes, and every read (``export --checkpoint``, a confirm
reusing a search trial) checks the bytes against it: an artifact truncated or changed on disk is
refused in one line, never copied or trusted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from kdsearch.errors import UserError, shown
from kdsearch.fsutil import file_sha256
from kdsearch.paths import artifact_root

ARTIFACT_ID, ARTIFACT_SHA256 = "artifact_id", "artifact_sha256"  # the trial's user attributes


def safe_name(name: str) -> str:
    """A study name as one folder name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "_"


class ArtifactDirectory:
    """A file-system artifact store with one folder per study (``<root>/<study>/<artifact id>``).

    Uploads go to the study's folder; reads search every study's folder, so one store can serve
    the dashboard for all studies in a storage. Implements optuna's ``ArtifactStore`` protocol.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, study_name: str = "_dashboard") -> None:
        self.root = Path(root) if root is not None else artifact_root()
        self.study_name = study_name

    def _writer(self) -> FileSystemArtifactStore:
        folder = self.root / safe_name(self.study_name)
        folder.mkdir(parents=True, exist_ok=True)
        return FileSystemArtifactStore(str(folder))

    def _find(self, artifact_id: str) -> Path:
        if "/" in artifact_id or artifact_id.startswith("."):
            raise ArtifactNotFound(f"invalid artifact id {shown(artifact_id)}")
        for path in self.root.glob(f"*/{artifact_id}"):
            if path.is_file():
                return path
        raise ArtifactNotFound(f"artifact {artifact_id} not found under {self.root}")

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return open(self._find(artifact_id), "rb")

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self._writer().write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self._find(artifact_id).unlink()


def keep_artifact(trial: optuna.Trial, store: ArtifactDirectory, path: Path) -> str:
    """Upload the file at ``path`` as the trial's artifact; its id and SHA-256 become user attributes."""
    digest = file_sha256(path)
    artifact_id = upload_artifact(
        artifact_store=store, file_path=str(path), study_or_trial=trial, mimetype="application/octet-stream"
    )
    trial.set_user_attr(ARTIFACT_SHA256, digest)
    trial.set_user_attr(ARTIFACT_ID, artifact_id)
    return artifact_id


def fetch_artifact(artifact_id: str, target: Path, sha256: str | None) -> None:
    """Copy an artifact's bytes to ``target`` (which must not exist), checked against ``sha256``.

    Raises ``UserError`` when the artifact is missing, or when its bytes are not those recorded (the
    copy is removed). Studies from before the hash was recorded pass ``None``: only missing is checked.
    """
    try:
        download_artifact(artifact_store=ArtifactDirectory(), file_path=str(target), artifact_id=artifact_id)
    except ArtifactNotFound:
        raise UserError(f"checkpoint artifact {artifact_id} is missing from {artifact_root()}") from None
    if sha256 is not None and file_sha256(target) != sha256:
        target.unlink()
        raise UserError(
            f"checkpoint artifact {artifact_id} under {artifact_root()} is damaged: its bytes are not those the "
            "trial recorded (truncated or changed on disk)"
        )
