"""explain(): batched W(x), contributions, bias and positional-embedding terms, completeness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bcos_layers
from bcos_layers import explain


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 0.5 + 0.01)
            if isinstance(m, nn.BatchNorm2d | nn.LayerNorm | nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        n: _randomize_norms(bcos_layers.create(n))
        for n in ["tiny_resnet", "tiny_resnet_bottleneck", "tiny_densenet", "tiny_vitc"]
    }


# module holding the pre-bias logits, and the per-sample value of classes k ([B] indices)
def _pick_pooled(f: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return f.flatten(2).mean(2).gather(1, k[:, None])[:, 0]


PRE_BIAS = {
    "tiny_resnet": ("avgpool", _pick_pooled),
    "tiny_resnet_bottleneck": ("avgpool", _pick_pooled),
    "tiny_densenet": ("classifier", _pick_pooled),
    "tiny_vitc": ("0", lambda f, k: f.gather(1, k[:, None])[:, 0]),
}


def _x(n: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 6, size, size, generator=torch.Generator().manual_seed(seed))


def _scale(ex: bcos_layers.Explanation) -> torch.Tensor:
    return ex.contributions.abs().flatten(1).sum(1).max()


@pytest.mark.parametrize(
    "name", ["tiny_resnet", "tiny_resnet_bottleneck", "tiny_densenet", "tiny_vitc"]
)
def test_logit_completeness_and_values(name: str, models: dict[str, nn.Module]) -> None:
    model = models[name]
    x = _x()
    x_before = x.clone()
    ex = explain(model, x)
    assert torch.equal(x, x_before) and x.grad is None and not x.requires_grad
    with torch.no_grad():
        logits = model(x)
    assert torch.equal(ex.target, logits.argmax(1))
    assert ex.weights.shape == x.shape == ex.contributions.shape
    assert ex.contribution_map.shape == (4, 32, 32)
    torch.testing.assert_close(ex.contribution_map, ex.contributions.sum(1))
    assert torch.allclose(ex.bias, torch.full((4,), -torch.log(torch.tensor(9.0)).item()))
    # value == logit (ViT: explanation mode changes LN round-off only)
    torch.testing.assert_close(
        ex.value, logits.gather(1, ex.target[:, None])[:, 0], rtol=0, atol=1e-5
    )
    assert ex.completeness_error.abs().max() <= 1e-5 * _scale(ex)
    if name == "tiny_vitc":
        assert ex.pos_emb.abs().min() > 1e-3  # the fixed embedding carries a real share
    else:
        assert torch.equal(ex.pos_emb, torch.zeros(4))
    # the same at full precision on the pre-bias logit (the biased one has coarse float32 steps)
    layer, pick = PRE_BIAS[name]
    pre = explain(model, x, layer=layer, fn=lambda f: pick(f, ex.target))
    torch.testing.assert_close(
        pre.weights, ex.weights, rtol=1e-4, atol=1e-6 * float(ex.weights.abs().max())
    )
    total = pre.contributions.flatten(1).sum(1) + pre.pos_emb
    assert (total - pre.value).abs().max() <= 1e-5 * pre.value.abs().max()


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_densenet"])
def test_cnn_dynamic_weights_are_scale_invariant(name: str, models: dict[str, nn.Module]) -> None:
    """B-cos CNNs without biases are homogeneous: W(αx) = W(x), contributions scale with α."""
    model = models[name]
    x = _x(2)
    a, b = explain(model, x, 3), explain(model, 2.5 * x, 3)
    # (up to the 1e-6 stabilizer inside the patch norms)
    tol = 1e-3 * float(a.weights.abs().max())
    torch.testing.assert_close(b.weights, a.weights, rtol=0, atol=tol)
    ctol = 1e-3 * float(a.contributions.abs().max())
    torch.testing.assert_close(b.contributions, 2.5 * a.contributions, rtol=0, atol=ctol)


def test_batched_equals_per_sample_and_targets(models: dict[str, nn.Module]) -> None:
    model = models["tiny_densenet"]
    x = _x(3)
    target = torch.tensor([2, 7, 0])
    ex = explain(model, x, target)
    assert torch.equal(ex.target, target)
    for i in range(3):
        one = explain(model, x[i : i + 1], int(target[i]))
        torch.testing.assert_close(one.weights[0], ex.weights[i], rtol=1e-5, atol=1e-8)
    assert torch.equal(explain(model, x, 4).target, torch.full((3,), 4))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        explain(model, x, 10)
    with pytest.raises(ValueError, match="shape"):
        explain(model, x, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer"):
        explain(model, x, torch.tensor([1.0, 2.0, 3.0]))


def test_explanation_differs_from_plain_gradient(models: dict[str, nn.Module]) -> None:
    """Explanation mode really detaches the dynamic factors (plain IxG has another distribution)."""
    model = models["tiny_resnet"]
    x = _x(1).requires_grad_(True)
    model(x)[0, 3].backward()
    ex = explain(model, x.detach(), 3)
    assert not torch.allclose(x.grad, ex.weights, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("tiny_resnet", "layer3"),
        ("tiny_densenet", "features.transition2"),
        ("tiny_vitc", "0.transformer.encoder_1"),
    ],
)
def test_intermediate_value_and_layer_contributions(
    name: str, layer: str, models: dict[str, nn.Module]
) -> None:
    model = models[name]
    x = _x(3)

    def fn(f: torch.Tensor) -> torch.Tensor:  # one channel summed over positions, per sample
        return f[:, 1].flatten(1).sum(1) if f.dim() == 4 else f[..., 1].sum(1)

    ex = explain(model, x, layer=layer, fn=fn)
    assert ex.output is None and ex.target is None  # the forward stopped at the layer
    assert torch.equal(ex.bias, torch.zeros(3))
    assert ex.completeness_error.abs().max() <= 1e-5 * _scale(ex)
    # value equals the layer output in a plain forward
    feats = {}
    h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: feats.update(f=o))
    with torch.no_grad():
        model(x)
    h.remove()
    torch.testing.assert_close(ex.value, fn(feats["f"]), rtol=1e-5, atol=1e-6)
    # contributions of the layer's features to a logit (layer-level completeness)
    lx = explain(model, x, 2, wrt=layer)
    assert lx.weights.shape == feats["f"].shape
    f = feats["f"]
    assert lx.contribution_map.shape == ((3, *f.shape[2:]) if f.dim() == 4 else f.shape[:2])
    assert torch.equal(lx.pos_emb, torch.zeros(3))
    assert lx.completeness_error.abs().max() <= 1e-5 * _scale(lx)


def test_vit_pos_emb_term_is_what_the_embedding_adds(models: dict[str, nn.Module]) -> None:
    """Oracle: with the embedding zeroed the ViT is complete at the input without any pe term,
    and the pe term equals pe ⊙ ∂value/∂(tokens) computed by hand."""
    model = models["tiny_vitc"]
    x = _x(2)
    ex = explain(model, x, 5)
    vit = model[0]
    pe_mod = vit.positional_embedding
    tokens = {}

    def keep_tokens(m, i, o):  # gradient w.r.t. the first encoder's input (= patches + pe)
        i[0].retain_grad()
        tokens["t"] = i[0]

    h = vit.transformer.encoder_0.register_forward_hook(keep_tokens)
    try:
        with model.explanation_mode():
            out = model(x.clone().requires_grad_(True))
            out[:, 5].sum().backward()
    finally:
        h.remove()
    with torch.no_grad():
        pe = pe_mod(torch.zeros(1, 4, 4, 32))
    by_hand = (pe * tokens["t"].grad).flatten(1).sum(1)
    torch.testing.assert_close(ex.pos_emb, by_hand, rtol=1e-5, atol=1e-6)
    # zero embedding -> no pe term, still complete
    orig_forward = pe_mod.forward
    pe_mod.forward = lambda patches: torch.zeros(
        patches.shape[1] * patches.shape[2], patches.shape[3]
    )
    try:
        ex0 = explain(model, x, 5)
    finally:
        pe_mod.forward = orig_forward
    assert ex0.pos_emb.abs().max() == 0
    assert ex0.completeness_error.abs().max() <= 1e-5 * _scale(ex0)


def test_custom_fn_on_logits_and_temperature() -> None:
    model = _randomize_norms(
        bcos_layers.create("tiny_resnet", logit_temperature=2.0, logit_bias=0.5)
    )
    x = _x(2)
    ex = explain(model, x, fn=lambda out: out[:, 1] - out[:, 2])  # a difference of logits
    assert torch.allclose(ex.bias, torch.zeros(2), atol=1e-7)  # the bias cancels
    assert ex.completeness_error.abs().max() <= 1e-5 * _scale(ex)
    ex1 = explain(model, x, 1)
    torch.testing.assert_close(ex1.bias, torch.full((2,), 0.5))
    assert ex1.completeness_error.abs().max() <= 1e-5 * _scale(ex1)


def test_explain_errors(models: dict[str, nn.Module]) -> None:
    model = models["tiny_resnet"]
    x = _x(2)
    with pytest.raises(ValueError, match="no module named 'layer9'"):
        explain(model, x, layer="layer9", fn=lambda f: f.sum((1, 2, 3)))
    with pytest.raises(ValueError, match="needs fn"):
        explain(model, x, layer="layer3")
    with pytest.raises(ValueError, match="one value per sample"):
        explain(model, x, fn=lambda out: out)
    with pytest.raises(ValueError, match="AddInverse"):
        explain(model, x[:, :3])
    model.train()
    try:
        with pytest.raises(ValueError, match=r"model\.eval\(\)"):
            explain(model, x)
    finally:
        model.eval()
    assert not any(m.is_in_explanation_mode for m in model.modules() if hasattr(m, "explaining"))


def test_model_method(models: dict[str, nn.Module]) -> None:
    model = models["tiny_densenet"]
    x = _x(2)
    a, b = model.explain(x, 1), explain(model, x, 1)
    assert torch.equal(a.weights, b.weights)


# ----------------------------------------------------------------- wrt= at in-place-updated outputs
@pytest.fixture(scope="module")
def long_bottleneck() -> nn.Module:
    """Like create("resnet50_long"): Bottleneck blocks with stochastic depth (identity in eval)."""
    torch.manual_seed(0)
    model = bcos_layers.create("tiny_resnet_bottleneck", stochastic_depth_prob=0.1)
    assert model.layer2[0].stochastic_depth is not None
    return _randomize_norms(model)


def _pre_bias_class3(f: torch.Tensor) -> torch.Tensor:
    return f[:, 3].flatten(1).mean(1)


def _outputs(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Each module's output as it returned it (copied inside the hook), in explanation mode."""
    mods = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [
        mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.detach().clone()))
        for n in names
    ]
    try:
        with torch.no_grad(), bcos_layers.explanation_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize(
    ("name", "norm"),
    [
        ("tiny_resnet", "layer2.0.bn2"),  # BasicBlock: out = bn2(...); out += shortcut
        ("long", "layer2.0.bn3"),  # Bottleneck
        ("long", "layer2.0.stochastic_depth"),  # returns bn3's tensor unchanged in eval
    ],
)
def test_wrt_last_norm_of_a_block_explains_that_norm_not_the_block(
    name: str, norm: str, models: dict[str, nn.Module], long_bottleneck: nn.Module
) -> None:
    model = long_bottleneck if name == "long" else models[name]
    x = _x(2)
    block = norm.rsplit(".", 1)[0]
    ref = _outputs(model, x, [norm, block, f"{block}.downsample"])
    assert (ref[norm] - ref[block]).abs().max() > 0.1 * ref[norm].abs().max()  # a real shortcut
    ex = explain(model, x, layer="avgpool", fn=_pre_bias_class3, wrt=norm)
    scale = float((ref[norm] * ex.weights).abs().max())
    # contributions / weights is the norm's output, not the block output
    torch.testing.assert_close(
        ex.contributions, ref[norm] * ex.weights, rtol=1e-5, atol=1e-6 * scale
    )
    assert not torch.allclose(ex.contributions, ref[block] * ex.weights, rtol=1e-2, atol=0.0)
    # completeness across the cut: norm + shortcut contributions == block contributions == value
    short = explain(model, x, layer="avgpool", fn=_pre_bias_class3, wrt=f"{block}.downsample")
    whole = explain(model, x, layer="avgpool", fn=_pre_bias_class3, wrt=block)
    vscale = float(whole.contributions.abs().flatten(1).sum(1).max())
    torch.testing.assert_close(
        ex.contributions + short.contributions, whole.contributions, rtol=1e-5, atol=1e-6 * scale
    )
    assert whole.completeness_error.abs().max() <= 1e-5 * vscale
    # what the norm's explanation misses is exactly the shortcut's share
    torch.testing.assert_close(
        ex.completeness_error, short.contributions.flatten(1).sum(1), rtol=1e-4, atol=1e-6 * vscale
    )
    assert ex.completeness_error.abs().max() > 1e-2 * vscale


def test_capture_output_keeps_the_module_output_and_its_gradient() -> None:
    """A hook with capture_output: later in-place ops hit the copy; d value / d captured is right."""
    lin = nn.Linear(4, 3, bias=False)
    a = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    c = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    store: dict[str, bcos_layers.CapturedOutput] = {}

    def hook(m: nn.Module, i: tuple[torch.Tensor, ...], o: torch.Tensor) -> torch.Tensor:
        store["f"] = bcos_layers.capture_output(o)
        return store["f"].passthrough

    h = lin.register_forward_hook(hook)
    try:
        x = a.clone().requires_grad_(True)
        out = lin(x)
        out += 10.0  # in place, like a residual block's `out += shortcut`
        out.mul_(2.0)
        value = (out * c).sum()
    finally:
        h.remove()
    cap = store["f"]
    cap.check_unmodified()
    torch.testing.assert_close(cap.tensor, a @ lin.weight.T)  # the module output, unmodified
    g_f, g_x = torch.autograd.grad(value, [cap.tensor, x])
    torch.testing.assert_close(g_f, 2.0 * c)  # d value / d (module output)
    torch.testing.assert_close(g_x, 2.0 * c @ lin.weight)  # still connected to the input


class _TapThenScaleInPlace(nn.Module):
    """``tap`` returns its input; the caller then scales that very tensor in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = bcos_layers.BcosLinear(6, 4)
        self.tap = nn.Identity()
        self.head = bcos_layers.BcosLinear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x.flatten(1)[:, :6])
        t = self.tap(h)
        h.mul_(2.0)  # writes into the tensor `tap` returned
        return self.head(t)


def test_wrt_output_modified_in_place_through_another_reference_is_refused() -> None:
    model = _TapThenScaleInPlace().eval()
    with pytest.raises(RuntimeError, match=r"output of module 'tap' was modified in place"):
        explain(model, _x(2), 1, wrt="tap")


class LogitLayer(nn.Module):  # same name and attributes as ours, another forward
    def __init__(self) -> None:
        super().__init__()
        self.logit_bias, self.logit_temperature = 1.5, None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return 2 * z + self.logit_bias


def test_a_foreign_layer_named_logitlayer_is_left_alone_with_a_warning() -> None:
    model = nn.Sequential(nn.Flatten(), bcos_layers.BcosLinear(6 * 4 * 4, 3), LogitLayer()).eval()
    x = _x(2, size=4)
    with pytest.warns(UserWarning, match="does not compute x / logit_temperature"):
        ex = explain(model, x, 1)
    with torch.no_grad():
        torch.testing.assert_close(ex.value, model(x)[:, 1])  # the output was not altered
    assert torch.equal(ex.bias, torch.zeros(2))
    torch.testing.assert_close(ex.completeness_error, torch.full((2,), 1.5))
