"""lowbit.quant.codebook: the codebook learners (k-means, PQ, OPQ, RQ, AQ, coarse/fine, lattice, fine-tuning).

Quality is checked against established tools on the same data: scikit-learn's KMeans (inertia
within 2%) and FAISS's ProductQuantizer / OPQMatrix + PQ / ResidualQuantizer (MSE no worse at the
same code size). Every learner's recorded objective must never rise, and every learner must beat
round-to-nearest uniform quantization at the same bits per weight.
"""

import math

import pytest
import torch

from lowbit.quant import codebook as cb
from lowbit.quant.affine import fake_quantize
from lowbit.quant.codebook import clustering as km
from lowbit.quant.codebook import lattice as lat


@pytest.fixture(autouse=True)
def _one_thread():
    # Small problems: on a shared, loaded 2-core machine one thread is several times faster
    # (OpenMP barriers wait on descheduled threads).
    # The same holds for scikit-learn's and FAISS's OpenMP pools.
    import contextlib

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import faiss

        faiss_n = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
    except ImportError:
        faiss = None
    try:
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(1)
    except ImportError:
        limit = contextlib.nullcontext()
    with limit:
        yield
    torch.set_num_threads(n)
    if faiss is not None:
        faiss.omp_set_num_threads(faiss_n)


def _monotone(h, rel=1e-6):
    return all(b <= a * (1 + rel) + 1e-12 for a, b in zip(h, h[1:]))


def _weight(N=128, K=256, seed=0):
    """A weight with heavy-ish tails and uneven column scales, like a real layer."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.linspace(0.5, 1.5, K)
    return w + 0.3 * torch.randn(N, K, generator=g) ** 3 / 3


def _mse(fit, w):
    return (cb.decode(fit) - w).square().mean().item()


def _rtn_mse(w, bits):
    """Best round-to-nearest at `bits` per weight: asymmetric, per output channel."""
    return (fake_quantize(w, bits, symmetric=False, granularity="channel") - w).square().mean().item()


def _check_format(fit, w, bits, dim, C, R=1, G=1):
    N, K = w.shape
    assert fit.codes.shape == (N, K // dim, C) and fit.codes.dtype == torch.int64
    assert int(fit.codes.min()) >= 0 and int(fit.codes.max()) < 2**bits
    assert fit.codebooks.shape == (R, G, C, 2**bits, dim) and fit.codebooks.dtype == torch.float32
    assert bool(torch.isfinite(fit.codebooks).all())


# ---------------------------------------------------------------- k-means core


def _digits():
    sklearn = pytest.importorskip("sklearn.datasets")
    return torch.tensor(sklearn.load_digits().data, dtype=torch.float32)


@pytest.mark.parametrize("k", [10, 32])
def test_kmeans_inertia_within_2pct_of_sklearn(k):
    from sklearn.cluster import KMeans

    X = _digits()
    # One run's local optimum varies by a few % with the seed, for both (k-means++ is random):
    # compare the mean of 4 seeded runs each (ours with one init, scikit-learn with its default).
    runs = [cb.kmeans(X, k, iters=300, return_result=True, seed=s) for s in range(4)]
    ours = sum(float(r.inertia) for r in runs) / 4
    ref = sum(KMeans(k, random_state=s).fit(X.numpy()).inertia_ for s in range(4)) / 4
    assert ours <= 1.02 * ref, (ours, ref)
    res = runs[0]
    assert _monotone(res.history) and len(res.history) > 2
    # the reported inertia is the inertia of the returned centroids and codes
    direct = (X - res.centroids[res.codes]).square().sum().item()
    assert math.isclose(direct, float(res.inertia), rel_tol=1e-5)


def test_kmeans1d_within_2pct_of_sklearn_and_exact():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(3000, generator=g), 4 + 0.5 * torch.randn(1000, generator=g)])
    res = km.kmeans1d(x.unsqueeze(0), 16)
    ref = KMeans(16, random_state=0).fit(x.unsqueeze(1).numpy()).inertia_
    assert float(res.inertia.sum()) <= 1.02 * ref
    assert _monotone(res.history)
    c = res.centroids[0, :, 0]
    assert bool((c[1:] >= c[:-1]).all())  # sorted
    # codes are the nearest centroids and the inertia matches them
    nearest = (x.unsqueeze(1) - c).abs().argmin(1)
    dist_codes = (x - c[res.codes[0]]).abs()
    assert torch.allclose(dist_codes, (x - c[nearest]).abs(), atol=1e-6)
    assert math.isclose((x - c[res.codes[0]]).square().sum().item(), float(res.inertia.sum()), rel_tol=1e-4)


def test_kmeans1d_batched_groups_and_weights():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 700, generator=g)
    w = torch.rand(5, 700, generator=g)
    res = km.kmeans1d(x, 8, w)
    assert res.centroids.shape == (5, 8, 1) and res.codes.shape == (5, 700)
    for i in range(5):
        one = km.kmeans1d(x[i : i + 1], 8, w[i : i + 1])
        # each group is solved on its own: same objective as alone (same seed stream is not
        # guaranteed, so compare quality, not bits)
        assert float(res.inertia[i]) <= 1.05 * float(one.inertia[0])
    # weighted centroids are weighted means of their clusters
    c = res.centroids[0, :, 0]
    for j in range(8):
        m = res.codes[0] == j
        if m.any():
            assert math.isclose(float(c[j]), float((x[0][m] * w[0][m]).sum() / w[0][m].sum()), rel_tol=1e-4, abs_tol=1e-5)


def test_kmeans_weights_equal_duplicated_points():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 3, generator=g)
    reps = torch.randint(1, 4, (300,), generator=g)
    init = x[:6].clone()
    c_w, codes_w = cb.kmeans(x, 6, sample_weight=reps.float(), init=init, iters=50)
    c_d, _ = cb.kmeans(x.repeat_interleave(reps, 0), 6, init=init, iters=50)
    assert torch.allclose(c_w, c_d, atol=1e-5)


def test_kmeans_diag_weights_and_metric_paths():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(800, 4, generator=g) @ torch.randn(4, 4, generator=g)
    wd = torch.rand(800, 4, generator=g) + 0.1
    r = cb.kmeans(x, 8, sample_weight=wd, return_result=True)
    assert _monotone(r.history)
    obj = ((x - r.centroids[r.codes]).square() * wd).sum().item()
    assert math.isclose(obj, float(r.inertia), rel_tol=1e-5)

    A = torch.randn(4, 4, generator=g)
    M = A @ A.T + 0.5 * torch.eye(4)
    def maha(c, codes):
        diff = x - c[codes]
        return torch.einsum("nd,de,ne->", diff, M, diff).item()

    rw = cb.kmeans(x, 8, metric=M, return_result=True)  # shared metric: whitening
    assert math.isclose(maha(rw.centroids, rw.codes), float(rw.inertia), rel_tol=1e-4)
    rp = cb.kmeans(x, 8, metric=M.expand(800, 4, 4), return_result=True)  # per-point metric path
    assert _monotone(rp.history)
    assert math.isclose(maha(rp.centroids, rp.codes), float(rp.inertia), rel_tol=1e-4)
    # learning under the metric beats Euclidean centroids measured under the metric
    re = cb.kmeans(x, 8, return_result=True)
    codes_e = km.assign((x @ torch.linalg.cholesky(M)).unsqueeze(0),
                        (re.centroids @ torch.linalg.cholesky(M)).unsqueeze(0))[0]
    assert maha(rw.centroids, rw.codes) < maha(re.centroids, codes_e)
    assert maha(rp.centroids, rp.codes) < 1.05 * maha(rw.centroids, rw.codes)


def test_kmeans_empty_clusters_relocated_and_duplicates():
    # 5 distinct values, 8 clusters: every distinct value gets a centroid, no NaN
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0]).repeat(20).unsqueeze(1)
    r = cb.kmeans(x, 8, return_result=True)
    assert float(r.inertia) == 0.0 and bool(torch.isfinite(r.centroids).all())
    r1 = km.kmeans1d(x.T, 8)
    # prefix-sum inertia: exact up to float64 cancellation relative to sum(x^2)
    assert float(r1.inertia.sum()) <= 1e-12 * x.square().sum().item() and bool(torch.isfinite(r1.centroids).all())
    assert torch.equal(torch.unique(r1.centroids[0, :, 0].round(decimals=5)), torch.tensor([0.0, 1, 2, 3, 10]))
    # forced empty clusters: every initial centroid far away from the data
    init = torch.full((4, 1), 100.0) + torch.arange(4.0).unsqueeze(1)
    y = torch.randn(200, 1)
    r2 = cb.kmeans(y, 4, init=init, iters=30, return_result=True)
    assert _monotone(r2.history) and len(torch.unique(r2.codes)) == 4


def test_kmeans_deterministic_and_bounded_chunks(monkeypatch):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1500, 4, generator=g)
    a = cb.kmeans(x, 16, seed=3)
    monkeypatch.setattr(km, "CHUNK_ELEMS", 1000)  # many small blocks: same answer
    b = cb.kmeans(x, 16, seed=3)
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], atol=1e-6)
    c = cb.kmeans(x, 16, seed=4)
    assert not torch.equal(a[1], c[1])


# ---------------------------------------------------------------- learners on weights


@pytest.mark.parametrize("row_groups", [1, 4])
def test_scalar_kmeans_beats_rtn(row_groups):
    w = _weight()
    h = []
    fit = cb.scalar_kmeans_quantize(w, 4, row_groups=row_groups, history=h)
    _check_format(fit, w, 4, 1, 1, R=row_groups)
    assert _monotone(h) and len(h) > 2
    assert _mse(fit, w) < _rtn_mse(w, 4)
    assert math.isclose(h[-1], (cb.decode(fit) - w).square().sum().item(), rel_tol=1e-4)


def test_scalar_kmeans_importance_lowers_weighted_error():
    w = _weight()
    imp = torch.linspace(0.01, 10, w.shape[1]) ** 2
    plain = cb.scalar_kmeans_quantize(w, 3)
    weighted = cb.scalar_kmeans_quantize(w, 3, importance=imp)
    assert cb.reconstruction_error(weighted, w, imp) < cb.reconstruction_error(plain, w, imp)


@pytest.mark.parametrize("dim,bits,groups", [(2, 4, 1), (4, 8, 2)])
def test_pq_beats_rtn_and_is_monotone(dim, bits, groups):
    w = _weight()
    h = []
    fit = cb.product_quantize(w, bits, dim, groups=groups, max_points_per_centroid=None, history=h)
    _check_format(fit, w, bits, dim, 1, G=groups)
    assert _monotone(h) and len(h) > 2
    assert _mse(fit, w) < _rtn_mse(w, bits // dim)


def test_pq_importance_and_metric():
    w = _weight()
    g = torch.Generator().manual_seed(6)
    X = torch.randn(512, w.shape[1], generator=g) * torch.linspace(0.1, 2, w.shape[1])
    X[:, 1::2] = 0.9 * X[:, 0::2] + 0.1 * X[:, 1::2]  # correlated pairs: the blocks of H are far from diagonal
    H = X.T @ X / 512
    imp = H.diagonal().clone()
    plain = cb.product_quantize(w, 6, 2, groups=4)
    weighted = cb.product_quantize(w, 6, 2, groups=4, importance=imp)
    assert cb.reconstruction_error(weighted, w, imp) < cb.reconstruction_error(plain, w, imp)
    # Mahalanobis on each sub-vector's block of H: both the whitened (one column per codebook)
    # and the per-point metric path lower the block-diagonal output error.
    def block_err(fit):
        d = (w - cb.decode(fit)).reshape(w.shape[0], -1, 2)
        Hb = H.reshape(-1, 2, H.shape[0] // 2, 2)[torch.arange(H.shape[0] // 2), :, torch.arange(H.shape[0] // 2), :]
        return torch.einsum("njd,jde,nje->", d, Hb, d).item()
    per_col = cb.product_quantize(w, 4, 2, groups=w.shape[1] // 2)
    per_col_m = cb.product_quantize(w, 4, 2, groups=w.shape[1] // 2, metric=H)
    assert block_err(per_col_m) < block_err(per_col)
    shared = cb.product_quantize(w, 6, 2, groups=4, metric=H)
    assert block_err(shared) < block_err(plain)


def test_opq_rotation_orthogonal_monotone_and_beats_pq():
    g = torch.Generator().manual_seed(7)
    A = torch.randn(32, 32, generator=g) / 32**0.5
    w = (torch.randn(512, 32, generator=g) @ A) * torch.linspace(0.2, 2, 32)
    h = []
    fit = cb.optimized_product_quantize(w, 6, 4, groups=8, block=16, opq_iters=20, history=h)
    _check_format(fit, w, 6, 4, 1, G=8)
    rot = fit.rotation
    assert rot.shape == (2, 16, 16)
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(16).expand(2, 16, 16), atol=1e-5)
    assert _monotone(h) and h[-1] < h[0]
    pq = cb.product_quantize(w, 6, 4, groups=8)
    assert _mse(fit, w) < _mse(pq, w)


def test_rq_aq_two_level():
    w = _weight(N=128, K=128)
    hr, ha, ht = [], [], []
    rq = cb.residual_quantize(w, 6, 4, 2, history=hr)
    _check_format(rq, w, 6, 4, 2)
    assert _monotone(hr)
    aq = cb.additive_quantize(w, 6, 4, 2, iters=4, beam=4, history=ha)
    _check_format(aq, w, 6, 4, 2)
    assert _monotone(ha) and ha[-1] < ha[0]
    assert _mse(aq, w) <= _mse(rq, w) * 1.001
    tl = cb.two_level_quantize(w, 6, 4, groups=4, history=ht)
    _check_format(tl, w, 6, 4, 2, G=4)
    assert _monotone(ht)
    assert torch.equal(tl.codebooks[0, 0, 0], tl.codebooks[0, 3, 0])  # one shared coarse codebook
    for fit in (rq, aq, tl):
        assert _mse(fit, w) < _rtn_mse(w, 3)  # 2 x 6 bits per 4 weights = 3 bits per weight


def test_beam_search_never_worse_than_greedy():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 400, 4, generator=g)
    books = torch.randn(1, 3, 16, 4, generator=g) * torch.tensor([1.0, 0.5, 0.25]).view(1, 3, 1, 1)
    _, e1 = cb.beam_encode(x, None, books, 1)
    _, e8 = cb.beam_encode(x, None, books, 8)
    codes, e_all = cb.beam_encode(x, None, books, 16 * 16)
    assert bool((e8 <= e1 + 1e-5).all()) and e8.sum() < e1.sum()
    # beam >= E^(C-1) is exhaustive: compare with brute force over all 16^3 triples
    grid = (books[0, 0].view(16, 1, 1, 4) + books[0, 1].view(1, 16, 1, 4) + books[0, 2].view(1, 1, 16, 4)).reshape(-1, 4)
    brute = torch.cdist(x[0], grid).square().min(1).values
    assert torch.allclose(e_all[0], brute, atol=1e-4)


def test_ls_codebooks_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 600, 3, generator=g)
    codes = torch.randint(0, 8, (1, 600, 2), generator=g)
    start = torch.randn(1, 2, 8, 3, generator=g)
    new = cb.ls_codebooks(x, None, start, codes)
    # any codebooks do no better: compare with a dense least-squares solve
    A = torch.zeros(600, 16)
    A[torch.arange(600), codes[0, :, 0]] = 1
    A[torch.arange(600), 8 + codes[0, :, 1]] = 1
    best = torch.linalg.lstsq(A.double(), x[0].double()).solution
    err_ref = (A.double() @ best - x[0].double()).square().sum().item()
    err = (cb.learners._gather_sum(new, codes) - x).square().sum().item()
    assert err <= err_ref * (1 + 1e-5)


def _weighted_ls_optimum_error(x, weight, codes, E):
    """The exact minimum over all codebooks of the diagonally weighted error, fixed codes: one
    dense weighted least-squares problem per coordinate (float64 lstsq on sqrt-weighted rows)."""
    _, n, d = x.shape
    C = codes.shape[2]
    A = torch.zeros(n, C * E, dtype=torch.float64)
    for c in range(C):
        A[torch.arange(n), c * E + codes[0, :, c]] = 1
    err = 0.0
    for t in range(d):
        s = weight[0, :, t].double().sqrt().unsqueeze(1)
        sol = torch.linalg.lstsq(s * A, s * x[0, :, t : t + 1].double(), driver="gelsd").solution
        err += ((s * A) @ sol - s * x[0, :, t : t + 1].double()).square().sum().item()
    return err


def test_weighted_aq_least_squares_in_a_fresh_multithreaded_process():
    """Regression: ls_codebooks solved its damped normal equations with torch.linalg.solve, whose
    batched CPU LU (torch 2.14 + MKL 2024.2, 2 threads) returns invalid pivots in a fresh process
    for the [d, 512, 512] systems of a per-coordinate importance (aq2's 2 x 256 entries of d = 8):
    "Pivots given to lu_solve must all be greater or equal to 1", so lowbit.gptq learned aq
    codebooks unweighted. A process that has already factored small matrices does not show it,
    hence a fresh interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch\n"
        "from lowbit.quant.codebook import learners\n"
        "torch.set_num_threads(2)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(1, 1024, 8, generator=g)\n"
        "weight = torch.logspace(-2, 1, 8).expand(1, 1024, 8).contiguous()\n"
        "codes = torch.randint(0, 256, (1, 1024, 2), generator=g)\n"
        "cb = learners.ls_codebooks(x, weight, torch.zeros(1, 2, 256, 8), codes)\n"
        "assert bool(torch.isfinite(cb).all())\n"
    )
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]


def test_weighted_aq_codebooks_are_the_weighted_least_squares_optimum():
    # 2 x 64 entries of d = 8 (aq2's 2 x 256 only makes the solve slower; the test above has it)
    w = _weight(N=32, K=256, seed=11)
    g = torch.Generator().manual_seed(12)
    imp = torch.logspace(-2, 1, 256)[torch.randperm(256, generator=g)]  # uneven, like diag(H)
    un = cb.additive_quantize(w, 6, 8, 2, iters=2)
    P = cb.learners._Problems(w, 8, 1, 1, imp, None)
    codes = cb.learners.to_problems(un.codes, 1, 1)
    start = un.codebooks.reshape(1, 2, 64, 8)
    new = cb.ls_codebooks(P.x, P.weight, start, codes)

    def err(books):
        return cb.learners.sq_error(P.x, P.weight, cb.learners._gather_sum(books, codes)).double().sum().item()

    # (b) on the same codes the weighted solve is no worse than the unweighted codebooks (here much
    # better), and it is the weighted optimum: the damping (relative 1e-7) and the float32 codebooks
    # cost far less than the 1e-5 allowed.
    assert err(new) < err(start)
    assert err(new) <= _weighted_ls_optimum_error(P.x, P.weight, codes, 64) * (1 + 1e-5)
    # (c) the whole weighted learner: its objective never rises, and it beats the unweighted fit
    # under the weighted error
    h = []
    fit = cb.additive_quantize(w, 6, 8, 2, iters=3, importance=imp, history=h)
    _check_format(fit, w, 6, 8, 2)
    assert _monotone(h) and h[-1] < h[0]
    assert cb.reconstruction_error(fit, w, imp) < cb.reconstruction_error(un, w, imp)


# ---------------------------------------------------------------- FAISS comparisons


def _faiss_data():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 16, generator=g) / 4
    X = (torch.randn(2048, 16, generator=g) @ A) * torch.linspace(0.2, 2, 16)
    return X


def test_pq_no_worse_than_faiss():
    faiss = pytest.importorskip("faiss")
    X = _faiss_data()
    M, nbits = 4, 6
    pq = faiss.ProductQuantizer(16, M, nbits)
    pq.verbose = False
    pq.train(X.numpy())
    ref = float(((pq.decode(pq.compute_codes(X.numpy())) - X.numpy()) ** 2).mean())
    ours = _mse(cb.product_quantize(X, nbits, 16 // M, groups=M), X)
    assert ours <= ref, (ours, ref)


def test_opq_no_worse_than_faiss():
    faiss = pytest.importorskip("faiss")
    X = _faiss_data()
    M, nbits = 4, 6
    opq = faiss.OPQMatrix(16, M)
    opq.niter = 25  # both sides get the same number of rotation updates (FAISS's default is 50)
    opq.train(X.numpy())
    Xr = opq.apply_py(X.numpy())
    pq = faiss.ProductQuantizer(16, M, nbits)
    pq.train(Xr)
    ref = float(((opq.reverse_transform(pq.decode(pq.compute_codes(Xr))) - X.numpy()) ** 2).mean())
    ours = _mse(cb.optimized_product_quantize(X, nbits, 16 // M, groups=M, block=16, opq_iters=25), X)
    assert ours <= ref, (ours, ref)


def test_rq_no_worse_than_faiss():
    faiss = pytest.importorskip("faiss")
    X = _faiss_data()
    C, nbits = 3, 6
    rq = faiss.ResidualQuantizer(16, C, nbits)
    rq.train(X.numpy())
    ref = float(((rq.decode(rq.compute_codes(X.numpy())) - X.numpy()) ** 2).mean())
    ours = _mse(cb.residual_quantize(X, nbits, 16, C), X)
    assert ours <= ref, (ours, ref)


# ---------------------------------------------------------------- lattices


def test_lattice_shells():
    d4 = lat.lattice_points("D4", 625)
    _, counts = torch.unique(d4.square().sum(1), return_counts=True)
    assert counts.tolist() == [1, 24, 24, 96, 24, 144, 96, 192, 24]  # theta series of D4
    e8 = lat.lattice_points("E8", 1 + 240 + 2160)
    _, counts = torch.unique(e8.square().sum(1), return_counts=True)
    assert counts.tolist() == [1, 240, 2160]  # theta series of E8
    assert bool((torch.remainder(e8.sum(1), 2) == 0).all())
    assert bool(((e8 * 2).remainder(2).eq(0).all(1) | (e8 * 2).remainder(2).eq(1).all(1)).all())


@pytest.mark.parametrize("name,d", [("D4", 4), ("E8", 8)])
def test_lattice_nearest_point_is_exact(name, d):
    pts = lat.lattice_points(name, 20000)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3000, d, generator=g) * 0.6
    near = lat.nearest(x, name)
    dn = (x - near).square().sum(1)
    db = torch.cdist(x, pts).square().min(1).values
    inside = near.square().sum(1) <= pts.square().sum(1).max() - 2  # nearest point enumerated
    assert bool(inside.float().mean() > 0.95)
    assert torch.allclose(dn[inside], db[inside], atol=1e-4)
    assert bool((dn <= db + 1e-4).all())  # never worse than any enumerated point


@pytest.mark.parametrize("dim,bits", [(4, 8), (8, 8)])
def test_lattice_quantize_beats_rtn(dim, bits):
    w = _weight(N=64, K=256)
    h = []
    fit = cb.lattice_quantize(w, bits, dim, history=h)
    _check_format(fit, w, bits, dim, 1)
    assert fit.scale.shape == (64,) and bool((fit.scale > 0).all())
    assert _monotone(h)
    assert _mse(fit, w) < _rtn_mse(w, max(1, bits // dim))


# ---------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("method", ["cg", "adam"])
def test_finetune_lowers_output_error(method):
    w = _weight(N=64, K=128)
    g = torch.Generator().manual_seed(11)
    X = torch.randn(256, 128, generator=g) * torch.linspace(0.05, 3, 128)
    fits = [cb.scalar_kmeans_quantize(w, 3), cb.optimized_product_quantize(w, 6, 2, block=32, opq_iters=3)]
    if method == "cg":  # the exact method covers every kind of fit; Adam shares its plumbing
        fits += [cb.product_quantize(w, 6, 2, groups=2), cb.lattice_quantize(w, 8, 4)]
    for fit in fits:
        h = []
        tuned = cb.finetune_codebooks(fit, w, X, method=method, steps=15 if method == "cg" else 8, history=h)
        assert _monotone(h)
        before, after = cb.output_error(fit, w, X), cb.output_error(tuned, w, X)
        assert after < before and math.isclose(after, h[-1], rel_tol=1e-4)
        assert torch.equal(tuned.codes, fit.codes)


def test_finetune_cg_reaches_least_squares_optimum():
    # scalar codebook with one row: the optimum is a small dense least-squares problem
    g = torch.Generator().manual_seed(12)
    w = torch.randn(1, 64, generator=g)
    X = torch.randn(100, 64, generator=g)
    fit = cb.scalar_kmeans_quantize(w, 2)
    tuned = cb.finetune_codebooks(fit, w, X, steps=50)
    A = torch.nn.functional.one_hot(fit.codes[0, :, 0], 4).double()  # [64, 4]
    theta = torch.linalg.lstsq(X.double() @ A, X.double() @ w[0].double()).solution
    best = (X.double() @ (w[0].double() - A @ theta)).square().sum().item()
    assert cb.output_error(tuned, w, X) <= best * (1 + 1e-4)


# ---------------------------------------------------------------- errors and determinism


def test_bad_inputs_name_the_argument():
    w = _weight(N=8, K=16)
    with pytest.raises(ValueError, match="bits"):
        cb.scalar_kmeans_quantize(w, 0)
    with pytest.raises(ValueError, match="dim"):
        cb.product_quantize(w, 4, 3)
    with pytest.raises(ValueError, match="groups"):
        cb.product_quantize(w, 4, 2, groups=3)
    with pytest.raises(ValueError, match="row_groups"):
        cb.residual_quantize(w, 4, 2, row_groups=3)
    with pytest.raises(ValueError, match="importance"):
        cb.product_quantize(w, 4, 2, importance=torch.ones(15))
    with pytest.raises(ValueError, match="importance"):
        cb.scalar_kmeans_quantize(w, 4, importance=-torch.ones(16))
    with pytest.raises(ValueError, match="metric"):
        cb.product_quantize(w, 4, 2, groups=8, metric=-torch.eye(16))
    with pytest.raises(ValueError, match="w must be finite"):
        cb.scalar_kmeans_quantize(w.masked_fill(w > 1, float("nan")), 2)
    with pytest.raises(ValueError, match="block"):
        cb.optimized_product_quantize(w, 4, 2, block=6)
    with pytest.raises(ValueError, match="dim"):
        cb.lattice_quantize(w, 8, 2)
    with pytest.raises(ValueError, match="x_calib"):
        cb.finetune_codebooks(cb.scalar_kmeans_quantize(w, 2), w, torch.randn(4, 15))
    with pytest.raises(ValueError, match="sample_weight"):
        cb.kmeans(torch.randn(10, 2), 2, sample_weight=torch.ones(9))


def test_learners_are_deterministic():
    w = _weight(N=64, K=64)
    for f in (lambda: cb.scalar_kmeans_quantize(w, 3, seed=1), lambda: cb.product_quantize(w, 5, 2, seed=1),
              lambda: cb.additive_quantize(w, 4, 4, 2, iters=2, seed=1)):
        a, b = f(), f()
        assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks)


def test_decode_matches_the_format():
    fmt = pytest.importorskip("lowbit.formats.codebook")
    w = _weight(N=32, K=64)
    for fit in (cb.product_quantize(w, 4, 2, groups=2, row_groups=2), cb.optimized_product_quantize(w, 4, 2, block=16, opq_iters=2),
                cb.lattice_quantize(w, 8, 4)):
        packed = fmt.from_codes(fit.codes, fit.codebooks, fit.scale, fit.rotation)
        assert torch.allclose(fmt.dequantize(packed), cb.decode(fit), atol=1e-5)
