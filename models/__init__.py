"""PyTorch side: BoostNet backbones, the boosting wrapper, MAC counting, data, training.

Imports nothing else from this repository.
"""
