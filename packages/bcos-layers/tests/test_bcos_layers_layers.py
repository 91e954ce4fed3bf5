"""B-cos layers and norms against dense, analytic references (no official library needed)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bcos_layers import (
    AddInverse,
    Attention,
    BatchNormUncentered2d,
    BcosConv2d,
    BcosLinear,
    DetachableLayerNorm,
    LayerNorm2d,
    LogitLayer,
    PosEmbSinCos2d,
    explanation_mode,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _conv_reference(
    layer: BcosConv2d, x: torch.Tensor, b: float, max_out: int, groups: int
) -> torch.Tensor:
    """Dense B-cos conv via unfold: per patch ``|cos|^(B-1) ŵᵀx`` with ``cos = ŵᵀx / ||x||``."""
    w = layer.linear.weight.double()
    k, s, p, d = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    n, c, h, wd = x.shape
    cols = F.unfold(x.double(), k, dilation=d, padding=p, stride=s)  # [N, C*kh*kw, L]
    oh = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (wd + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    cg = c // groups
    og = w.shape[0] // groups
    outs = []
    for g in range(groups):
        cg_cols = cols.view(n, c, k[0] * k[1], -1)[:, g * cg : (g + 1) * cg].reshape(n, -1, oh * ow)
        wg = w[g * og : (g + 1) * og].flatten(1)
        wg = wg / wg.norm(dim=1, keepdim=True)
        lin = torch.einsum("ok,nkl->nol", wg, cg_cols)
        norm = (cg_cols.pow(2).sum(1, keepdim=True) + 1e-6).sqrt()
        outs.append((lin, norm.expand_as(lin)))
    lin = torch.cat([o[0] for o in outs], 1)
    norm = torch.cat([o[1] for o in outs], 1)
    if max_out > 1:
        lin = lin.unflatten(1, (-1, max_out)).max(2).values
        norm = norm.unflatten(1, (-1, max_out))[:, :, 0]
    out = (lin / norm).abs().pow(b - 1) * lin if b != 2 else (lin / norm).abs() * lin
    return out.view(n, -1, oh, ow)


@pytest.mark.parametrize(
    ("k", "s", "p", "b", "max_out", "groups", "dil"),
    [(3, 1, 1, 2, 1, 1, 1), (7, 2, 3, 2, 1, 1, 1), (1, 2, 0, 2, 1, 1, 1), (1, 1, 0, 2, 1, 1, 1),
     (3, 2, 1, 2.5, 2, 1, 1), (3, 1, 1, 2, 1, 2, 1), (3, 1, 2, 2, 1, 1, 2),
     (3, 2, 2, 2, 2, 2, 2), (3, 1, 1, 2, 2, 2, 1)],
)  # fmt: skip
def test_bcos_conv_matches_dense_reference(k, s, p, b, max_out, groups, dil) -> None:
    torch.manual_seed(0)
    layer = BcosConv2d(4, 6, k, s, p, dilation=dil, groups=groups, b=b, max_out=max_out)
    x = torch.randn(2, 4, 9, 10, generator=_gen())
    ref = _conv_reference(layer, x, b, max_out, groups)
    out = layer(x)
    assert out.shape == ref.shape
    tol = 1e-4 if b != 2 else 1e-5  # b != 2 adds 1e-6 inside |cos|
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_bcos_conv_key_layout_and_no_bias() -> None:
    layer = BcosConv2d(6, 8, 3, padding=1, max_out=2)
    assert list(layer.state_dict()) == ["linear.weight"]
    assert layer.linear.weight.shape == (16, 6, 3, 3)
    with pytest.raises(ValueError, match="no bias"):
        BcosConv2d(6, 8, 3, bias=True)


def test_bcos_linear_matches_formula_and_explanation_gradient() -> None:
    torch.manual_seed(0)
    layer = BcosLinear(5, 3)
    x = torch.randn(4, 5, dtype=torch.float64, generator=_gen())
    layer.double()
    w_hat = layer.linear.weight / layer.linear.weight.norm(dim=1, keepdim=True)
    lin = x @ w_hat.T
    cos = lin / (x.norm(dim=1, keepdim=True) + 1e-12)
    torch.testing.assert_close(layer(x), cos.abs() * lin)
    # explanation mode: the Jacobian is the dynamic linear map |cos_o| ŵ_o (dynamic scale detached)
    xg = x[:1].clone().requires_grad_(True)
    with explanation_mode(layer):
        jac = torch.autograd.functional.jacobian(layer, xg)[0, :, 0]
    torch.testing.assert_close(jac, cos[0].abs()[:, None] * w_hat)
    # ... and differs from the plain gradient (which differentiates through |cos|)
    assert not torch.allclose(torch.autograd.functional.jacobian(layer, xg)[0, :, 0], jac)


def _dynamic_weight(
    layer: BcosConv2d, x: torch.Tensor, o: int, i: int, j: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """By hand: W(x) of output (o, i, j) of a 3x3/s1/p1 B-cos conv, and the plain gradient.

    W = |cos|^(B-1) ŵ on the patch (cos = ŵᵀp / ||p||, ŵ the winning MaxOut filter, with the
    1e-6 of the official op order), zero elsewhere. The plain gradient also differentiates
    |cos|^(B-1):  ∂out/∂p = |cos|^(B-1) ŵ + (B-1) |cos|^(B-2) sign(cos) lin ∂cos/∂p.
    """
    b, m = layer.b, layer.max_out
    xp = F.pad(x, (1, 1, 1, 1))[0, :, i : i + 3, j : j + 3]  # the patch (rows i-1..i+1)
    filters = layer.linear.weight.detach()[o * m : (o + 1) * m]
    w_hat = filters / filters.flatten(1).norm(dim=1)[:, None, None, None]
    lins = (w_hat * xp).flatten(1).sum(1)
    w_hat, lin = w_hat[lins.argmax()], lins.max()
    norm = (xp.pow(2).sum() + 1e-6).sqrt()
    cos = lin / norm
    a = cos.abs() + (1e-6 if b != 2 else 0.0)
    dcos = w_hat / norm - lin * xp / norm**3
    plain_patch = a ** (b - 1) * w_hat + (b - 1) * a ** (b - 2) * cos.sign() * lin * dcos
    out = []
    for patch in (a ** (b - 1) * w_hat, plain_patch):
        full = torch.zeros_like(F.pad(x, (1, 1, 1, 1)))
        full[0, :, i : i + 3, j : j + 3] = patch
        out.append(full[:, :, 1:-1, 1:-1])
    return out[0], out[1]


@pytest.mark.parametrize(("b", "max_out"), [(2.0, 1), (2.5, 2)])
def test_explanation_mode_gradient_is_the_detached_dynamic_weight(b: float, max_out: int) -> None:
    """In explanation mode ∂out/∂x is W(x) = |cos|^(B-1) ŵ (dynamic factor detached); with the
    mode off it is the full derivative, which differs. (Both satisfy ``(∂out/∂x · x).sum() ==
    out``, since the layer is positively homogeneous: that identity cannot tell them apart.)"""
    torch.manual_seed(0)
    layer = BcosConv2d(3, 2, 3, padding=1, b=b, max_out=max_out).double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64, generator=_gen())
    for o, i, j in [(1, 2, 3), (0, 0, 0), (1, 4, 1)]:  # interior, corner, edge (zero padding)
        w_expected, plain_expected = _dynamic_weight(layer, x, o, i, j)
        xg = x.clone().requires_grad_(True)
        with explanation_mode(layer):
            out = layer(xg)[0, o, i, j]
            (w,) = torch.autograd.grad(out, xg)
        torch.testing.assert_close(w, w_expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close((w * x).sum(), out.detach())  # dynamic linear: W(x) x
        (plain,) = torch.autograd.grad(layer(xg)[0, o, i, j], xg)
        torch.testing.assert_close(plain, plain_expected, rtol=1e-10, atol=1e-12)
        assert (plain - w).abs().max() > 1e-3 * w.abs().max()


def test_uncentered_batchnorm_eval_train_and_keys() -> None:
    bn = BatchNormUncentered2d(3)
    assert list(bn.state_dict()) == ["weight", "running_mean", "running_var", "num_batches_tracked"]
    assert bn.bias is None
    x = torch.randn(4, 3, 5, 5, generator=_gen()) + 2.0
    bn.train()
    out = bn(x)
    var = x.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(out, x / (var + 1e-5).sqrt()[None, :, None, None])
    torch.testing.assert_close(bn.running_var, 0.9 * torch.ones(3) + 0.1 * var)
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, torch.zeros(3))  # never used, never updated
    bn.eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    ref = bn.weight[None, :, None, None] * (x / (bn.running_var + 1e-5).sqrt()[None, :, None, None])
    assert torch.equal(bn(x), ref)
    # linear (no centering): bn(2x) == 2 bn(x)
    torch.testing.assert_close(bn(2 * x), 2 * bn(x))


def test_layernorm_explanation_mode_detaches_only_variance() -> None:
    torch.manual_seed(0)
    ln = DetachableLayerNorm(6).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    assert list(ln.state_dict()) == ["weight"]
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=_gen())
    with explanation_mode(ln):
        # the manual path gives the F.layer_norm values (up to round-off)
        torch.testing.assert_close(ln(x), F.layer_norm(x, (6,), ln.weight, None, 1e-5))
        xg = x[0, 0].clone().requires_grad_(True)
        jac = torch.autograd.functional.jacobian(ln, xg)
    std = (x[0, 0].var(unbiased=False) + 1e-5).sqrt()
    centering = torch.eye(6, dtype=torch.float64) - 1 / 6
    torch.testing.assert_close(jac, ln.weight.detach()[:, None] * centering / std)


def test_groupnorm_layer_norm_2d() -> None:
    torch.manual_seed(0)
    gn = LayerNorm2d(4).double()
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
    assert list(gn.state_dict()) == ["weight"]
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=_gen())
    ref = F.group_norm(x, 1, gn.weight, None, 1e-5)
    torch.testing.assert_close(gn(x), ref)
    with explanation_mode(gn):
        torch.testing.assert_close(gn(x), ref)
        xg = x[:1].clone().requires_grad_(True)
        out = gn(xg)
        g = torch.autograd.grad(out[0, 1, 1, 2], xg)[0]
    std = (x[0].var(unbiased=False) + 1e-5).sqrt()
    expected = -torch.ones_like(x[:1]) / x[0].numel()
    expected[0, 1, 1, 2] += 1
    torch.testing.assert_close(g, gn.weight[1].detach() * expected / std)


def test_add_inverse_and_logit_layer() -> None:
    x = torch.rand(2, 3, 4, 4, generator=_gen())
    y = AddInverse()(x)
    assert torch.equal(y, torch.cat([x, 1 - x], 1))
    assert torch.equal(AddInverse()(x[0]), torch.cat([x[0], 1 - x[0]], 0))  # unbatched [C, H, W]
    z = torch.randn(3, 5, generator=_gen())
    assert torch.equal(LogitLayer(logit_bias=-math.log(999))(z), z + -math.log(999))
    torch.testing.assert_close(LogitLayer(2.0, 1.0)(z), z / 2 + 1)
    assert torch.equal(LogitLayer()(z), z)


def test_sincos_positional_embedding_brute_force() -> None:
    h, w, d = 3, 4, 8
    pe = PosEmbSinCos2d()(torch.zeros(1, h, w, d))
    assert pe.shape == (h * w, d)
    q = d // 4
    for i in range(h):
        for j in range(w):
            for k in range(q):
                om = 1.0 / 10000 ** (k / (q - 1))
                row = pe[i * w + j]
                expected = [math.sin(j * om), math.cos(j * om), math.sin(i * om), math.cos(i * om)]
                got = [row[k], row[q + k], row[2 * q + k], row[3 * q + k]]
                for e, g in zip(expected, got):
                    assert abs(float(g) - e) < 1e-6
    with pytest.raises(ValueError, match="divisible by 4"):
        PosEmbSinCos2d()(torch.zeros(1, 2, 2, 6))


def test_attention_matches_dense_reference_and_detaches_qk() -> None:
    torch.manual_seed(0)
    att = Attention(8, heads=2, dim_head=4).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=_gen())
    xn = F.layer_norm(x, (8,), att.norm.weight, None, 1e-5)
    q, k, v = (xn @ att.to_qkv.weight.T).chunk(3, -1)
    outs = []
    for hd in range(2):
        sl = slice(4 * hd, 4 * hd + 4)
        a = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / 2.0, -1)
        outs.append(a @ v[..., sl])
    ref = att.to_out(torch.cat(outs, -1))
    torch.testing.assert_close(att(x), ref)
    assert list(att.state_dict()) == ["norm.weight", "to_qkv.weight", "to_out.linear.weight"]
    # explanation mode: output is linear in the token values given the attention pattern
    xg = x[:1].clone().requires_grad_(True)
    with explanation_mode(att):
        out = att(xg)
        g = torch.autograd.grad(out[0, 2, 3], xg)[0]
    torch.testing.assert_close((g * x[:1]).sum(), out[0, 2, 3].detach())


@pytest.mark.parametrize("b", [2, 2.5])
def test_inference_path_is_bitwise_equal_to_autograd_path(b: float) -> None:
    """Under no_grad the layers compute in place; values must not change by a single bit."""
    torch.manual_seed(0)
    conv1 = BcosConv2d(4, 6, 1, b=b)
    conv3 = BcosConv2d(4, 6, 3, 2, 1, b=b, max_out=2)
    lin = BcosLinear(4, 5, b=b)
    bn = BatchNormUncentered2d(4).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 4, 9, 9, generator=_gen())
    xv = torch.randn(3, 7, 4, generator=_gen())
    for layer, inp in [(conv1, x), (conv3, x), (lin, xv), (bn, x)]:
        with_grad = layer(inp)
        assert with_grad.requires_grad or isinstance(layer, BatchNormUncentered2d)
        with torch.no_grad():
            assert torch.equal(layer(inp), with_grad)
        with torch.inference_mode():
            assert torch.equal(layer(inp), with_grad)
