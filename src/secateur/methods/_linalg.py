"""The linear algebra that the reconstruction methods (SparseGPT, ALPS, Putri) share.

All of them minimise a layer's output error ‖XWᵀ − XŴᵀ‖², whose Hessian is H = (2/n)·XᵀX
(the `gram` statistic). They need it in float64, with the inputs that never fired made
harmless, and damped until it can be factorised; these steps live here so that every method
damps and repairs H the same way.
"""

from __future__ import annotations

import torch

from secateur.errors import SecateurError
from secateur.stats import LinearStats

DAMP_RETRIES = 6  # each retry multiplies the damping by 10


def layer_hessian(stats: LinearStats, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """H = (2/n)·XᵀX in float64 and the mask of dead inputs (diag H = 0), whose diagonal is set to 1.

    A column that never fires carries no information: its weights can be pruned for free
    (the caller zeroes them), and a unit diagonal keeps H invertible.
    """
    if stats.gram is None or stats.count == 0:
        raise SecateurError(f"{method} needs the input Gram matrix of at least one calibration token")
    H = stats.gram.to(torch.float64) * (2.0 / stats.count)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    return H, dead


def inverse_cholesky_upper(H: torch.Tensor, damp: float, method: str = "sparsegpt") -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean(diag H), raising λ tenfold on failure.

    Shared with the structured methods (Putri's neuron scores); `method` names the option to
    raise in the error message.
    """
    mean_diag = torch.diagonal(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    factor = damp
    for _ in range(DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + factor * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U
        factor = factor * 10 if factor > 0 else 1e-4  # damp=0 still gets a chance to recover
    raise SecateurError(
        f"a layer's Hessian is singular (not positive definite even with damping {factor / 10:g} · mean "
        f"diagonal): use more calibration data or a larger {method} damp"
    )
