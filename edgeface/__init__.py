"""edgeface: RetinaFace from one PyTorch definition to every edge target.

The public API. It imports no PyTorch: a device that only runs exported bundles installs edgeface without it.
The target registry (``edgeface.export``, the targets' specs) imports on such a device install too;
``edgeface.models``, ``edgeface.export.pipeline`` and the converters need the ``export`` extra (PyTorch).
"""

from edgeface.core.errors import EdgefaceError
from edgeface.core.face import LANDMARK_NAMES, Face
from edgeface.core.versions import __version__
from edgeface.inference.detector import Detector

__all__ = ["Detector", "EdgefaceError", "Face", "LANDMARK_NAMES", "__version__"]
