"""edgeface: RetinaFace from one PyTorch definition to every edge target."""

from edgeface.detector import Detector
from edgeface.errors import EdgefaceError
from edgeface.face import LANDMARK_NAMES, Face
from edgeface.models import get_model, list_models

__all__ = ["Detector", "EdgefaceError", "Face", "LANDMARK_NAMES", "get_model", "list_models"]
__version__ = "0.1.0"
