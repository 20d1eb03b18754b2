"""Core: errors, files, images, the face and detection types, pre/post-processing, the bundle manifest and the
parity verdict. Imports nothing above it, and nothing heavier than numpy, OpenCV, Pillow and jsonschema."""
