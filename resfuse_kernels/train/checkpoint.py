"""Checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint holds plain types and tensors only (the RNG states included),
so :func:`load` never unpickles code. ``last.pt`` is rewritten every epoch
(and every ``--checkpoint-every`` steps); a crash while writing leaves the
previous one intact, as the new file replaces it only once complete.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Union

import torch

FORMAT = 1
LAST, BEST = "last.pt", "best.pt"


def rng_state() -> dict:
    """This process's RNG states (torch, CUDA, numpy, Python) as tensors and plain types."""
    version, mt, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(mt), gauss],
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "numpy": None}
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss),
                      float(cached)]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state["numpy"] is not None:
        import numpy as np
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def save(payload: dict, path: Path) -> None:
    """Write ``payload`` to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)


def copy(source: Path, target: Path) -> None:
    """``source`` copied to ``target``, atomically as :func:`save`."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def resolve(where: Union[str, os.PathLike]) -> Path:
    """The checkpoint file of ``--resume``: a file, or a run folder's ``last.pt``."""
    path = Path(where)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise FileNotFoundError(f"--resume {where}: no checkpoint there (expected a .pt file "
                                f"or a run folder with {LAST})")
    return path


def load(path: Path) -> dict:
    """A checkpoint written by :func:`save`, on the CPU, without unpickling code."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a resfuse_kernels.train checkpoint (format {FORMAT})")
    return payload
