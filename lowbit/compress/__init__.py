"""Compression beyond quantization; every technique composes with :func:`lowbit.quantize`.

* :mod:`~lowbit.compress.pruning`: magnitude masks (global / per layer, one-shot / gradual),
  structured removal of channels, neurons and attention heads, N:M hand-off.
* :mod:`~lowbit.compress.lowrank`: truncated-SVD factorization of Linear layers.
* :mod:`~lowbit.compress.decompose`: Tucker-2 and CP decompositions of Conv2d layers.
* :mod:`~lowbit.compress.huffman`: canonical Huffman coding of quantized codes for storage.
* :mod:`~lowbit.compress.distill`: knowledge distillation loss and loop helper.
* :mod:`~lowbit.compress.slimmable`: run-time selectable width, sandwich-rule training.
"""

from __future__ import annotations

from . import decompose, distill, huffman, lowrank, pruning, slimmable  # noqa: F401
from .decompose import CPConv2d, PointwiseConv, TuckerConv2d, decompose_convs  # noqa: F401
from .distill import Distiller, distillation_loss  # noqa: F401
from .huffman import HuffmanCoded, HuffmanError  # noqa: F401
from .lowrank import LowRankLinear, low_rank  # noqa: F401
from .pruning import (GradualPruner, channel_importance, head_importance, magnitude_prune, nm_prune,  # noqa: F401
                      prune_attention_heads, prune_channels, prune_heads_by_importance, remove, sparsity,
                      taylor_importance)
from .slimmable import (SlimmableConv2d, SlimmableLinear, SwitchableBatchNorm1d, SwitchableBatchNorm2d,  # noqa: F401
                        sandwich_step, set_width)
from .summary import compressed_size  # noqa: F401
