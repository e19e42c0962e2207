"""Evaluation of a model directory: per-generator metrics, calibration, robustness."""
