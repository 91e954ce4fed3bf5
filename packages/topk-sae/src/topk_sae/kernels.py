"""Sparse kernels of the TopK SAE: decode from (values, indices) and a sparse encoder backward.

Cost model (N rows, d_in = D, n latents, K selected per row):

* the dense encoder pre-activation ``x @ W_enc^T`` is the only O(N·n·D) operation and it runs
  without autograd (nothing of size N·n is kept for the backward);
* ``sparse_decode`` is an embedding bag, O(N·K·D) forward and backward; its weight gradient is
  non-zero only on the selected atoms;
* ``gather_preacts`` re-attaches the K selected pre-activations to the graph; its backward forms
  ``dW_enc = S^T x`` with the sparse (n, N) matrix ``S`` of the selected gradients (O(N·K·D))
  instead of the dense O(N·n·D) product, and ``dx = S^T``-weighted rows of ``W_enc``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sparse_decode(values_NK: Tensor, indices_NK: Tensor, atoms_nD: Tensor) -> Tensor:
    """``sum_j values[i, j] * atoms[indices[i, j]]`` for every row i, as an embedding bag.

    Differentiable in ``values_NK`` and ``atoms_nD``; the atom gradient touches only the selected
    rows.
    """
    if values_NK.shape != indices_NK.shape or values_NK.ndim != 2:
        raise ValueError(
            f"values {tuple(values_NK.shape)} and indices {tuple(indices_NK.shape)} must be the "
            "same (N, K) shape"
        )
    if values_NK.shape[1] == 0:
        return atoms_nD.new_zeros(values_NK.shape[0], atoms_nD.shape[1])
    return F.embedding_bag(
        indices_NK, atoms_nD, per_sample_weights=values_NK.to(atoms_nD.dtype), mode="sum"
    )


def selected_outer_sum(grad_NM: Tensor, indices_NM: Tensor, x_ND: Tensor, n_rows: int) -> Tensor:
    """``G[l] = sum_{(i, j): indices[i, j] = l} grad[i, j] * x[i]``, shape (n_rows, D).

    This is ``S^T @ x`` for the sparse (N, n_rows) matrix S holding ``grad`` at ``indices``:
    O(N·M·D) work and no (N, M, D) temporary (unlike an ``index_add_`` of per-entry outer
    products).
    """
    n, m = indices_NM.shape
    rows = indices_NM.reshape(-1)
    cols = torch.arange(n, device=x_ND.device).repeat_interleave(m)
    sparse_nN = torch.sparse_coo_tensor(
        torch.stack([rows, cols]),
        grad_NM.reshape(-1).to(x_ND.dtype),
        (n_rows, n),
        check_invariants=False,
    )
    return torch.sparse.mm(sparse_nN, x_ND)


class _GatherPreacts(torch.autograd.Function):
    """Selected pre-activations ``(x @ W^T)[i, indices[i, j]]`` with a sparse backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x_ND: Tensor,
        weight_nD: Tensor,
        indices_NM: Tensor,
        preacts_NM: Tensor | None,
    ) -> Tensor:
        ctx.save_for_backward(x_ND, weight_nD, indices_NM)
        if preacts_NM is not None:
            return preacts_NM.to(x_ND.dtype)
        # (N, M, D) in chunks would be possible; rows are independent, so an embedding-style
        # gather of the selected weight rows is exact and O(N·M·D).
        return torch.einsum("nd,nmd->nm", x_ND, weight_nD[indices_NM])

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_NM: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        x_ND, weight_nD, indices_NM = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = sparse_decode(grad_NM, indices_NM, weight_nD)
        if ctx.needs_input_grad[1]:
            grad_w = selected_outer_sum(grad_NM, indices_NM, x_ND, weight_nD.shape[0])
        return grad_x, grad_w, None, None


def gather_preacts(
    x_ND: Tensor, weight_nD: Tensor, indices_NM: Tensor, preacts_NM: Tensor | None = None
) -> Tensor:
    """Pre-activations ``x_i · W[indices[i, j]]`` of the selected latents, differentiable.

    ``preacts_NM`` may pass values already computed by the dense (no-grad) matmul; they are
    returned as they are (in ``x``'s dtype) and only the backward is taken from this function.
    Leave it ``None`` to recompute the selected entries exactly in ``x``'s dtype (used after a
    bfloat16 encoder matmul).
    """
    if x_ND.ndim != 2 or weight_nD.ndim != 2 or indices_NM.ndim != 2:
        raise ValueError("gather_preacts expects x (N, D), weight (n, D), indices (N, M)")
    return _GatherPreacts.apply(x_ND, weight_nD, indices_NM, preacts_NM)
