"""A small CNN with BatchNorm on scikit-learn's digits (8x8 images, no download): fp32, PTQ and QAT.

    python examples/digits_cnn.py            # full run (about a minute on 2 CPU cores)
    python examples/digits_cnn.py --fast     # the reduced run the tests use

Rows of the table (test accuracy on a fixed, seeded 1397/400 split):

* fp32: the trained float model;
* PTQ: batch norms folded (:func:`lowbit.qat.fold_bn`), then :func:`lowbit.quantize` to int8
  (W8A8, dynamic per-patch / per-token activations), int4 (weight-only, groups of 32 along
  K = C*kh*kw), and :func:`lowbit.calibrate` int8 with static activation scales where the ptq
  helper's calibration is present (it calibrates nn.Linear inputs; the convolutions go through
  lowbit.quantize);
* QAT int8 with learned static activation steps (converts to Int8Linear(activation="static"));
* QAT int4: :func:`lowbit.prepare_qat` (batch norms fused, LSQ steps, running statistics frozen
  halfway), a few epochs of fine-tuning from the fp32 weights, then :func:`lowbit.convert` to
  the kernel-backed modules (Int4Linear inside QuantizedConv2d); the accuracy is the converted
  model's, and the fake-quantized model's is printed next to it;
* QAT binary (lowbit.qat.families): W1A1 XNOR layers (``BinaryConfig()``, binarized weights and
  activations, first and last layer float) on a variant of the CNN with Hardtanh instead of ReLU
  (sign() of a ReLU output is +1 everywhere, so a binarized activation after a ReLU carries no
  information: the ReLU CNN falls to chance), fine-tuned from that variant's own fp32 weights; and
  binary weights with float activations (``BinaryConfig(binary_activations=False)``) on the
  ReLU CNN. Both convert to BinaryConv2d (XNOR-popcount kernels) with bit-identical outputs;
* QAT 2:4 sparse (float values, and 2:4 + int8 W8A8) and QAT codebook (k-means 4-bit): converted
  to QuantizedConv2d over Sparse24Linear / CodebookLinear.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import lowbit
from lowbit.qat import ProgressiveSchedule, QATConfig, fold_bn

SEED = 0


def load_data(device="cpu"):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8] in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.from_numpy(np.random.default_rng(SEED).permutation(len(y)))
    train, test = perm[:1397], perm[1397:]
    return (x[train].to(device), y[train].to(device)), (x[test].to(device), y[test].to(device))


def make_model(activation=nn.ReLU) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), activation(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), activation(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), activation(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10))


def train(model, data, epochs, lr, batch_size=64, on_step=None, clip=False):
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    g = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g).to(y.device)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            if clip:
                lowbit.qat.clip_gradients(model)
            opt.step()
            sched.step()
            if on_step is not None:
                on_step(model)
    return model.eval()


@torch.no_grad()
def accuracy(model, data) -> float:
    x, y = data
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def _calibrate_available() -> bool:
    try:
        import lowbit.calibrate  # noqa: F401
    except ImportError:
        return False
    return True


def binary_config():
    """The binary family's QAT config (W1A1 XNOR, first and last layer float), or None where no
    binary family with a registered fake quantizer is installed."""
    cfg_type = getattr(lowbit.configs, "BinaryConfig", None)
    if cfg_type is None or cfg_type.__name__ not in lowbit.qat.registered_fake_quant():
        return None
    return cfg_type()


def _qat(fp32, cfg, train_data, test_data, epochs, lr, log, name):
    """prepare_qat -> train -> convert; returns the converted model's accuracy (logs the fake one's)."""
    t0 = time.perf_counter()
    cfg.freeze_bn_step = epochs * ((len(train_data[1]) + 63) // 64) // 2
    qat = train(lowbit.prepare_qat(copy.deepcopy(fp32), cfg), train_data, epochs, lr=lr)
    fake = accuracy(qat, test_data)
    acc = accuracy(lowbit.convert(qat), test_data)
    log(f"{name}: fake-quantized {fake:.4f}, converted {acc:.4f} ({time.perf_counter() - t0:.1f}s)")
    return acc


def run(fast: bool = False, device: str = "cpu", verbose: bool = True) -> dict[str, float]:
    torch.manual_seed(SEED)
    train_data, test_data = load_data(device)
    epochs, qat_epochs = (6, 2) if fast else (20, 8)
    results: dict[str, float] = {}
    log = print if verbose else (lambda *a, **k: None)

    t0 = time.perf_counter()
    fp32 = train(make_model().to(device), train_data, epochs, lr=3e-3)
    results["fp32"] = accuracy(fp32, test_data)
    log(f"trained fp32 in {time.perf_counter() - t0:.1f}s")

    folded = fold_bn(copy.deepcopy(fp32).eval())
    results["fp32, BN folded"] = accuracy(folded, test_data)
    for name, preset in (("PTQ int8 (W8A8 dynamic)", "int8"), ("PTQ int4 (g32, weight-only)", "int4-g32"),
                         ("PTQ int4 (g128)", "int4")):
        results[name] = accuracy(lowbit.quantize(copy.deepcopy(folded), preset), test_data)
    if _calibrate_available():
        from lowbit.calibrate import calibrate

        x_train = train_data[0]
        batches = [x_train[i:i + 128] for i in range(0, 512, 128)]
        results["PTQ int8 (calibrated static, lowbit.calibrate)"] = accuracy(
            calibrate(copy.deepcopy(folded), "int8", batches, progress=False), test_data)

    for name, cfg in (("QAT int8 (W8A8, LSQ weight and static activation steps)",
                       QATConfig("int8", learnable_scales=True, static_activations=True)),
                      ("QAT int4 (g32, LSQ)", QATConfig("int4-g32", learnable_scales=True)),
                      ("QAT int4 (g128, LSQ)", QATConfig("int4", learnable_scales=True))):
        t0 = time.perf_counter()
        steps = qat_epochs * ((len(train_data[1]) + 63) // 64)
        cfg.freeze_bn_step = steps // 2
        qat = lowbit.prepare_qat(copy.deepcopy(fp32), cfg)
        qat = train(qat, train_data, qat_epochs, lr=1e-3)
        fake = accuracy(qat, test_data)
        converted = lowbit.convert(qat)
        results[name] = accuracy(converted, test_data)
        log(f"{name}: fake-quantized {fake:.4f}, converted {results[name]:.4f} "
            f"({time.perf_counter() - t0:.1f}s)")

    # Stepped: 8 bits for the first third, then 4 bits (groups of 128).
    steps = qat_epochs * ((len(train_data[1]) + 63) // 64)
    schedule = ProgressiveSchedule(stages=[(0, "int8-weight"), (steps // 3, "int4")])
    qat = lowbit.prepare_qat(copy.deepcopy(fp32), QATConfig(learnable_scales=True, schedule=schedule,
                                                            freeze_bn_step=steps // 2))
    qat = train(qat, train_data, qat_epochs, lr=1e-3, on_step=schedule.step)
    results["QAT int8 -> int4 stepped (g128, LSQ)"] = accuracy(lowbit.convert(qat), test_data)

    bcfg = binary_config()
    if bcfg is not None:
        # W1A1 needs zero-centred inputs to sign(): the Hardtanh variant, from its own fp32 weights.
        torch.manual_seed(SEED)
        fp32_htanh = train(make_model(nn.Hardtanh).to(device), train_data, epochs, lr=3e-3)
        results["fp32 (Hardtanh variant)"] = accuracy(fp32_htanh, test_data)
        results["QAT binary (W1A1 XNOR, Hardtanh variant)"] = _qat(
            fp32_htanh, QATConfig(bcfg), train_data, test_data, qat_epochs * 4, 3e-3, log, "QAT binary W1A1")
        results["QAT binary weights (W1, float activations)"] = _qat(
            fp32, QATConfig(type(bcfg)(binary_activations=False)), train_data, test_data, qat_epochs * 2, 1e-3, log,
            "QAT binary weights")
    else:
        log("QAT binary: skipped (no binary family with a registered fake quantizer in this lowbit)")
    registered = lowbit.qat.registered_fake_quant()
    if "Sparse24Config" in registered:
        # Twice the epochs: half of every 3x3 kernel (and of the 9 taps of the first conv) is pruned.
        results["QAT 2:4 sparse (fp32 values)"] = _qat(fp32, QATConfig("sparse24"), train_data, test_data,
                                                       qat_epochs * 2, 1e-3, log, "QAT 2:4")
        results["QAT 2:4 sparse + int8 (W8A8)"] = _qat(fp32, QATConfig("sparse24-int8"), train_data, test_data,
                                                       qat_epochs * 2, 1e-3, log, "QAT 2:4 + int8")
    if "CodebookConfig" in registered:
        results["QAT codebook (k-means 4-bit)"] = _qat(fp32, QATConfig("kmeans4"), train_data, test_data,
                                                       qat_epochs, 1e-3, log, "QAT k-means 4-bit")
    return results


def table(results: dict[str, float]) -> str:
    width = max(len(k) for k in results)
    lines = [f"{'model':<{width}}  test accuracy", f"{'-' * width}  -------------"]
    lines += [f"{k:<{width}}  {v * 100:12.2f}%" for k, v in results.items()]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="the reduced run (fewer epochs)")
    ap.add_argument("--device", default="cpu")
    # One thread: the layers are tiny, and per-op OpenMP synchronisation costs more than it saves
    # (on a loaded 2-core machine, 30x more).
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = run(args.fast, args.device)
    print()
    print(table(results))
    print(f"\ntotal {time.perf_counter() - t0:.1f}s on {args.device} ({args.threads} threads)")


if __name__ == "__main__":
    main()
