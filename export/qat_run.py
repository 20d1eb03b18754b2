"""What a QAT run (``edgeface train --qat --out DIR``, :mod:`edgeface.training.qat`) leaves for the export targets:
``DIR/weights.pth`` (float weights, stage1 equalised, trained under fake quantisation) and :data:`QAT_FILE`, the
learned activation quantisation by ONNX tensor name with the run's record. Read and checked here, once, for every
target that exports a QAT run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from edgeface.export.base import TargetOption

from edgeface.core.errors import EdgefaceError

QAT_FILE = "quantization.json"
QAT_FORMAT = 1
# One option for every target that exports QAT runs (the help, `--qat`, and the "targets that take it" lists).
QAT_OPTION = TargetOption("qat", "int8: the folder of a QAT run (`edgeface train --qat --out DIR`): a full-integer "
                          "model (nothing in float) of the run's weights; ONNX also takes its learned activation "
                          "quantisation", flag="--qat")


def read_qat_run(folder: str | Path) -> dict[str, Any]:
    """The :data:`QAT_FILE` of a QAT run folder, checked: format, scheme, and a (scale > 0, zero point 0-255) pair
    for each tensor (``tensors``: name -> (scale float, zero point int)). Raises :class:`EdgefaceError` in one
    line."""
    path = Path(folder) / QAT_FILE
    if not path.is_file():
        raise EdgefaceError(f"--qat {folder}: no {QAT_FILE} there; give the folder of a QAT run "
                            "(`edgeface train --qat --out DIR`)")
    try:
        record = json.loads(path.read_text())
        tensors = {str(k): (float(v[0]), int(v[1])) for k, v in record["tensors"].items()}
        ok = (record.get("format") == QAT_FORMAT and isinstance(record.get("scheme"), dict) and tensors
              and all(s > 0 and np.isfinite(s) and 0 <= z <= 255 for s, z in tensors.values()))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        ok = False
    if not ok:
        raise EdgefaceError(f"{path} is not a QAT record of this edgeface (format {QAT_FORMAT}: scheme, and a scale "
                            "> 0 and a zero point 0-255 per tensor)")
    return {**record, "tensors": tensors}


def qat_run_for(model: Any, folder: str | Path) -> dict[str, Any]:
    """The checked QAT record of ``folder`` for an export of ``model``, whose weights (``model.weights_info``,
    set by the model builder) must be the run's ``weights.pth`` (same sha256). Raises :class:`EdgefaceError`."""
    qat = read_qat_run(folder)
    info = getattr(model, "weights_info", None) or {}
    used, source = info.get("sha256"), info.get("source")
    if used == qat.get("weights_sha256"):
        return qat
    if source and Path(source).resolve() == (Path(folder) / "weights.pth").resolve():
        raise EdgefaceError(f"weights.pth and {QAT_FILE} in {folder} disagree (a save interrupted?): resume the run "
                            "to write both again")
    raise EdgefaceError(f"the QAT run in {folder} trained other weights than this export's ({source}): export its "
                        "weights.pth (leave --weights out)")


def qat_summary(qat: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``calibration.qat``: the run's record without the per-tensor parameters (their count)."""
    return {**{k: v for k, v in qat.items() if k != "tensors"}, "learned_tensors": len(qat["tensors"])}
