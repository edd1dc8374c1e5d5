"""lowbit.compress.decompose: the decomposed conv sequences equal the reconstructed convolution
exactly, errors behave as theory says and are no worse than TensorLy's, and the 1x1 parts
quantize with lowbit.quantize."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.compress import decompose as D

@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: on a shared 2-core machine, thread hand-offs cost more than the arithmetic
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CONVS = [  # (in, out, kernel, stride, padding, dilation, bias)
    (6, 10, 3, 1, 1, 1, True),
    (5, 7, (3, 5), (2, 1), (1, 2), 1, False),
    (8, 12, 3, 2, 0, (2, 1), True),
]


def _conv(i, o, k, s, p, d, b):
    torch.manual_seed(i * o)
    return nn.Conv2d(i, o, k, s, p, d, bias=b).double()


@pytest.mark.parametrize("spec", CONVS)
@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_sequence_equals_reconstructed_convolution(spec, method):
    conv = _conv(*spec)
    m = (D.TuckerConv2d.from_conv(conv, ranks=(3, 2)) if method == "tucker"
         else D.CPConv2d.from_conv(conv, rank=5, n_iter=50, restarts=1))
    x = torch.randn(2, spec[0], 11, 13, dtype=torch.float64)
    with torch.no_grad():
        want = F.conv2d(x, m.weight(), conv.bias, conv.stride, conv.padding, conv.dilation)
        got = m(x)
    assert got.shape == conv(x).shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # and the reported error is the reconstruction's
    w = conv.weight.detach()
    assert m.result.relative_error == pytest.approx(float((m.weight() - w).norm() / w.norm()), rel=1e-9)


def test_tucker_full_rank_is_exact_and_hooi_never_worse_than_hosvd():
    conv = _conv(*CONVS[0])
    full = D.TuckerConv2d.from_conv(conv, ranks=(10, 6))
    assert full.result.relative_error < 1e-12
    w = conv.weight.detach()
    errs = []
    for n_iter in (1, 2, 5, 30):
        core, u0, u1, _ = D.tucker2(w, (4, 3), n_iter=n_iter, tol=0.0)
        errs.append(float((D.tucker2_reconstruct(core, u0, u1) - w).norm()))
    hosvd = D._leading(D._unfold(w.double(), 0), 4), D._leading(D._unfold(w.double(), 1), 3)
    core0 = torch.einsum("oihw,oa,ib->abhw", w, *hosvd)
    err0 = float((D.tucker2_reconstruct(core0, *hosvd) - w).norm())
    assert all(b <= a * (1 + 1e-12) for a, b in zip([err0] + errs, errs))


def test_cp_error_decreases_with_rank_and_iterations():
    w = _conv(*CONVS[0]).weight.detach()
    e = [float((D.cp_reconstruct(*D.cp_als(w, r, 200)[:2]) - w).norm()) for r in (2, 6, 20)]
    assert e[0] > e[1] > e[2]
    lam, f, _ = D.cp_als(w, 6, n_iter=5, tol=0.0)
    lam2, f2, _ = D.cp_als(w, 6, n_iter=50, tol=0.0)
    assert float((D.cp_reconstruct(lam2, f2) - w).norm()) <= float((D.cp_reconstruct(lam, f) - w).norm()) + 1e-12


def test_rank_targets():
    conv = _conv(32, 48, 3, 1, 1, 1, True)
    t = D.TuckerConv2d.from_conv(conv, size_ratio=0.3)
    assert t.result.params_after <= 0.3 * t.result.params_before
    c = D.CPConv2d.from_conv(conv, size_ratio=0.2, n_iter=20)
    assert c.result.params_after <= 0.2 * c.result.params_before
    e = D.TuckerConv2d.from_conv(conv, energy=0.999)
    assert e.result.ranks[0] <= 48 and e.result.relative_error < 0.05


@pytest.mark.parametrize("shape,rank", [((16, 12, 3, 3), 8), ((24, 16, 3, 3), 20), ((12, 6, 5, 5), 10)])
def test_no_worse_than_tensorly(shape, rank):
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac, tucker
    tl.set_backend("pytorch")
    torch.manual_seed(sum(shape))
    w = torch.randn(*shape, dtype=torch.float64)
    w = w + 0.5 * torch.einsum("o,i,h,k->oihk", *[torch.randn(n, dtype=torch.float64) for n in shape])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_cp = parafac(w, rank=rank, init="svd", n_iter_max=100, random_state=0)
            # the same starting point for both: ALS against ALS, not one lucky draw against another
            start = D.cp_init(w, rank, seed=0)
            ref_same = parafac(w, rank=rank, init=tl.cp_tensor.CPTensor((torch.ones(rank, dtype=w.dtype), start)),
                               n_iter_max=100)
            ranks = (shape[0] // 2, shape[1] // 2)
            ref_tk = tucker(w, rank=[*ranks, shape[2], shape[3]], init="svd")
        ref_cp_err = float((tl.cp_to_tensor(ref_cp) - w).norm() / w.norm())
        ref_tk_err = float((tl.tucker_to_tensor(ref_tk) - w).norm() / w.norm())
        ref_same_err = float((tl.cp_to_tensor(ref_same) - w).norm() / w.norm())
    finally:
        tl.set_backend("numpy")
    lam, f, _ = D.cp_als(w, rank, init=start)
    same_err = float((D.cp_reconstruct(lam, f) - w).norm() / w.norm())
    lam, f, _ = D.cp_als(w, rank, restarts=3)
    cp_err = float((D.cp_reconstruct(lam, f) - w).norm() / w.norm())
    core, u0, u1, _ = D.tucker2(w, ranks)
    tk_err = float((D.tucker2_reconstruct(core, u0, u1) - w).norm() / w.norm())
    assert same_err <= ref_same_err * (1 + 1e-9), (same_err, ref_same_err)
    # from each one's own default start, local minima differ by draw; best of 3 lands within 1 %
    assert cp_err <= ref_cp_err * 1.01, (cp_err, ref_cp_err)
    assert tk_err <= ref_tk_err * (1 + 1e-9), (tk_err, ref_tk_err)


@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_decomposed_layers_quantize_with_int8(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    done = D.decompose_convs(model, method, size_ratio=0.5, **({"n_iter": 50} if method == "cp" else {}))
    assert set(done) == {"0", "2"}
    x = torch.randn(2, 16, 8, 8)
    ref = model(x)
    lowbit.quantize(model, "int8")
    report = lowbit.last_report()
    names = [n for n, _ in report.converted]
    # The 1x1 ends hold Linears; Tucker's k x k core is an ordinary conv (lowered to the GEMM),
    # CP's depthwise k x 1 / 1 x k convs have groups > 1 and stay float, reported as skipped.
    if method == "tucker":
        assert names == ["0.core", "0.first.linear", "0.last.linear", "2.core", "2.first.linear", "2.last.linear"]
        assert not report.skipped
    else:
        assert names == ["0.first.linear", "0.last.linear", "2.first.linear", "2.last.linear"]
        assert [s.name for s in report.skipped] == ["0.vertical", "0.horizontal", "2.vertical", "2.horizontal"]
    out = model(x)
    assert float((out - ref).norm() / ref.norm()) < 0.05


def test_refuses_grouped_and_string_padding():
    with pytest.raises(ValueError, match="groups"):
        D.TuckerConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), ranks=(2, 2))
    with pytest.raises(ValueError, match="padding"):
        D.CPConv2d.from_conv(nn.Conv2d(4, 4, 3, padding="same"), rank=2)
