"""Early exits on a classifier you already have: `boostserve attach-exits` (docs/byom.md).

The user's network is an ONNX file and is never retrained: its graph is cut into stage graphs at
intermediate tensors (`graph`), small exit heads are trained on the cut tensors' features
(`features`, `heads`), and the stages plus heads become a normal artifact (`build`). Several ONNX
classifiers instead form a cascade of separate networks, each stage reading the image.
"""
