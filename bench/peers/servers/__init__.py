"""Peer servers: the same full network served by other frameworks, each with its own batching.

These modules run inside each peer's own virtual environment (bench.peers.envs), never in
boostserve's: the runner copies this package next to its config as `peer_servers` and starts
`python -m peer_servers.<peer> CONFIG.json`. They import only `model` (numpy, onnxruntime,
Pillow) and their peer framework; nothing of boostserve.
"""
