"""LoftUp: official state-dict layout, strict loading, parity with a plain reference, chunking."""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from c2score.features import (
    LoftUpCheckpointError,
    LoftUpUpsampler,
    LoftUpWithChannelNorm,
    imagenet_normalize,
    load_loftup,
    read_state_dict,
)

# --------------------------------------------------------------------------------------------
# Independent reference, written from the architecture description in
# shared/reference/loftup-dinov2.md section 3: plain code, full attention through
# nn.MultiheadAttention (batch_first=False), no chunking, manual channels-first LayerNorm.
# --------------------------------------------------------------------------------------------


class RefChannelNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RefLayerNorm2d(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = ((x - mean) ** 2).mean(1, keepdim=True)
        y = (x - mean) / torch.sqrt(var + 1e-6)
        return self.weight[:, None, None] * y + self.bias[:, None, None]


class RefMinMax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        flat = x.permute(1, 0, 2, 3).reshape(c, -1)
        lo = flat.min(dim=-1).values.reshape(1, c, 1, 1)
        scale = flat.max(dim=-1).values.reshape(1, c, 1, 1) - lo
        return (x - lo) / scale.clamp_min(1e-4) - 0.5


class RefImplicit(nn.Module):
    def __init__(self, color: bool, n_freqs: int) -> None:
        super().__init__()
        self.color, self.n = color, n_freqs
        self.c = 5 if color else 2
        self.biases = nn.Parameter(torch.randn(2, self.c, n_freqs))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b, _, h, w = img.shape
        gh = torch.linspace(-1, 1, h, dtype=img.dtype)
        gw = torch.linspace(-1, 1, w, dtype=img.dtype)
        rr, cc = torch.meshgrid(gh, gw, indexing="ij")
        feats = torch.stack([rr, cc])[None].repeat(b, 1, 1, 1)
        if self.color:
            feats = torch.cat([feats, img], 1)
        feats = feats.unsqueeze(1)
        freqs = torch.exp(torch.linspace(-2, 10, self.n, dtype=img.dtype)).reshape(
            1, self.n, 1, 1, 1
        )
        feats = feats * freqs
        sin_feats = feats + self.biases[0].reshape(1, self.n, self.c, 1, 1)
        cos_feats = feats + self.biases[1].reshape(1, self.n, self.c, 1, 1)
        sin_feats = sin_feats.reshape(b, self.n * self.c, h, w)
        cos_feats = cos_feats.reshape(b, self.n * self.c, h, w)
        out = [torch.sin(sin_feats), torch.cos(cos_feats)]
        if self.color:
            out.append(img)
        return torch.cat(out, 1)


class RefCrossAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(d)
        self.norm_kv = nn.LayerNorm(d)
        self.attention = nn.MultiheadAttention(d, num_heads=heads, dropout=0.0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self.norm_q(q), self.norm_kv(k), self.norm_kv(v)
        out, _ = self.attention(q.permute(1, 0, 2), k.permute(1, 0, 2), v.permute(1, 0, 2))
        return out.permute(1, 0, 2)


class RefFeedForward(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d),
            nn.Linear(d, hidden),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.Linear(hidden, d),
            nn.Dropout(0.0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RefCATransformer(nn.Module):
    def __init__(self, d: int, depth: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList(
            nn.ModuleList([RefCrossAttention(d, heads), RefFeedForward(d, mlp_dim)])
            for _ in range(depth)
        )

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            q = attn(q, kv, kv) + q
            q = ff(q) + q
        return self.norm(q)


class RefLoftUp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        c = dim + 20
        self.lr_pe = RefImplicit(color=False, n_freqs=5)
        self.fourier_feat = nn.Sequential(RefMinMax(), RefImplicit(color=True, n_freqs=20))
        self.first_conv = nn.Sequential(
            RefChannelNorm(203),
            nn.Conv2d(203, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
        )
        self.final_conv = nn.Sequential(nn.Conv2d(c, dim, 1), RefLayerNorm2d(dim))
        self.ca_transformer = RefCATransformer(c, depth=2, heads=4, mlp_dim=dim)

    def forward(self, lr: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        x = self.first_conv(self.fourier_feat(img))
        b, c, h, w = x.shape
        q = x.flatten(2).permute(0, 2, 1)
        kv = torch.cat([lr, self.lr_pe(lr)], 1).flatten(2).permute(0, 2, 1)
        x = self.ca_transformer(q, kv)
        return self.final_conv(x.permute(0, 2, 1).reshape(b, c, h, w))


class RefWrapper(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.upsampler = RefLoftUp(dim)
        self.channelnorm = RefChannelNorm(dim)

    def forward(self, lr: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return self.upsampler(self.channelnorm(lr), img)


# --------------------------------------------------------------------------------------------
# The official key list for dim 384 (C' = 404), transcribed from the reference document.
# --------------------------------------------------------------------------------------------


def official_shapes(dim: int = 384) -> dict[str, tuple[int, ...]]:
    c = dim + 20
    s: dict[str, tuple[int, ...]] = {
        "upsampler.lr_pe.biases": (2, 2, 5),
        "upsampler.fourier_feat.1.biases": (2, 5, 20),
        "upsampler.first_conv.0.norm.weight": (203,),
        "upsampler.first_conv.0.norm.bias": (203,),
        "upsampler.first_conv.1.weight": (c, 203, 3, 3),
        "upsampler.first_conv.1.bias": (c,),
        "upsampler.first_conv.4.weight": (c, c, 3, 3),
        "upsampler.first_conv.4.bias": (c,),
        "upsampler.ca_transformer.norm.weight": (c,),
        "upsampler.ca_transformer.norm.bias": (c,),
        "upsampler.final_conv.0.weight": (dim, c, 1, 1),
        "upsampler.final_conv.0.bias": (dim,),
        "upsampler.final_conv.1.weight": (dim,),
        "upsampler.final_conv.1.bias": (dim,),
        "channelnorm.norm.weight": (dim,),
        "channelnorm.norm.bias": (dim,),
    }
    for bn in ("2", "5"):
        for name in ("weight", "bias", "running_mean", "running_var"):
            s[f"upsampler.first_conv.{bn}.{name}"] = (c,)
        s[f"upsampler.first_conv.{bn}.num_batches_tracked"] = ()
    for layer in ("0", "1"):
        p = f"upsampler.ca_transformer.layers.{layer}"
        for norm in ("norm_q", "norm_kv"):
            s[f"{p}.0.{norm}.weight"] = (c,)
            s[f"{p}.0.{norm}.bias"] = (c,)
        s[f"{p}.0.attention.in_proj_weight"] = (3 * c, c)
        s[f"{p}.0.attention.in_proj_bias"] = (3 * c,)
        s[f"{p}.0.attention.out_proj.weight"] = (c, c)
        s[f"{p}.0.attention.out_proj.bias"] = (c,)
        s[f"{p}.1.net.0.weight"] = (c,)
        s[f"{p}.1.net.0.bias"] = (c,)
        s[f"{p}.1.net.1.weight"] = (dim, c)
        s[f"{p}.1.net.1.bias"] = (dim,)
        s[f"{p}.1.net.4.weight"] = (c, dim)
        s[f"{p}.1.net.4.bias"] = (c,)
    return s


def random_state_dict(dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random (LayerNorm gains, BN statistics too) so that parity means something."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in official_shapes(dim).items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith(("norm.weight", "norm_q.weight", "norm_kv.weight", "net.0.weight")) or (
            key.endswith(".weight") and len(shape) == 1
        ):
            out[key] = 1 + 0.3 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 4
            out[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return out


DIM = 32  # C' = 52, divisible by 4 heads


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return random_state_dict(DIM)


@pytest.fixture(scope="module")
def reference(state_dict: dict[str, torch.Tensor]) -> RefWrapper:
    ref = RefWrapper(DIM)
    ref.load_state_dict(state_dict, strict=True)
    return ref.eval()


@pytest.fixture
def weights_file(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "pytorch_model.bin"
    torch.save(state_dict, path)
    return path


def inputs(batch: int = 2, hw: tuple[int, int] = (28, 28), grid: tuple[int, int] = (2, 2)):
    gen = torch.Generator().manual_seed(1)
    lr = torch.randn(batch, DIM, *grid, generator=gen) * 3 + 1
    images = torch.rand(batch, 3, *hw, generator=gen)
    return lr, images


def test_full_size_module_has_exactly_the_official_keys_and_shapes() -> None:
    with torch.device("meta"):
        model = LoftUpWithChannelNorm(384)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_shapes(384)
    assert len(got) == 54
    keys = list(got)
    assert all(k.startswith("upsampler.") for k in keys[:52])
    assert keys[52:] == ["channelnorm.norm.weight", "channelnorm.norm.bias"]
    assert sum(p.numel() for p in model.parameters()) == 4_303_894
    with torch.device("meta"):
        big = LoftUpWithChannelNorm(768)
    assert sum(p.numel() for p in big.parameters()) == 15_051_286


def test_reference_in_this_file_has_the_same_layout() -> None:
    ref = RefWrapper(DIM).state_dict()
    assert {k: tuple(v.shape) for k, v in ref.items()} == official_shapes(DIM)
    assert list(LoftUpWithChannelNorm(DIM).state_dict()) == list(ref)  # same order, too


def test_loads_strictly_from_file_and_directory(weights_file: Path, state_dict) -> None:
    for source in (weights_file, weights_file.parent, str(weights_file)):
        model = load_loftup(source)
        assert model.dim == DIM and not model.training
        for k, v in model.state_dict().items():
            assert torch.equal(v, state_dict[k]), k


def test_loads_from_hub_cache_offline(tmp_path: Path, weights_file: Path) -> None:
    """``hf_hub_download`` path: repo id + revision resolved in a (fake, offline) Hub cache."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--loftup-tiny"
    for d in ("blobs", "refs", f"snapshots/{commit}"):
        (repo / d).mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    # huggingface_hub's layout: the snapshot file is a relative link to its content-named blob
    blob = repo / "blobs" / hashlib.sha256(weights_file.read_bytes()).hexdigest()
    shutil.copy(weights_file, blob)
    (repo / "snapshots" / commit / "pytorch_model.bin").symlink_to(f"../../blobs/{blob.name}")
    kwargs = {"cache_dir": tmp_path / "cache", "local_files_only": True}
    up = LoftUpUpsampler.from_pretrained("someone/loftup-tiny", **kwargs)
    assert up.dim == DIM
    up = LoftUpUpsampler.from_pretrained("someone/loftup-tiny", revision=commit, **kwargs)
    assert up.dim == DIM
    for repo, revision in (("someone/not-there", None), ("someone/loftup-tiny", "f" * 40)):
        with pytest.raises(Exception, match=r"(?i)cache|offline|local|not found"):
            load_loftup(repo, revision=revision, **kwargs)


def test_parity_with_reference_batchwide_float64(reference: RefWrapper, state_dict) -> None:
    """Same random weights: our model (SDPA, chunked) equals the plain reference on a batch."""
    ours = LoftUpWithChannelNorm.from_state_dict(state_dict).double()
    ref = RefWrapper(DIM).double()
    ref.load_state_dict(reference.state_dict())
    ref.eval()
    lr, images = inputs(batch=2, hw=(28, 30), grid=(2, 3))
    guidance = imagenet_normalize(images).double()
    with torch.no_grad():
        expected = ref(lr.double(), guidance)
        got = ours(lr.double(), guidance, query_chunk_size=97)
    assert got.shape == (2, DIM, 28, 30)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_parity_float32_through_the_upsampler(reference: RefWrapper, weights_file: Path) -> None:
    """The [0, 1]-image adapter with per_image=False equals the reference on normalised images."""
    up = LoftUpUpsampler.from_pretrained(weights_file, per_image=False, query_chunk_size=200)
    lr, images = inputs(batch=2)
    with torch.no_grad():
        expected = reference(lr, imagenet_normalize(images))
    torch.testing.assert_close(up(lr, images), expected, rtol=1e-4, atol=1e-4)


def test_chunked_equals_unchunked(state_dict) -> None:
    model = LoftUpWithChannelNorm.from_state_dict(state_dict)
    lr, images = inputs(batch=2, hw=(20, 23))
    guidance = imagenet_normalize(images)
    with torch.no_grad():
        full = model(lr, guidance, query_chunk_size=None)
        for chunk in (1, 37, 460, 10_000):
            torch.testing.assert_close(
                model(lr, guidance, query_chunk_size=chunk), full, rtol=1e-5, atol=1e-5
            )


def test_per_image_is_independent_of_batching(reference: RefWrapper, weights_file: Path) -> None:
    lr, images = inputs(batch=3)
    images[1] *= 0.3  # a dark image: the batch-wide min-max would change the others' scaling
    per_image = LoftUpUpsampler.from_pretrained(weights_file)
    got = per_image(lr, images)
    with torch.no_grad():
        alone = torch.cat(
            [reference(lr[i : i + 1], imagenet_normalize(images[i : i + 1])) for i in range(3)]
        )
        batched = reference(lr, imagenet_normalize(images))
    torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-4)
    # The reference's batch-wide scaling really differs, so the test above is not vacuous.
    assert (batched - alone).abs().max() > 1e-2


def test_output_size_follows_the_guidance(weights_file: Path) -> None:
    up = LoftUpUpsampler.from_pretrained(weights_file)
    lr, _ = inputs(batch=1, grid=(3, 2))
    assert up(lr, torch.rand(1, 3, 17, 9)).shape == (1, DIM, 17, 9)


def test_wrong_keys_give_a_clear_error(tmp_path: Path, state_dict) -> None:
    bad = dict(state_dict)
    bad["upsampler.first_conv.9.weight"] = bad.pop("upsampler.first_conv.4.weight")
    torch.save(bad, tmp_path / "renamed.bin")
    with pytest.raises(LoftUpCheckpointError, match=r"missing.*first_conv\.4\.weight") as err:
        load_loftup(tmp_path / "renamed.bin")
    assert "first_conv.9.weight" in str(err.value)

    inner = {k.removeprefix("upsampler."): v for k, v in state_dict.items()}
    torch.save(inner, tmp_path / "no_prefix.bin")
    with pytest.raises(LoftUpCheckpointError, match="channelnorm"):
        load_loftup(tmp_path / "no_prefix.bin")

    torch.save({"model": state_dict}, tmp_path / "nested.bin")
    with pytest.raises(LoftUpCheckpointError, match="flat dict of tensors"):
        load_loftup(tmp_path / "nested.bin")


def _training_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The training module's keys (upstream ``load_loftup_checkpoint`` reads them): the
    upsampler under ``upsampler.``, the channel norm as ``model.1.`` (``model.0`` is the frozen
    backbone, whose weights the checkpoint holds too)."""
    out = {}
    for k, v in state_dict.items():
        out[k.replace("channelnorm.", "model.1.", 1) if k.startswith("channelnorm.") else k] = v
    out["model.0.blocks.0.attn.qkv.weight"] = torch.randn(3 * DIM, DIM)
    out["model.0.pos_embed"] = torch.randn(1, 5, DIM)
    return out


def test_a_training_checkpoint_is_converted(tmp_path: Path, state_dict) -> None:
    ckpt = {  # a Lightning checkpoint: counters, optimiser state, the module's state dict
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.1.0",
        "state_dict": _training_layout(state_dict),
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(3.0)}},
                "param_groups": [{"lr": 1e-4, "params": [0]}],
            }
        ],
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    torch.save(_training_layout(state_dict), tmp_path / "extracted.bin")  # ckpt["state_dict"]
    for name in ("last.ckpt", "extracted.bin"):
        model = load_loftup(tmp_path / name)
        assert set(model.state_dict()) == set(state_dict)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state_dict[k]), (name, k)


class _Hparams:  # stands for e.g. an omegaconf config pickled into a training checkpoint
    lr = 1e-4


def test_a_checkpoint_with_python_objects_is_refused_with_the_conversion_recipe(
    tmp_path: Path, state_dict
) -> None:
    ckpt = {"state_dict": _training_layout(state_dict), "hyper_parameters": _Hparams()}
    torch.save(ckpt, tmp_path / "last.ckpt")
    with pytest.raises(LoftUpCheckpointError, match="weights_only") as err:
        load_loftup(tmp_path / "last.ckpt")
    msg = str(err.value)
    assert "torch.load(" in msg and "trust" in msg and "safe_globals" in msg
    assert "weights_only=False" not in msg  # never advise plain unpickling
    assert "map_location='cpu', weights_only=True)" in msg
    assert "_Hparams" in msg  # torch's own message names the class to allowlist
    assert "torch.save(ckpt['state_dict']" in msg
    # following the recipe (still weights_only=True) gives a file that loads
    with torch.serialization.safe_globals([_Hparams]):
        trusted = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    torch.save(trusted["state_dict"], tmp_path / "loftup.bin")
    assert load_loftup(tmp_path / "loftup.bin").dim == DIM


@pytest.mark.parametrize(
    "typo", ["weights/loftup.bin", "./loftup.bin", "loftup.bin", "~/no-such-dir/x.pth", "a/b/c"]
)
def test_a_mistyped_local_path_is_file_not_found(
    tmp_path: Path, typo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"not found.*no such file or directory"):
        load_loftup(typo)
    with pytest.raises(FileNotFoundError, match="not found"):
        LoftUpUpsampler.from_pretrained(tmp_path / typo.lstrip("~/"))


def test_wrong_shapes_give_a_clear_error(tmp_path: Path, state_dict) -> None:
    bad = dict(state_dict)
    bad["upsampler.ca_transformer.norm.weight"] = torch.ones(7)
    torch.save(bad, tmp_path / "shape.bin")
    with pytest.raises(LoftUpCheckpointError, match=r"ca_transformer\.norm\.weight.*\(7,\)"):
        load_loftup(tmp_path / "shape.bin")


class _NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"x": _NotATensor()}, tmp_path / "evil.bin")
    with pytest.raises(LoftUpCheckpointError, match="weights_only"):
        read_state_dict(tmp_path / "evil.bin")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.bin")


def test_feature_dimension_mismatch_is_refused(weights_file: Path) -> None:
    up = LoftUpUpsampler.from_pretrained(weights_file)
    with pytest.raises(ValueError, match="trained for 32-d features"):
        up(torch.randn(1, 16, 2, 2), torch.rand(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        up(torch.randn(1, DIM, 2, 2), 255 * torch.rand(1, 3, 28, 28))
