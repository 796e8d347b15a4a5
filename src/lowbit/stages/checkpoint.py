"""Checkpoints of a run: after each finished weight stage, the float model and what
later stages keep (pruned weights, clusters) go into a folder, so an interrupted run
resumes after its last finished stage (``--resume``).

The folder holds ``manifest.json`` (which model and stages it belongs to, by SHA-256,
and each finished stage's report part), ``stage_N.onnx`` and ``stage_N.npz`` (cluster
codebooks and indices; read without pickle). A folder made for another model or
another list of stages is refused, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lowbit.backends.onnx.load import load_model
from lowbit.backends.onnx.store import FloatModel
from lowbit.errors import ValidationError
from lowbit.fileio import write_bytes_atomic, write_json_atomic
from lowbit.stages.base import RunContext

MANIFEST = "manifest.json"
FORMAT = 1


def fingerprint(model: onnx.ModelProto | None, stages: list[dict[str, Any]],
                extra: dict[str, Any] | None = None) -> tuple[str, str]:
    """(SHA-256 of the normalised model, SHA-256 of the stage list and run settings)."""
    model_hash = hashlib.sha256(model.SerializeToString() if model is not None else b"").hexdigest()
    text = json.dumps({"stages": stages, **(extra or {})}, sort_keys=True, default=str)
    return model_hash, hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Resumed:
    """What a checkpoint folder gives back: the finished stages' report parts and the
    model after each of them."""

    done: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    models: list[onnx.ModelProto] = field(default_factory=list)


class Checkpoints:
    def __init__(self, folder: str | Path, model_hash: str, stages_hash: str) -> None:
        self.folder = Path(folder)
        self.model_hash, self.stages_hash = model_hash, stages_hash
        self._manifest: dict[str, Any] = {"lowbit_checkpoints": FORMAT, "model_sha256": model_hash,
                                          "stages_sha256": stages_hash, "finished": []}

    def start_fresh(self) -> None:
        """Forget an earlier run's checkpoints in this folder (a run without --resume)."""
        if (self.folder / MANIFEST).is_file():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def resume(self, ctx: RunContext) -> Resumed:
        """Restore ``ctx`` after the last finished stage; refuse a folder of another run."""
        path = self.folder / MANIFEST
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            return Resumed()
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            raise ValidationError(f"--resume: {path} is not a lowbit checkpoint manifest") from None
        if not isinstance(manifest, dict) or manifest.get("lowbit_checkpoints") != FORMAT:
            raise ValidationError(f"--resume: {path} is not a lowbit checkpoint manifest")
        if manifest.get("model_sha256") != self.model_hash:
            raise ValidationError(f"--resume: the checkpoints in {self.folder} were made for "
                                  "another model; remove the folder or leave out --resume")
        if manifest.get("stages_sha256") != self.stages_hash:
            raise ValidationError(f"--resume: the checkpoints in {self.folder} were made for "
                                  "another recipe (other stages or settings); remove the folder "
                                  "or leave out --resume")
        self._manifest = manifest
        out = Resumed()
        for entry in manifest["finished"]:
            out.done.append((entry["config"], entry["settings"]))
            out.models.append(onnx.load(str(self.folder / entry["model"])))
        if out.models:
            last = manifest["finished"][-1]
            ctx.fm = load_model(out.models[-1])[0]
            ctx.sparse = set(manifest.get("sparse", []))
            with np.load(self.folder / last["state"], allow_pickle=False) as state:
                ctx.clusters = {name: (state[f"{k}.codebook"], state[f"{k}.indices"])
                                for k, name in enumerate(manifest.get("clusters", []))}
            ctx.notes[:] = manifest.get("notes", [])
            ctx.warnings[:] = manifest.get("warnings", [])
            ctx.skipped.update(manifest.get("skipped", {}))
            ctx.sections.update(manifest.get("sections", {}))
            ctx.seconds.update(manifest.get("seconds", {}))
        return out

    def save(self, index: int, ctx: RunContext, config: dict[str, Any],
             settings: dict[str, Any]) -> onnx.ModelProto:
        """Record stage ``index`` as finished with ``ctx`` as it left it; returns the model."""
        model = ctx.fm.joined()
        name = f"stage_{index}"
        write_bytes_atomic(self.folder / f"{name}.onnx", model.SerializeToString())
        clusters = sorted(ctx.clusters)
        arrays = {}
        for k, n in enumerate(clusters):
            arrays[f"{k}.codebook"], arrays[f"{k}.indices"] = ctx.clusters[n]
        tmp = self.folder / f"{name}.tmp.npz"
        np.savez(tmp, **arrays)
        tmp.replace(self.folder / f"{name}.npz")
        self._manifest["finished"].append({"index": index, "config": config, "settings": settings,
                                           "model": f"{name}.onnx", "state": f"{name}.npz"})
        self._manifest.update({"sparse": sorted(ctx.sparse), "clusters": clusters,
                               "notes": ctx.notes, "warnings": ctx.warnings,
                               "skipped": ctx.skipped, "sections": ctx.sections,
                               "seconds": ctx.seconds})
        write_json_atomic(self.folder / MANIFEST, self._manifest)
        return model

    def remove(self) -> None:
        """Delete the folder once the run's output is safely written."""
        if (self.folder / MANIFEST).is_file() or self.folder.is_dir():
            shutil.rmtree(self.folder, ignore_errors=True)


def as_float_model(model: onnx.ModelProto) -> FloatModel:
    return load_model(model)[0]
