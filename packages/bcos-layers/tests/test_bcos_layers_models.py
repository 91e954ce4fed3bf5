"""Model zoo: official key layouts, shapes at the FaCT hook points, registry, strict loading,
input validation."""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import bcos_layers
from bcos_layers.models import PretrainedCfg, create, list_models
from bcos_layers.pretrained import OFFICIAL_CHECKPOINTS, convert_to_safetensors

# state-dict key lists of the official models (name<TAB>shape<TAB>dtype), from bcos 0.1.3
REF_DIR = Path(__file__).parent / "data"
REF_LISTS = {
    "resnet50": "resnet50",
    "resnet50_long": "resnet50",
    "densenet121": "densenet121",
    "densenet121_long": "densenet121",
    "vitc_s_patch1_14": "vitc_s",
}


@functools.cache
def _meta(name: str) -> nn.Module:
    """Build on the meta device (cached): shapes and keys without real weights."""
    with torch.device("meta"):
        model = create(name)
    model.validate_inputs = False
    return model


def _key_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("name", sorted(REF_LISTS))
def test_keys_and_shapes_equal_reference_lists(name: str) -> None:
    path = REF_DIR / f"bcos-v2-keys-{REF_LISTS[name]}.txt"
    expected = []
    for line in path.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        expected.append(
            (key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
        )
    model = _meta(name)
    got = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    assert got == expected


_HYPER = ("kernel_size", "stride", "padding", "dilation", "groups", "in_channels", "out_channels",
          "in_features", "out_features", "b", "max_out", "eps", "normalized_shape", "num_groups",
          "p", "mode", "output_size", "ceil_mode", "count_include_pad", "temperature", "heads",
          "scale", "logit_bias", "logit_temperature", "drop_rate")  # fmt: skip


def _hyperparameters(model: nn.Module) -> dict[str, dict[str, object]]:
    """Per module name: its hyperparameters (ints as pairs where the other side uses tuples)."""
    out = {}
    for name, m in model.named_modules():
        hp = {}
        for a in _HYPER:
            v = getattr(m, a, None)
            if v is None or callable(v):
                continue
            if a in ("kernel_size", "stride", "padding", "dilation") and isinstance(v, int):
                v = (v, v)
            hp[a] = v
        out[name] = hp
    return out


@pytest.mark.parametrize("name", sorted(OFFICIAL_CHECKPOINTS))
def test_every_official_model_has_the_official_structure(name: str, bcos_oracle) -> None:
    """Against the official entrypoint (both on the meta device): the same module tree, state-
    dict keys and shapes, and per module the same hyperparameters (kernel sizes, strides,
    paddings, groups, B, MaxOut, norm eps, stochastic-depth rates, logit bias, ...)."""
    pretrained = bcos_oracle("bcos.models.pretrained")
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        ref = getattr(pretrained, name)(pretrained=False)
    ours = _meta(name)
    assert _key_shapes(ours) == _key_shapes(ref)
    ho, hr = _hyperparameters(ours), _hyperparameters(ref)
    assert list(ho) == list(hr)  # same module names in the same order
    for module in ho:
        common = ho[module].keys() & hr[module].keys()
        assert {a: ho[module][a] for a in common} == {a: hr[module][a] for a in common}, module
    stochastic = [m.p for m in ours.modules() if type(m).__name__ == "StochasticDepth"]
    if name in ("resnet50_long", "resnet152_long"):  # 0.1, growing linearly over the blocks
        assert max(stochastic) == pytest.approx(0.1)
    else:
        assert not stochastic


@pytest.mark.parametrize(
    ("name", "layer", "shape"),
    [
        ("resnet50", "layer2", (2, 512, 28, 28)),
        ("resnet50", "layer3", (2, 1024, 14, 14)),
        ("resnet50", "layer4", (2, 2048, 7, 7)),
        ("resnet50", "fc", (2, 1000, 7, 7)),
        ("densenet121", "features.transition2", (2, 256, 14, 14)),
        ("densenet121", "features.transition3", (2, 512, 7, 7)),
        ("densenet121", "features.norm5", (2, 1024, 7, 7)),
        ("vitc_s_patch1_14", "0.to_patch_embedding", (2, 14, 14, 384)),
        ("vitc_s_patch1_14", "0.transformer.encoder_8", (2, 196, 384)),
        ("vitc_s_patch1_14", "0.linear_head", (2, 1000)),
    ],
)
def test_shapes_at_fact_hook_points_for_224(name: str, layer: str, shape: tuple) -> None:
    model = _meta(name)
    seen = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: seen.update(o=o))
    try:
        out = model(torch.empty(2, 6, 224, 224, device="meta"))
    finally:
        handle.remove()
    assert out.shape == (2, 1000)
    assert tuple(seen["o"].shape) == shape


def test_parameter_counts() -> None:
    counts = {"resnet50": 25_538_880, "densenet121": 7_945_440, "vitc_s_patch1_14": 20_878_704}
    for name, n in counts.items():
        assert sum(p.numel() for p in _meta(name).parameters()) == n


def test_registry_and_pretrained_cfg() -> None:
    names = list_models()
    for required in [
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet50_long",
        "densenet121", "densenet121_long", "vitc_s_patch1_14",
        "tiny_resnet", "tiny_densenet", "tiny_vitc",
    ]:  # fmt: skip
        assert required in names
    m = _meta("resnet50_long")
    assert m.pretrained_cfg == PretrainedCfg("resnet50_long", 232, 224, None)
    assert _meta("densenet121").pretrained_cfg.resize_size == 256
    # the long ResNet has stochastic depth (parameter-free), growing linearly over the blocks
    sd = [b.stochastic_depth for layer in (m.layer1, m.layer4) for b in layer]
    assert sd[0] is None and math.isclose(sd[-1].p, 0.1)
    assert not m.training
    with pytest.raises(ValueError, match=r"unknown model 'resnet51'.*resnet50"):
        create("resnet51")
    with pytest.raises(ValueError, match="no official checkpoint for 'tiny_resnet'"):
        create("tiny_resnet", pretrained=True)


@pytest.mark.parametrize(
    "name", ["tiny_resnet", "tiny_resnet_bottleneck", "tiny_densenet", "tiny_vitc"]
)
def test_tiny_models_run_and_train(name: str) -> None:
    model = create(name).train()
    x = torch.rand(3, 6, 32, 32, generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (3, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    bias = model.logit_layer.logit_bias if hasattr(model, "logit_layer") else model[1].logit_bias
    assert math.isclose(bias, -math.log(9))


def test_pretrained_from_local_files_loads_strictly(tmp_path: Path) -> None:
    src = create("tiny_resnet")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    state = src.state_dict()
    pth = tmp_path / "tiny.pth"
    torch.save(state, pth)
    st = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, st)
    x = torch.rand(2, 6, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = src(x)
        converted = convert_to_safetensors(
            pth, tmp_path / "converted", arch="tiny_resnet", check_hash=False
        )
        for f in (pth, st, converted):
            model = create("tiny_resnet", pretrained=f)
            assert torch.equal(model(x), expected)
            assert model.pretrained_cfg.source == str(f)


def test_wrong_architecture_checkpoint_is_rejected_and_nothing_loaded(tmp_path: Path) -> None:
    other = create("tiny_densenet").state_dict()
    bad = tmp_path / "densenet.pth"
    torch.save(other, bad)
    with pytest.raises(ValueError, match=r"(?s)densenet\.pth.*missing keys.*unexpected keys"):
        create("tiny_resnet", pretrained=bad)
    # shape mismatch only: same keys, other widths -> nothing is copied
    model = create("tiny_resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = create("tiny_resnet", num_classes=7).state_dict()
    with pytest.raises(ValueError, match=r"shape mismatches \(1\).*fc\.linear\.weight"):
        bcos_layers.models.load_state_dict_strict(model, wrong, source="test")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError):
        create("tiny_resnet", pretrained=tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, nn.Module]:
    return {n: create(n) for n in ["tiny_resnet", "tiny_densenet", "tiny_vitc"]}


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_densenet", "tiny_vitc"])
def test_bad_inputs_get_clear_errors(name: str, tiny_models: dict[str, nn.Module]) -> None:
    model = tiny_models[name]
    good = torch.rand(1, 6, 32, 32)
    with pytest.raises(ValueError, match="AddInverse"):
        model(good[:, :3])
    with pytest.raises(TypeError, match="floating-point"):
        model((good * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="float64"):
        model(good.double())
    for bad_value in (float("nan"), float("inf")):
        x = good.clone()
        x[0, 1, 2, 3] = bad_value
        with pytest.raises(ValueError, match="NaN or Inf"):
            model(x)
    with pytest.raises(ValueError, match=r"4D batch.*x\[None\]"):
        model(good[0])
    with pytest.raises(ValueError, match="input channels"):
        model(torch.rand(1, 5, 32, 32))


def test_finite_inputs_whose_sum_overflows_are_accepted() -> None:
    """The NaN/Inf check looks at elements: a float16 224x224 batch sums to more than 65,504
    (its float16 sum is inf), a float32 batch of 1e35 to more than 3.4e38; both are finite."""
    model = create("tiny_resnet").half()
    x = torch.rand(1, 6, 224, 224, generator=torch.Generator().manual_seed(0)).half()
    assert torch.isinf(x.sum())  # what the old check looked at
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    big = torch.full((1, 6, 32, 32), 1e35)
    assert torch.isinf(big.sum())
    bcos_layers.models.check_image_batch(big, in_chans=6, dtype=torch.float32)
    for bad in (float("nan"), float("inf"), -float("inf")):  # single bad elements still caught
        y = x.clone()
        y[0, 5, 223, 0] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            model(y)


def test_vit_rejects_sizes_its_stem_cannot_tokenize(tiny_models: dict[str, nn.Module]) -> None:
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny_models["tiny_vitc"](torch.rand(1, 6, 30, 32))
    vit = _meta("vitc_s_patch1_14")
    vit.validate_inputs = True
    try:
        assert vit[0].validate_inputs
        with pytest.raises(ValueError, match=r"divisible by 16.*224x224"):
            vit(torch.empty(1, 6, 200, 224, device="meta"))
    finally:
        vit.validate_inputs = False


def test_validation_can_be_switched_off(tiny_models: dict[str, nn.Module]) -> None:
    model = tiny_models["tiny_resnet"]
    model.validate_inputs = False
    try:
        x = torch.rand(1, 6, 32, 32)
        x[0, 0, 0, 0] = float("nan")
        assert torch.isnan(model(x)).any()
    finally:
        model.validate_inputs = True


def _logit_biases(model: nn.Module) -> list[float | None]:
    return [m.logit_bias for m in model.modules() if type(m).__name__ == "LogitLayer"]


# one per builder: ResNet, ResNet with stochastic depth, DenseNet, ViTc, Simple ViT
@pytest.mark.parametrize(
    "name",
    ["resnet18", "resnet50_long", "densenet121", "vitc_ti_patch1_14", "simple_vit_ti_patch16_224"],
)
def test_logit_bias_for_other_class_counts_and_the_official_rule(name: str, bcos_oracle) -> None:
    """num_classes=10: ours -log(9) by default, the official entrypoint -log(999);
    official_logit_bias=True reproduces the official model (same bias, same keys and shapes)."""
    pretrained = bcos_oracle("bcos.models.pretrained")
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        ref = getattr(pretrained, name)(pretrained=False, num_classes=10)
        official = create(name, num_classes=10, official_logit_bias=True)
        default = create(name, num_classes=10)
        zero = create(name, num_classes=10, logit_bias=0.0)
    assert _logit_biases(ref) == [-math.log(999)] == [bcos_layers.models.OFFICIAL_LOGIT_BIAS]
    assert _logit_biases(official) == _logit_biases(ref)
    assert _key_shapes(official) == _key_shapes(ref)
    assert _logit_biases(default) == [-math.log(9)]
    assert _logit_biases(zero) == [0.0]


def test_official_logit_bias_refusals() -> None:
    with pytest.raises(ValueError, match=r"'tiny_resnet' has no official counterpart"):
        create("tiny_resnet", official_logit_bias=True)
    with pytest.raises(ValueError, match=r"either official_logit_bias=True or logit_bias="):
        create("resnet18", official_logit_bias=True, logit_bias=-1.0)
