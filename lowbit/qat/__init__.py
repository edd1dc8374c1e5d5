"""Quantization-aware training: fake quantization, batch-norm folding, prepare -> train -> convert.

    model = lowbit.prepare_qat(model, lowbit.qat.QATConfig("int4"))   # QAT Linear / Conv2d
    ...ordinary training loop...
    model = lowbit.convert(model.eval())                               # kernel-backed modules

* :mod:`lowbit.qat.fake_quant`: fake quantizers with straight-through (and LSQ) gradients whose
  values are the real formats' bit for bit, and :func:`register_fake_quant` for new families;
* :mod:`lowbit.qat.families`: binary, 2:4 sparse and codebook fake quantizers
  (:class:`CodebookWeightFakeQuant` for kmeans / pq, :class:`GeneralCodebookWeightFakeQuant` for
  opq / rq / aq / lattice);
* :mod:`lowbit.qat.modules`: QATLinear, QATConv2d, and the batch-norm-fused QATConvBn2d / QATLinearBn1d;
* :mod:`lowbit.qat.bn_fold`: :func:`fold_bn` for post-training quantization;
* :mod:`lowbit.qat.prepare`: :func:`prepare_qat`, :func:`convert`, :class:`QATConfig`,
  :class:`ProgressiveSchedule` (stepped bit width / fraction of quantized layers), :func:`clip_gradients`.
"""

from __future__ import annotations

from .bn_fold import find_bn_pairs, fold_bn, fold_weights  # noqa: F401
from .fake_quant import (  # noqa: F401
    DynamicActivationFakeQuant,
    FakeQuantScheme,
    LSQInt4WeightFakeQuant,
    LSQInt8ActivationFakeQuant,
    LSQInt8WeightFakeQuant,
    MinMaxWeightFakeQuant,
    fake_quant_scheme,
    fake_quantize_fp8,
    fake_quantize_int4,
    fake_quantize_int8,
    fp8_values,
    int4_values,
    int8_values,
    lsq_fake_quantize,
    register_fake_quant,
    registered_fake_quant,
    ste,
)
# ---- binary, sparse24, codebook
from .families import (  # noqa: F401
    BinaryWeightFakeQuant,
    CodebookWeightFakeQuant,
    GeneralCodebookWeightFakeQuant,
    Sparse24WeightFakeQuant,
    configure_codebook,
    configure_sparse24,
)
from .modules import QATConv2d, QATConvBn2d, QATLinear, QATLinearBn1d  # noqa: F401
from .prepare import ProgressiveSchedule, QATConfig, clip_gradients, convert, prepare_qat, qat_layers  # noqa: F401
