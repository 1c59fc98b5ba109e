"""The linear algebra that the reconstruction methods (SparseGPT, ALPS, SparseFW, Putri) share.

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
CG_RTOL = 1e-4  # the support refit stops when every row's residual is this small against its right-hand side


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


def damped_hessian(stats: LinearStats, damp: float, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`layer_hessian` with λ = damp · mean(diag H) added to its diagonal (ALPS's and SparseFW's refit)."""
    H, dead = layer_hessian(stats, method)
    H.diagonal().add_(damp * H.diagonal().mean())
    return H, dead


def refit_kept_weights(weight: torch.Tensor, stats: LinearStats, kept: torch.Tensor, damp: float,
                       iterations: int, method: str) -> torch.Tensor:
    """The weights on `kept` (zero elsewhere) that best reproduce the dense layer's outputs: least
    squares on a fixed support, row by row, by `conjugate_gradient_on_support` from the dense values,
    in the coordinates where the damped H has a unit diagonal (its Jacobi preconditioner)."""
    H, dead = damped_hessian(stats, damp, method)
    scale = H.diagonal().sqrt()
    G = (H / scale.unsqueeze(0) / scale.unsqueeze(1)).to(torch.float32)
    scale = scale.to(torch.float32)
    dense = weight.detach().to(torch.float32) * scale
    dense[:, dead] = 0.0
    refit = conjugate_gradient_on_support(G, dense @ G, dense * kept, kept, iterations)
    return (refit / scale).to(weight.dtype)


def conjugate_gradient_on_support(G: torch.Tensor, rhs: torch.Tensor, start: torch.Tensor, kept: torch.Tensor,
                        iterations: int) -> torch.Tensor:
    """Least squares on a fixed support, every row at once: for each row i, the b (zero off
    `kept[i]`) solving (bG)_S = rhs_S on its support S, from `start`.

    Conjugate gradients on the restricted operator P ↦ (PG)⊙kept; G's unit diagonal is the
    Jacobi preconditioner. Stops when every row's residual is below CG_RTOL × its right-hand side.
    """
    B = start.clone()
    residual = (rhs - B @ G) * kept
    direction = residual.clone()
    energy = residual.square().sum(1)
    stop = (CG_RTOL * (rhs * kept).norm(dim=1)).square()
    for _ in range(iterations):
        if bool((energy <= stop).all()):
            break
        moved = (direction @ G) * kept
        curvature = (direction * moved).sum(1)
        step = torch.where(curvature > 0, energy / curvature.clamp_min(torch.finfo(curvature.dtype).tiny), 0.0)
        B += step.unsqueeze(1) * direction
        residual -= step.unsqueeze(1) * moved
        new_energy = residual.square().sum(1)
        direction = residual + torch.where(energy > 0, new_energy / energy.clamp_min(torch.finfo(energy.dtype).tiny),
                                           0.0).unsqueeze(1) * direction
        energy = new_energy
    return B
