"""Checkpoints: atomic saves, ``weights_only=True`` loads, metadata as JSON.

A kdsearch checkpoint is ``{"format", "state_dict", "metadata"}`` where metadata is a JSON string
(dataset, normalisation, architecture, accuracies, hyperparameters). Everything in it is a tensor
or a string, so ``torch.load(weights_only=True)`` reads it and never runs pickled code. What users
bring loads too, as weights alone: a plain state_dict (the tutorial's ``torch.save(model.state_dict(),
...)``, a fine-tuned torchvision or timm model's ``.pt``/``.pth``), one inside a training script's
``{"state_dict": …}``, ``{"model": …}`` or ``{"model_state_dict": …}`` (``module.`` prefixes of
DataParallel dropped), and a ``.safetensors`` file, which holds tensors only.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdsearch.errors import UserError, warn_once
from kdsearch.fsutil import atomic_write

FORMAT = "kdsearch-checkpoint/1"


@dataclass
class Checkpoint:
    """Weights plus what is needed to rebuild and trust them."""

    state_dict: dict[str, Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Write weights and metadata atomically: readers see the old file or the complete new one."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = {"format": FORMAT, "state_dict": state, "metadata": json.dumps(metadata, sort_keys=True)}
    return atomic_write(path, lambda tmp: torch.save(blob, tmp))


# Where training scripts keep the weights inside a checkpoint (timm's train.py, torchvision's references).
NESTED_STATE_KEYS = ("state_dict", "model", "model_state_dict")


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a kdsearch checkpoint, a state_dict (plain, nested or ``.safetensors``), refusing pickled code."""
    target = Path(path)
    if not target.is_file():
        raise UserError(f"checkpoint {target} does not exist")
    if target.suffix == ".safetensors":
        return Checkpoint(_unwrapped(_load_safetensors(target)), {})
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of files it is about to refuse: the refusal says enough.
            warnings.simplefilter("ignore", UserWarning)
            blob = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the file's fault, not ours
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        if "GLOBAL" in text or "Unsupported global" in text:
            reason = "it holds pickled objects other than tensors, refused for safety (weights_only=True)"
        elif not zipfile.is_zipfile(target):
            reason = "not a torch checkpoint file (truncated, damaged, or another format)"
        else:
            reason = f"the file is damaged ({reason[:120]})"
        raise UserError(f"cannot load checkpoint {target}: {reason}") from None
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        state_dict = blob.get("state_dict")
        try:
            metadata = json.loads(blob["metadata"])
        except (KeyError, TypeError, json.JSONDecodeError):
            raise UserError(f"checkpoint {target} has unreadable metadata") from None
        if not isinstance(metadata, dict):
            raise UserError(f"checkpoint {target} has metadata of the wrong shape (not a mapping)")
        if not _is_state_dict(state_dict):
            raise UserError(f"checkpoint {target} holds no state_dict of named tensors")
        return Checkpoint(dict(state_dict), metadata)
    if _is_state_dict(blob):
        return Checkpoint(_unwrapped(blob), {})
    if isinstance(blob, dict):
        nested = next((blob[k] for k in NESTED_STATE_KEYS if _is_state_dict(blob.get(k))), None)
        if nested is not None:
            return Checkpoint(_unwrapped(nested), {})
    raise UserError(f"checkpoint {target} is neither a kdsearch checkpoint nor a state_dict")


def _load_safetensors(target: Path) -> dict[str, Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(f"reading {target} needs safetensors: pip install safetensors") from None
    try:
        state = load_file(target, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(f"cannot load checkpoint {target}: not a readable safetensors file ({reason})") from None
    if not _is_state_dict(state):
        raise UserError(f"checkpoint {target} holds no tensors")
    return state


def _unwrapped(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state_dict with DataParallel's ``module.`` prefix dropped, when every key has it."""
    if all(key.startswith("module.") for key in state):
        return {key.removeprefix("module."): tensor for key, tensor in state.items()}
    return dict(state)


def _is_state_dict(value: object) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())
    )


def _head_key(state: dict[str, Tensor]) -> str | None:
    """The classifier's weight: the last 2-D weight of the model (``fc.weight``, ``classifier.3.weight``)."""
    weights = [key for key, tensor in state.items() if key.endswith("weight") and tensor.dim() == 2]
    return weights[-1] if weights else None


def load_weights(
    model: nn.Module, checkpoint: Checkpoint, *, source: str, model_name: str, new_head: bool = False
) -> None:
    """Load weights strictly; a checkpoint of another architecture or class count is a user error.

    With ``new_head`` a head trained for another class count (a pretrained ImageNet model) is left
    out and the model keeps its freshly initialised one, with one warning line: how a pretrained
    student starts on a new dataset.
    """
    expected = model.state_dict()
    state = dict(checkpoint.state_dict)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"checkpoint {source} does not fit model {model_name}: {detail}")
    head = _head_key(expected)
    for key, tensor in expected.items():
        got = state[key]
        if tuple(got.shape) == tuple(tensor.shape):
            continue
        if key == head and got.shape[1:] == tensor.shape[1:]:
            if new_head:
                warn_once(f"{source}: its head ({key}) has {got.shape[0]} outputs; a new one learns {tensor.shape[0]}")
                bias = key.removesuffix("weight") + "bias"
                state[key] = tensor
                if bias in state:
                    state[bias] = expected[bias]
                continue
            raise UserError(
                f"checkpoint {source} does not fit model {model_name}: its head ({key}) has {got.shape[0]} "
                f"outputs and this dataset {tensor.shape[0]} classes; fine-tune it on these classes first"
            )
        raise UserError(
            f"checkpoint {source} does not fit model {model_name}: {key} has shape {tuple(got.shape)}, "
            f"the model needs {tuple(tensor.shape)} (another architecture, width or class count?)"
        )
    model.load_state_dict(state, strict=True)
