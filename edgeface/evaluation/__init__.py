"""Evaluation: the WIDER FACE protocol (ground truth, AP easy/medium/hard) and detector accuracy on it."""
