"""The one interface every backbone implements: a network cut into stages, one exit per stage.

Stage k consumes either the previous stage's features (a list of tensors: MSDNet passes one
tensor per scale) or the raw image (a cascade stage, seed 000: an independent network), and
returns the features handed to stage k+1 plus its own raw exit logits f_k. Boosting
(F_k = f_k + t * F_{k-1}) is *not* done here; `models.boosting.BoostedNet` adds it over any
StagedBackbone, and `export/` cuts the graph along exactly these stage boundaries.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn


class StagedBackbone(nn.Module, ABC):
    """A backbone with `num_stages` exits."""

    @property
    @abstractmethod
    def num_stages(self) -> int: ...

    def stage_reads_image(self, k: int) -> bool:
        """True if stage k reads the raw image instead of the previous features (stage 0 always does)."""
        return k == 0

    @abstractmethod
    def forward_stage(self, k: int, image: Tensor, features: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Run stage k.

        image:    (B, C, H, W) the preprocessed input (stages that do not read it ignore it)
        features: the list returned by stage k-1 ([] for k == 0)
        returns:  (features for stage k+1, raw logits f_k of shape (B, num_classes));
                  the last stage may return [] as features.
        """
