"""Hugging Face model directories: ``config.json`` plus one or more ``*.safetensors`` files."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megamix.errors import CheckpointError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; expected a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


class SafetensorsReader:
    """Reads the tensors of a model directory one at a time (single file or sharded with an index).

    Remembers which names were read, so the caller can refuse tensors it did not
    understand instead of silently dropping them. Use as a context manager: it
    keeps every shard open until closed.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map' object")
            self._file_of = {name: directory / file for name, file in weight_map.items()}
        elif (directory / WEIGHTS).is_file():
            self._file_of = None  # filled from the file's own header in __enter__
        else:
            raise CheckpointError(f"{directory} has neither {WEIGHTS} nor {INDEX}")
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self.read: set[str] = set()

    def __enter__(self) -> SafetensorsReader:
        if self._file_of is None:
            path = self.directory / WEIGHTS
            self._file_of = dict.fromkeys(self._open(path).keys(), path)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _open(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise CheckpointError(f"{path} (listed in {INDEX}) does not exist")
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._handles[path]

    @property
    def names(self) -> set[str]:
        return set(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise CheckpointError(f"{self.directory} has no tensor {name}")
        self.read.add(name)
        return self._open(self._file_of[name]).get_tensor(name)


def write_hf(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """One ``model.safetensors`` (with the ``format: pt`` metadata transformers checks) and ``config.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, directory / WEIGHTS, metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
