"""Checkpoint -> per-stage ONNX graphs + manifest, calibration with the serving engine, reports."""
