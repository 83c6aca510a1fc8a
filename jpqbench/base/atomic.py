"""Atomic file writes: a file is either absent or complete.

Each writer writes ``<name>.tmp`` beside the target and renames it over the target (one
``os.replace``, atomic on POSIX), so a run killed mid-write never leaves a half-written
checkpoint, plan, metrics file or artifact that a rerun or Snakemake would take as done.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def torch_save(obj: Any, path: Path) -> None:
    import torch  # here, not at the top: the base layer is torch-free

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
