"""Inference: :class:`~edgeface.inference.detector.Detector` (image -> preprocess -> runtime -> decode + NMS ->
faces) and frame sources for streams."""
