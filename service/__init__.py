"""The serving side: manifest contract, threshold policies, ONNX Runtime engine, HTTP API.

Never imports torch, `models` or `export` (enforced by import-linter and a test).
"""
