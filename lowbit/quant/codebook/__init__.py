"""Codebook learning: k-means weight sharing, PQ / OPQ / RQ / AQ / coarse-fine codebooks, lattices.

The learners cut a weight [N, K] into d-dimensional sub-vectors and return a :class:`CodebookFit`
(codes, codebooks, optional per-row scale, optional OPQ rotation) in the one codebook format
(:mod:`lowbit.formats.codebook`). Everything is pure torch, float32 with float64 accumulation,
seeded and deterministic, with distance computations in bounded blocks.
"""

from __future__ import annotations

from .clustering import KMeansResult, kmeans, kmeans1d, kmeans_batched, kmeans_plusplus  # noqa: F401
from .learners import (  # noqa: F401
    CodebookFit,
    additive_quantize,
    beam_encode,
    decode,
    ls_codebooks,
    optimized_product_quantize,
    product_quantize,
    reconstruction_error,
    residual_quantize,
    scalar_kmeans_quantize,
    two_level_quantize,
)
from .finetune import finetune_codebooks, output_error  # noqa: F401
from .lattice import e8_nearest, dn_nearest, lattice_points, lattice_quantize  # noqa: F401
