"""Codebook fine-tuning on the layer's output error, codes fixed.

Minimizes ``||X W^T - X W_hat^T||_F^2`` over the codebooks, where ``X`` [T, K] are calibration
activations and ``W_hat`` is decoded from the fit (codes, per-row scale and OPQ rotation held
fixed). ``W_hat`` is linear in the codebooks, so this is a linear least-squares problem:

* ``method="cg"`` (default): preconditioned conjugate gradients on its normal equations. Each
  iteration is one decode, one product with the input Gram matrix (or two with X when T is small)
  and one scatter back to the codebooks (the decode's adjoint, by autograd). With exact line
  searches every step lowers the objective; the Jacobi-style preconditioner (the usage-weighted
  diagonal of ``X^T X`` per entry) evens out entries that many or few weights share.
* ``method="adam"``: Adam on the same loss; the best iterate is kept, so the result is never
  worse than the input.
"""

from __future__ import annotations

import torch

from .clustering import progress_bar
from .learners import CodebookFit, _err, decode


def output_error(fit: CodebookFit, w: torch.Tensor, x_calib: torch.Tensor) -> float:
    """``||x_calib (w - decode(fit))^T||_F^2`` in float64."""
    d = (w.to(torch.float32) - decode(fit)).to(torch.float64)
    return float((x_calib.to(torch.float64) @ d.T).square().sum())


def finetune_codebooks(
    fit: CodebookFit,
    w: torch.Tensor,
    x_calib: torch.Tensor,
    *,
    steps: int = 25,
    lr: float | None = None,
    method: str = "cg",
    progress: bool = False,
    history: list | None = None,
) -> CodebookFit:
    """Refit the codebooks of `fit` to the layer output on calibration inputs x_calib [T, K]."""
    if w.dim() != 2:
        raise _err(f"w must be [N, K], got {list(w.shape)}")
    N, K = w.shape
    if x_calib.dim() != 2 or x_calib.shape[1] != K:
        raise _err(f"x_calib must be [T, K={K}], got {list(x_calib.shape)}")
    if method not in ("cg", "adam"):
        raise _err(f"method must be 'cg' or 'adam', got {method!r}")
    W = w.detach().to(torch.float32)
    X = x_calib.detach().to(torch.float32)
    T = X.shape[0]
    use_gram = 2 * T > K  # one K x K product beats two with X
    H = X.T @ X if use_gram else None

    def apply_h(D):
        """D [N, K] -> D (X^T X)."""
        return D @ H if use_gram else (D @ X.T) @ X

    def dec(theta):
        return decode(fit._replace(codebooks=theta))

    def adjoint(G, like):
        """A^T G: the gradient of <decode(theta), G> with respect to theta."""
        th = like.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(dec(th), th, grad_outputs=G)
        return g

    def loss(theta):
        D = (W - dec(theta)).to(torch.float64)
        if use_gram:
            return float((D @ H.to(torch.float64) * D).sum())
        return float((D @ X.T.to(torch.float64)).square().sum())

    theta = fit.codebooks.detach().to(torch.float32).clone()
    cur = loss(theta)
    if history is not None:
        history.append(cur)
    bar = progress_bar(steps, progress, f"codebook fine-tune ({method})")

    if method == "cg":
        # Preconditioner: sum over the weights an entry serves of (scale * rotation-mixed) H_kk.
        hdiag = H.diagonal() if use_gram else X.square().sum(0)
        ones_like_w = hdiag.expand(N, K).contiguous()
        if fit.scale is not None:
            ones_like_w = ones_like_w * fit.scale.to(torch.float32).square().unsqueeze(1)
        plain = fit._replace(scale=None, rotation=None)
        th = theta.detach().requires_grad_(True)
        (prec,) = torch.autograd.grad(decode(plain._replace(codebooks=th)), th, grad_outputs=ones_like_w)
        prec = torch.where(prec > 0, 1.0 / prec.clamp_min(1e-30), torch.ones_like(prec))
        r = adjoint(apply_h(W - dec(theta)), theta)  # -grad / 2
        z = prec * r
        p = z.clone()
        rz = float((r.to(torch.float64) * z).sum())
        for _ in range(steps):
            if rz <= 0:
                break
            Ap = adjoint(apply_h(dec(p)), theta)
            pAp = float((p.to(torch.float64) * Ap).sum())
            if pAp <= 0:
                break
            alpha = rz / pAp
            cand = theta + alpha * p
            new = loss(cand)
            if not new <= cur:  # float rounding at convergence: stop rather than step uphill
                break
            theta, cur = cand, new
            r = r - alpha * Ap
            z = prec * r
            rz_new = float((r.to(torch.float64) * z).sum())
            p = z + (rz_new / rz) * p
            rz = rz_new
            if history is not None:
                history.append(cur)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(objective=f"{cur:.4g}")
    else:
        # Adam written out: torch.optim's first use imports torch.distributed & co (seconds).
        step_size = lr if lr is not None else 1e-2 * (float(theta.abs().mean()) or 1.0)
        beta1, beta2, eps = 0.9, 0.999, 1e-12
        param = theta.clone()
        m1 = torch.zeros_like(param)
        m2 = torch.zeros_like(param)
        best, best_loss = theta.clone(), cur
        for t in range(1, steps + 1):
            grad = -2.0 * adjoint(apply_h(W - dec(param)), param)
            m1.mul_(beta1).add_(grad, alpha=1 - beta1)
            m2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (m2 / (1 - beta2**t)).sqrt_().add_(eps)
            param = param - step_size * (m1 / (1 - beta1**t)) / denom
            val = loss(param)
            if val < best_loss:
                best, best_loss = param.clone(), val
            if history is not None:
                history.append(best_loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(objective=f"{best_loss:.4g}")
        theta = best
    if bar is not None:
        bar.close()
    return fit._replace(codebooks=theta.contiguous())
