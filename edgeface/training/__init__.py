"""Training, fine-tuning and quantisation-aware training of RetinaFace (``edgeface train``).

Layer: above evaluation (validation AP during training), below export (which consumes trained checkpoints).
"""

from edgeface.training.trainer import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
