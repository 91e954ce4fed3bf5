"""Model properties: no bias, homogeneity, reconstruction as a sum of atoms, shapes."""

from __future__ import annotations

import pytest
import torch

from topk_sae import BiasFreeTopKSAE, SparseCode


def _model(d_in: int = 12, n_latents: int = 40, k: int = 5, scale: float = 2.5) -> BiasFreeTopKSAE:
    torch.manual_seed(0)
    model = BiasFreeTopKSAE(d_in, n_latents, k, input_scale=scale)
    with torch.no_grad():  # untie encoder and decoder so that the test sees both
        model.W_enc.add_(0.3 * torch.randn_like(model.W_enc))
    return model


def _reference_dense_code(model: BiasFreeTopKSAE, x: torch.Tensor) -> torch.Tensor:
    """Brute force: ReLU of every pre-activation, keep the k largest per row."""
    post = torch.relu(x.double() @ model.W_enc.detach().double().T / float(model.input_scale))
    out = torch.zeros_like(post)
    for i in range(post.shape[0]):
        order = sorted(range(post.shape[1]), key=lambda j: -float(post[i, j]))[: model.k]
        out[i, order] = post[i, order]
    return out.float()


def test_no_bias_anywhere() -> None:
    model = _model()
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert sorted(n for n, _ in model.named_parameters()) == ["W_dec", "W_enc"]
    assert not [n for n in names if "bias" in n.lower()]
    # Zero in, zero out: an affine term anywhere would break this.
    recon, code = model(torch.zeros(3, model.d_in))
    assert torch.equal(recon, torch.zeros_like(recon))
    assert torch.equal(code.values, torch.zeros_like(code.values))


def test_encode_matches_brute_force_relu_then_topk() -> None:
    model = _model()
    x = torch.randn(30, model.d_in)
    dense = model.encode(x, dense=True)
    torch.testing.assert_close(dense, _reference_dense_code(model, x), rtol=1e-5, atol=1e-6)
    code = model.encode(x)
    assert code.values.shape == code.indices.shape == (30, model.k)
    assert code.indices.dtype == torch.int64


@pytest.mark.parametrize("a", [2.0, 0.37, 13.0])
def test_positive_homogeneity(a: float) -> None:
    model = _model()
    x = torch.randn(25, model.d_in)
    dense, dense_scaled = model.encode(x, dense=True), model.encode(a * x, dense=True)
    if a == 2.0:  # a power of two scales floats exactly
        assert torch.equal(dense_scaled, a * dense)
    torch.testing.assert_close(dense_scaled, a * dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(a * x).recon, a * model(x).recon, rtol=1e-5, atol=1e-5)


def test_reconstruction_is_scaled_sum_of_active_atoms() -> None:
    model = _model(scale=3.0)
    x = torch.randn(10, model.d_in)
    recon, code = model(x)
    for i in range(10):
        expected = torch.zeros(model.d_in, dtype=torch.float64)
        for value, idx in zip(code.values[i].tolist(), code.indices[i].tolist()):
            expected += value * model.W_dec[idx].double()
        torch.testing.assert_close(recon[i].double(), 3.0 * expected, rtol=1e-5, atol=1e-5)


def test_input_scale_gives_codes_in_scaled_units_and_raw_reconstructions() -> None:
    model = _model(scale=1.0)
    scaled = _model(scale=4.0)
    x = torch.randn(8, model.d_in)
    torch.testing.assert_close(scaled.encode(x, dense=True), model.encode(x, dense=True) / 4.0)
    torch.testing.assert_close(scaled(x).recon, model(x).recon, rtol=1e-5, atol=1e-6)


def test_fewer_positive_preactivations_than_k_gives_selected_zeros() -> None:
    model = BiasFreeTopKSAE(3, 6, 4)
    with torch.no_grad():
        model.W_enc.copy_(
            torch.tensor([[1.0, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0], [0, 0, -1], [-1, -1, -1]])
        )
    code = model.encode(torch.tensor([[1.0, 2.0, 0.5]]))
    values = sorted(code.values[0].tolist(), reverse=True)
    assert values == [2.0, 1.0, 0.0, 0.0]
    assert code.values.shape == (1, 4)  # still k entries


def test_atoms_are_unit_norm_and_upkeep_helpers() -> None:
    model = _model()
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(model.n_latents))
    model.W_dec.grad = torch.randn_like(model.W_dec)
    model.remove_parallel_grad_()
    parallel = (model.W_dec.grad * model.W_dec).sum(dim=1)
    torch.testing.assert_close(parallel, torch.zeros_like(parallel), atol=1e-6, rtol=0)
    with torch.no_grad():
        model.W_dec.mul_(3.0)
    model.normalize_atoms_()
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(model.n_latents))


def test_maps_are_a_1x1_convolution() -> None:
    model = _model()
    x_BCHW = torch.randn(2, model.d_in, 3, 4)
    rows = x_BCHW.permute(0, 2, 3, 1).reshape(-1, model.d_in)
    code = model.encode_map(x_BCHW)
    assert code.values.shape == (2, model.k, 3, 4)
    dense_map = model.encode_map(x_BCHW, dense=True)
    assert dense_map.shape == (2, model.n_latents, 3, 4)
    torch.testing.assert_close(
        dense_map.permute(0, 2, 3, 1).reshape(-1, model.n_latents), model.encode(rows, dense=True)
    )
    recon = model.forward_map(x_BCHW).recon
    torch.testing.assert_close(
        recon, model(rows).recon.reshape(2, 3, 4, model.d_in).permute(0, 3, 1, 2)
    )


def test_tokens_match_rows() -> None:
    model = _model()
    x_BTD = torch.randn(2, 7, model.d_in)
    out = model.forward_tokens(x_BTD)
    assert out.recon.shape == x_BTD.shape and out.code.values.shape == (2, 7, model.k)
    torch.testing.assert_close(
        out.recon, model(x_BTD.reshape(-1, model.d_in)).recon.reshape(2, 7, -1)
    )
    assert model.encode_tokens(x_BTD, dense=True).shape == (2, 7, model.n_latents)


def test_shape_errors_are_clear() -> None:
    model = _model()
    with pytest.raises(ValueError, match="encode_tokens"):
        model.encode(torch.randn(2, 7, model.d_in))
    with pytest.raises(ValueError, match="encode_map"):
        model(torch.randn(2, model.d_in, 3, 3))
    with pytest.raises(ValueError, match="d_in=12"):
        model.encode(torch.randn(4, 11))
    with pytest.raises(ValueError, match="B, C=d_in"):
        model.encode_map(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="B, T, D"):
        model.encode_tokens(torch.randn(4, model.d_in))
    with pytest.raises(ValueError, match="decode_map"):
        model.decode(SparseCode(torch.ones(1, 2, 1, 1), torch.zeros(1, 2, 1, 1, dtype=torch.long)))
    with pytest.raises(TypeError, match="floating"):
        model.encode(torch.ones(2, model.d_in, dtype=torch.long))


@pytest.mark.parametrize(
    ("args", "match"),
    [((4, 8, 9), "k=9 must be <= n_latents=8"), ((0, 8, 2), "d_in"), ((4, 8, 0), "k must")],
)
def test_constructor_validation(args: tuple[int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BiasFreeTopKSAE(*args)


def test_sparse_code_to_dense() -> None:
    code = SparseCode(torch.tensor([[2.0, 3.0]]), torch.tensor([[4, 1]]))
    assert code.to_dense(5).tolist() == [[0.0, 3.0, 0.0, 0.0, 2.0]]


def test_input_gradient_matches_dense_autograd() -> None:
    """Attributions through the SAE (d recon / d x) use the sparse backward; check it densely."""
    model = _model(scale=2.0)
    x = torch.randn(9, model.d_in, requires_grad=True)
    weights = torch.randn(9, model.d_in)
    (grad_ours,) = torch.autograd.grad((model(x).recon * weights).sum(), x)
    xs = x / 2.0
    post = torch.relu(xs @ model.W_enc.T)
    top = post.topk(model.k, dim=1)
    code = torch.zeros_like(post).scatter(1, top.indices, top.values)
    (grad_ref,) = torch.autograd.grad(((code @ model.W_dec) * 2.0 * weights).sum(), x)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-5)
