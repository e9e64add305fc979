"""SparseConfig: the user's choices for compiling a U-Net into a sparse engine."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FiseditError

GROUP_NORM_POLICIES = ("incremental", "cached")
ATTENTION_POLICIES = ("full", "sparse")


@dataclass(frozen=True)
class SparseConfig:
    """How edits are computed.

    group_norm: ``incremental`` (exact: statistics of the mixed tensor) or ``cached`` (SIGE and
        FISEdit: the recorded statistics of the same step).
    self_attention: ``full`` (exact: recorded K/V with the active rows replaced) or ``sparse``
        (FISEdit's fast mode: active queries attend to active tokens only).
    tile: output tile side at every level, or one value per level (finest first); the
        effective masks are unions of these tiles.
    dilation: latent pixels by which the edit mask grows before tiling (edits spread through
        convolutions; exactness against the oracle holds for any value).
    dense_threshold: a level whose active fraction exceeds this runs dense, and so do the
        levels below it.
    frontend: ``export`` or ``dynamo`` capture.
    check_inputs: verify on each edit that the inputs equal the recorded ones outside the mask.
    """

    group_norm: str = "incremental"
    self_attention: str = "full"
    tile: int | tuple[int, ...] = 4
    dilation: int = 1
    dense_threshold: float = 0.5
    frontend: str = "export"
    check_inputs: bool = False

    def __post_init__(self):
        if self.group_norm not in GROUP_NORM_POLICIES:
            raise FiseditError(f"SparseConfig.group_norm must be one of {GROUP_NORM_POLICIES}, "
                               f"got {self.group_norm!r}")
        if self.self_attention not in ATTENTION_POLICIES:
            raise FiseditError(f"SparseConfig.self_attention must be one of "
                               f"{ATTENTION_POLICIES}, got {self.self_attention!r}")
        tiles = self.tile if isinstance(self.tile, tuple) else (self.tile,)
        if not tiles or any(not isinstance(t, int) or t < 1 for t in tiles):
            raise FiseditError(f"SparseConfig.tile must be a positive int or a tuple of them, "
                               f"got {self.tile!r}")
        if self.dilation < 0:
            raise FiseditError(f"SparseConfig.dilation must be >= 0, got {self.dilation}")
        if not 0.0 <= self.dense_threshold <= 1.0:
            raise FiseditError(f"SparseConfig.dense_threshold must be in [0, 1], got "
                               f"{self.dense_threshold}")

    def tiles_for(self, levels: list[tuple[int, int]]) -> list[int]:
        """The tile side of each level, clipped to the level's size."""
        tiles = self.tile if isinstance(self.tile, tuple) else (self.tile,) * len(levels)
        if len(tiles) < len(levels):
            raise FiseditError(f"SparseConfig.tile gives {len(tiles)} tile sizes but the U-Net "
                               f"has {len(levels)} levels {levels}")
        return [max(1, min(t, max(size))) for t, size in zip(tiles, levels)]
