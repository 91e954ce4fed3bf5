"""Sparse forward/backward against dense autograd references (incl. the AuxK path)."""

from __future__ import annotations

import torch

from topk_sae import BiasFreeTopKSAE, gather_preacts, sparse_decode
from topk_sae.kernels import selected_outer_sum
from topk_sae.trainer import compute_loss


def _dense_decode(values: torch.Tensor, indices: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    dense = torch.zeros(values.shape[0], atoms.shape[0], dtype=values.dtype)
    dense = dense.scatter_add(1, indices, values)
    return dense @ atoms


def test_sparse_decode_forward_and_backward_match_dense() -> None:
    torch.manual_seed(0)
    atoms = torch.randn(30, 7, requires_grad=True)
    values = torch.randn(9, 4, requires_grad=True)
    indices = torch.randint(0, 30, (9, 4))
    grad_out = torch.randn(9, 7)
    ours = sparse_decode(values, indices, atoms)
    g_ours = torch.autograd.grad(ours, (values, atoms), grad_out)
    ref = _dense_decode(values, indices, atoms)
    g_ref = torch.autograd.grad(ref, (values, atoms), grad_out)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    # Only the selected atoms receive gradient.
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[indices.unique()] = False
    assert torch.equal(g_ours[1][untouched], torch.zeros_like(g_ours[1][untouched]))


def test_gather_preacts_grads_match_dense_with_duplicate_indices() -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 5, requires_grad=True)
    weight = torch.randn(20, 5, requires_grad=True)
    indices = torch.randint(0, 20, (6, 8))
    indices[:, 1] = indices[:, 0]  # duplicates (main and aux may select the same latent)
    grad = torch.randn(6, 8)
    ours = gather_preacts(x, weight, indices)
    ref = torch.gather(x @ weight.T, 1, indices)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(
        torch.autograd.grad(ours, (x, weight), grad),
        torch.autograd.grad(ref, (x, weight), grad, retain_graph=True),
    ):
        torch.testing.assert_close(a, b)
    # Precomputed values are passed through unchanged; gradients still flow.
    passed = gather_preacts(x, weight, indices, ref.detach())
    assert torch.equal(passed, ref.detach())
    torch.testing.assert_close(
        torch.autograd.grad(passed, weight, grad)[0], torch.autograd.grad(ref, weight, grad)[0]
    )


def test_selected_outer_sum_is_sparse_transpose_matmul() -> None:
    torch.manual_seed(2)
    grad, x = torch.randn(5, 3), torch.randn(5, 4)
    indices = torch.randint(0, 7, (5, 3))
    expected = torch.zeros(7, 4)
    for i in range(5):
        for j in range(3):
            expected[indices[i, j]] += grad[i, j] * x[i]
    torch.testing.assert_close(selected_outer_sum(grad, indices, x, 7), expected)


def _dense_reference_loss(
    model: BiasFreeTopKSAE,
    xs: torch.Tensor,
    k: int,
    dead: torch.Tensor,
    k_aux: int,
    coef: float,
) -> torch.Tensor:
    """Plain dense autograd: ReLU -> TopK scatter -> dense decode; AuxK over dead latents."""
    post = torch.relu(xs @ model.W_enc.T)
    top = post.topk(k, dim=1)
    code = torch.zeros_like(post).scatter(1, top.indices, top.values)
    recon = code @ model.W_dec
    mse = (recon - xs).pow(2).sum(1).mean()
    k_eff = min(k_aux, int(dead.sum()))
    if k_eff == 0:
        return mse
    masked = torch.where(dead[None], post, torch.full_like(post, -torch.inf))
    aux = masked.topk(k_eff, dim=1)
    aux_code = torch.zeros_like(post).scatter(1, aux.indices, aux.values)
    residual = (xs - recon).detach()
    aux_err = (aux_code @ model.W_dec - residual).pow(2).sum(1).mean()
    denom = (residual - residual.mean(0)).pow(2).sum(1).mean()
    return mse + coef * aux_err / denom


def _setup(seed: int = 3) -> tuple[BiasFreeTopKSAE, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = BiasFreeTopKSAE(10, 48, 4)
    with torch.no_grad():
        model.W_enc.add_(0.5 * torch.randn_like(model.W_enc))
    xs = torch.randn(32, 10) + 0.5
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True
    return model, xs, dead


def test_training_loss_gradients_match_dense_reference_including_auxk() -> None:
    model, xs, dead = _setup()
    ours = compute_loss(model, xs, k=4, dead_n=dead, k_aux=6, auxk_coef=0.5)
    assert ours.forward.aux_recon_ND is not None and float(ours.auxk.detach()) > 0
    g_ours = torch.autograd.grad(ours.total, (model.W_enc, model.W_dec))
    ref = _dense_reference_loss(model, xs, 4, dead, 6, 0.5)
    g_ref = torch.autograd.grad(ref, (model.W_enc, model.W_dec))
    torch.testing.assert_close(ours.total, ref)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_auxk_gradient_reaches_the_encoder_at_dead_latents() -> None:
    model, xs, dead = _setup(4)
    with_aux = compute_loss(model, xs, k=4, dead_n=dead, k_aux=6, auxk_coef=1.0)
    without = compute_loss(model, xs, k=4, dead_n=None, k_aux=6, auxk_coef=1.0)
    g_aux = torch.autograd.grad(with_aux.total - without.total, model.W_enc)[0]
    # The AuxK term alone moves encoder rows of dead latents, and only those.
    assert g_aux[dead].abs().sum() > 0
    assert torch.equal(g_aux[~dead], torch.zeros_like(g_aux[~dead]))
    ref_aux = _dense_reference_loss(model, xs, 4, dead, 6, 1.0) - _dense_reference_loss(
        model, xs, 4, torch.zeros_like(dead), 6, 1.0
    )
    torch.testing.assert_close(
        g_aux, torch.autograd.grad(ref_aux, model.W_enc)[0], rtol=1e-4, atol=1e-6
    )


def test_bf16_matmul_keeps_exact_float32_values() -> None:
    model, xs, _ = _setup(5)
    fwd = model.train_forward(xs, k=4, bf16=True)
    exact = torch.relu(torch.gather(xs @ model.W_enc.T, 1, fwd.indices_NK))
    torch.testing.assert_close(fwd.values_NK, exact)
    assert fwd.values_NK.dtype == torch.float32
