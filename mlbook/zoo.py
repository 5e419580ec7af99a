"""Trained models shipped with the package, each with the command that made it.

Every entry is a pair of files in ``mlbook/checkpoints/``: ``NAME.pt`` (a plain
``state_dict``, loadable with ``torch.load(..., weights_only=True)``) and
``NAME.json`` (settings, results, the producing command, wall time, device).
Introduced in ``book/04_maml``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import models

__all__ = ["available", "load", "info", "save", "CHECKPOINTS"]

CHECKPOINTS = Path(__file__).parent / "checkpoints"


def available() -> list[str]:
    """Names of the shipped checkpoints (``book/04_maml`` lists them)."""
    return sorted(p.stem for p in CHECKPOINTS.glob("*.json"))


def info(name: str) -> dict:
    """The JSON record of checkpoint ``name`` (``book/07_few_shot_images``
    reads the Omniglot ones)."""
    path = CHECKPOINTS / f"{name}.json"
    if not path.exists():
        raise KeyError(f"no checkpoint {name!r}; available: {available()}")
    return json.loads(path.read_text())


def build_model(spec: dict) -> torch.nn.Module:
    """The model described by a record's ``model`` entry (what ``load`` builds
    before it loads the weights; ``book/01_learning_to_learn`` loads one)."""
    kind = spec["kind"]
    args = {k: v for k, v in spec.items() if k != "kind"}
    if kind == "MLP":
        return models.MLP(
            args["in_features"], tuple(args["hidden"]), args["out_features"]
        )
    if kind == "Conv4":
        return models.Conv4(**args)
    raise ValueError(f"unknown model kind {kind!r}")


def load(name: str, device="cpu") -> tuple[torch.nn.Module, dict]:
    """``(model, record)`` for shipped checkpoint ``name``. Introduced in
    ``book/01_learning_to_learn``."""
    record = info(name)
    model = build_model(record["model"])
    state = torch.load(
        CHECKPOINTS / f"{name}.pt", map_location=device, weights_only=True
    )
    model.load_state_dict(state)
    return model.to(device), record


def save(
    name: str,
    model: torch.nn.Module,
    record: dict,
    directory=CHECKPOINTS,
    overwrite: bool = False,
):
    """Write ``name.pt`` and ``name.json``; refuses to replace existing files
    unless ``overwrite=True``. The ``--ship`` runs of ``python -m mlbook
    sinusoid`` (``book/04_maml`` shows the command) and of
    ``mlbook.omniglot_repro`` save through it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pt, js = directory / f"{name}.pt", directory / f"{name}.json"
    if not overwrite and (pt.exists() or js.exists()):
        raise FileExistsError(f"{pt} exists; pass overwrite=True to replace it")
    text = json.dumps(record, indent=2) + "\n"  # fails here, before any write
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # Both files go to temporary names first and are renamed at the end, so a
    # failure never leaves a model beside another model's record.
    tmp_pt, tmp_js = pt.with_name(f".{pt.name}.tmp"), js.with_name(f".{js.name}.tmp")
    try:
        torch.save(state, tmp_pt)
        tmp_js.write_text(text)
        os.replace(tmp_pt, pt)
        os.replace(tmp_js, js)
    finally:
        for tmp in (tmp_pt, tmp_js):
            tmp.unlink(missing_ok=True)
