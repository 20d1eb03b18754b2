"""Training, fine-tuning and quantisation-aware training of RetinaFace (``edgeface train``).

Layer: above export (QAT quantises through the ONNX target's functions) and evaluation (validation AP); an
export reads a run's files (``weights.pth``, ``quantization.json``), never this package.
"""

from edgeface.training.trainer import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
