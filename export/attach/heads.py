"""Exit heads trained in PyTorch on pooled cut features only; the user's weights are never touched.

The head is global average pool + linear (the pool already applied in `export.attach.features`),
the same head every BoostNet exit in `models/` has. Why no conv head: the heads see frozen
features of a network trained for its last layer only, and a linear probe on channel means is the
cheapest head (its MACs are C*H*W + C*classes, well under 1 % of a stage) that can be trained to
its optimum deterministically in seconds; a head with its own convolutions would cost compute on
every image that does *not* exit.

Training: full-batch L-BFGS on the cross-entropy of F_k = f_k + t * F_{k-1} (F_{k-1} the earlier
heads' answer, fixed: boosting over the heads when t > 0; t = 0 by default), features
standardised per channel for conditioning and the standardisation folded into the weights
afterwards, a small L2 penalty on the weights. Deterministic for a given feature matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_L2 = 1e-4
DEFAULT_ITERATIONS = 200


@dataclass(frozen=True)
class LinearHead:
    """f(x) = x @ weight.T + bias on pooled features x (N, C): weight (classes, C), bias (classes,)."""

    weight: np.ndarray
    bias: np.ndarray

    def logits(self, pooled: np.ndarray) -> np.ndarray:
        return pooled.astype(np.float32) @ self.weight.T + self.bias  # (N, classes)


def train_head(
    pooled: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    offset: np.ndarray | None = None,
    l2: float = DEFAULT_L2,
    iterations: int = DEFAULT_ITERATIONS,
) -> LinearHead:
    """Fit one head; `offset` (N, classes) is t * F_{k-1}, added to the logits before the loss."""
    x = torch.from_numpy(np.ascontiguousarray(pooled, dtype=np.float32))  # (N, C)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    extra = None if offset is None else torch.from_numpy(np.ascontiguousarray(offset, dtype=np.float32))
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = z @ weight.T + bias
        if extra is not None:
            logits = logits + extra
        loss = F.cross_entropy(logits, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        folded = weight / std  # (classes, C): z @ W.T = (x - mean) / std @ W.T
        folded_bias = bias - folded @ mean
    return LinearHead(folded.numpy().astype(np.float32), folded_bias.numpy().astype(np.float32))


def train_heads(
    pooled: Sequence[np.ndarray], labels: np.ndarray, num_classes: int, *, t: float = 0.0
) -> list[LinearHead]:
    """One head per cut, in order; with t > 0 head k fits the residual of t * F_{k-1} (boosting)."""
    heads: list[LinearHead] = []
    previous: np.ndarray | None = None  # F_{k-1} on the training features (N, classes)
    for k, features in enumerate(pooled):
        offset = None if previous is None or t == 0 else t * previous
        head = train_head(features, labels, num_classes, offset=offset)
        raw = head.logits(features)
        previous = raw if offset is None else raw + offset
        heads.append(head)
        del k
    return heads
