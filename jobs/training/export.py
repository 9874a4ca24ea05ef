"""Export job: a finished (or stopped) run's final model, also where the seeds put theirs.

``<export_dir>/<method>_<model>_<YYYYmmdd_HHMMSS>/`` (seed 001's ``models/rest_Qwen_Qwen3_Omni_..._20250121_153500/``)
holds the merged weights and tokenizer of the iteration the plan chose (``export.iteration``: the
best or the last; iteration 0, the base model, is not copied: nothing is exported), hard-linked from the run
directory where the filesystem allows (no second copy of a large model), and ``export.json``
saying which run and iteration it is. The folder appears whole: it is built under a temporary
name and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from jobs.runtime import reporting
from jobs.specs import ExportSpec
from state import atomic_write_json


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, destination)


def export(spec: ExportSpec, metrics: dict[str, Any]) -> None:
    metrics.update(exported_iteration=spec.iteration, export=None, choice=spec.choice)
    if spec.iteration == 0:
        return
    root = Path(spec.export_dir)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{spec.method}_{spec.model_name}_{time.strftime('%Y%m%d_%H%M%S')}"
    # Two runs of the same model ending in the same second: the second gets a suffix, not a clash.
    folder = next(f for n in range(1, 1000) if not (f := folder.with_name(folder.name + (f"_{n}" if n > 1 else ""))).exists())
    staging = root / f".{folder.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(spec.model_path, staging, copy_function=_link_or_copy)
    card = Path(spec.model_path).parent / "model_card.json"
    atomic_write_json(staging / "export.json", {
        "run_dir": spec.run_dir, "iteration": spec.iteration, "method": spec.method, "source": spec.model_path, "choice": spec.choice,
        "model_card": json.loads(card.read_text()) if card.is_file() else None,
    })
    os.replace(staging, folder)
    metrics.update(export=str(folder.resolve()), choice=f"{spec.choice}; exported to {folder.resolve()}" if spec.choice else str(folder.resolve()))


def run(spec: ExportSpec) -> dict[str, Any]:
    with reporting(spec.target) as metrics:
        export(spec, metrics)
    return metrics
