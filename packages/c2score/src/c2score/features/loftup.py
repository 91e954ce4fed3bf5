"""LoftUp feature upsampler (Huang et al., 2025), re-implemented to load the official checkpoints.

Module names and ``nn.Sequential`` indices reproduce the released state dicts
(``haiwen/loftup-dinov2s`` etc.: a plain ``pytorch_model.bin`` of the wrapper, keys prefixed
``upsampler.`` and ``channelnorm.``), so those files load strictly with
``torch.load(..., weights_only=True)``. Only the released configuration is implemented
(colour Fourier features, sine positional encoding of the low-resolution grid).

Architecture: every output pixel is a cross-attention readout of all low-resolution tokens.
Queries come from Fourier features of the (min-max scaled) guidance image passed through two
3x3 convolutions; keys/values are the channel-normalised patch features concatenated with a
Fourier encoding of their grid position. Because queries never attend to each other, the
whole transformer runs independently per query pixel; :meth:`LoftUp.forward` exploits this to
process the H*W queries in chunks with ``F.scaled_dot_product_attention``, which bounds memory
to ``O(chunk * (h*w + C'))`` instead of materialising (H*W) x (h*w) attention for all heads.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from c2score.features.base import check_rgb_images, imagenet_normalize

LOFTUP_FILENAME = "pytorch_model.bin"
"""Name of the state-dict file in the official LoftUp Hub repositories."""

DEFAULT_LOFTUP = "haiwen/loftup-dinov2s"
"""LoftUp trained on DINOv2 ViT-S/14 features (D = 384), used by the paper's C2-score."""

DEFAULT_QUERY_CHUNK = 4096
"""Query pixels per attention chunk: ~4096 x 256 x 4 heads x 4 B = 16 MiB of scores at 224 px."""


class LoftUpCheckpointError(ValueError):
    """A LoftUp state dict whose keys or shapes do not match the architecture."""


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (eps 1e-5; parameters under ``norm``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.norm(x_BCHW.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerNorm2d(nn.Module):
    """Channels-first LayerNorm with eps 1e-6 and bare ``weight``/``bias`` (LoftUp's output norm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x_BHWC = x_BCHW.permute(0, 2, 3, 1)
        out = F.layer_norm(x_BHWC, (x_BHWC.shape[-1],), self.weight, self.bias, self.eps)
        return out.permute(0, 3, 1, 2)


class MinMaxScaler(nn.Module):
    """Per channel: ``(x - min) / max(max - min, 1e-4) - 0.5``, min/max over batch AND space.

    The statistics span the whole batch, exactly as in the reference; :class:`LoftUpUpsampler`
    therefore feeds one image at a time by default so that outputs do not depend on batching.
    """

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        lo = x_BCHW.amin(dim=(0, 2, 3), keepdim=True)
        hi = x_BCHW.amax(dim=(0, 2, 3), keepdim=True)
        return (x_BCHW - lo) / (hi - lo).clamp_min(1e-4) - 0.5


class ImplicitFeaturizer(nn.Module):
    """Fourier features of pixel coordinates (and optionally colours) with learned phases.

    Inputs per pixel: (row, col) in [-1, 1] (+ the 3 colour values): c = 2 (or 5) numbers,
    each multiplied by ``n_freqs`` frequencies ``exp(linspace(-2, 10, n_freqs))``; output
    ``[sin(phase + b0), cos(phase + b1)(, colours)]`` with 2 * n_freqs * c (+ 3) channels,
    frequency-major. ``biases`` is stored as (2, c, n_freqs) but applied as a row-major
    reshape to (n_freqs, c) -- not a transpose -- as in the checkpoints' training code.
    """

    def __init__(self, *, color_feats: bool, n_freqs: int) -> None:
        super().__init__()
        self.color_feats = color_feats
        self.n_freqs = n_freqs
        self.n_inputs = 5 if color_feats else 2
        self.biases = nn.Parameter(torch.randn(2, self.n_inputs, n_freqs))

    @property
    def out_channels(self) -> int:
        return 2 * self.n_freqs * self.n_inputs + (3 if self.color_feats else 0)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Features of the grid of ``x_BCHW`` (only its shape is used unless ``color_feats``)."""
        b, _, h, w = x_BCHW.shape
        dev, dt = x_BCHW.device, self.biases.dtype
        rows = torch.linspace(-1, 1, h, device=dev, dtype=dt)
        cols = torch.linspace(-1, 1, w, device=dev, dtype=dt)
        coords_2HW = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))
        inputs_BcHW = coords_2HW.unsqueeze(0).expand(b, 2, h, w)
        if self.color_feats:
            inputs_BcHW = torch.cat([inputs_BcHW, x_BCHW.to(dt)], dim=1)
        freqs = torch.exp(torch.linspace(-2, 10, self.n_freqs, device=dev, dtype=dt))
        phase_BFcHW = inputs_BcHW.unsqueeze(1) * freqs.view(1, -1, 1, 1, 1)
        shape = (1, self.n_freqs, self.n_inputs, 1, 1)
        sin_B_HW = torch.sin(phase_BFcHW + self.biases[0].reshape(shape)).flatten(1, 2)
        cos_B_HW = torch.cos(phase_BFcHW + self.biases[1].reshape(shape)).flatten(1, 2)
        parts = [sin_B_HW, cos_B_HW]
        if self.color_feats:
            parts.append(x_BCHW.to(dt))
        return torch.cat(parts, dim=1)


class MultiheadCrossAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter names, computed with SDPA.

    ``in_proj_weight`` stacks the q, k and v projections row-wise ([q; k; v], C rows each);
    scores are scaled by 1/sqrt(C / heads). Keys/values are projected once
    (:meth:`project_kv`) and reused for every chunk of queries.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _heads(self, x_BLC: torch.Tensor) -> torch.Tensor:
        b, n, c = x_BLC.shape
        return x_BLC.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def project_kv(self, kv_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values, each (B, heads, L, C / heads)."""
        w_k, w_v = self.in_proj_weight.chunk(3)[1:]
        b_k, b_v = self.in_proj_bias.chunk(3)[1:]
        return self._heads(F.linear(kv_BLC, w_k, b_k)), self._heads(F.linear(kv_BLC, w_v, b_v))

    def forward(
        self, q_BNC: torch.Tensor, k_BhLd: torch.Tensor, v_BhLd: torch.Tensor
    ) -> torch.Tensor:
        b, n, c = q_BNC.shape
        w_q, b_q = self.in_proj_weight.chunk(3)[0], self.in_proj_bias.chunk(3)[0]
        q_BhNd = self._heads(F.linear(q_BNC, w_q, b_q))
        out_BhNd = F.scaled_dot_product_attention(q_BhNd, k_BhLd, v_BhLd)
        return self.out_proj(out_BhNd.transpose(1, 2).reshape(b, n, c))


class CrossAttentionLayer(nn.Module):
    """Pre-norm cross-attention: ``norm_q`` on queries, one ``norm_kv`` on keys and values."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attention = MultiheadCrossAttention(dim, num_heads)

    def project_kv(self, kv_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attention.project_kv(self.norm_kv(kv_BLC))

    def forward(self, q_BNC: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The attention output only (the residual is added by :class:`CATransformer`)."""
        return self.attention(self.norm_q(q_BNC), *kv)


class FeedForward(nn.Module):
    """Pre-norm MLP ``net`` = [LayerNorm, Linear, GELU, Dropout, Linear, Dropout] (dropout 0)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        # Identity at indices 3 and 5 keeps the checkpoints' Sequential indices (dropout p = 0).
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Identity(),
            nn.Linear(hidden_dim, dim),
            nn.Identity(),
        )

    def forward(self, x_BNC: torch.Tensor) -> torch.Tensor:
        return self.net(x_BNC)


class CATransformer(nn.Module):
    """``depth`` x [q += cross_attn(q, kv); q += ff(q)], then a final LayerNorm on q."""

    def __init__(self, dim: int, *, depth: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)  # registered first: the checkpoints list it first
        self.layers = nn.ModuleList(
            nn.ModuleList([CrossAttentionLayer(dim, num_heads), FeedForward(dim, mlp_dim)])
            for _ in range(depth)
        )

    def project_kv(self, kv_BLC: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer keys and values; computed once, shared by all query chunks."""
        return [attn.project_kv(kv_BLC) for attn, _ in self.layers]

    def forward(
        self, q_BNC: torch.Tensor, kvs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        for (attn, ff), kv in zip(self.layers, kvs, strict=True):
            q_BNC = attn(q_BNC, kv) + q_BNC
            q_BNC = ff(q_BNC) + q_BNC
        return self.norm(q_BNC)


class LoftUp(nn.Module):
    """The LoftUp upsampler proper (state-dict keys of the checkpoints without ``upsampler.``).

    ``forward(lr_feats_BDhw, guidance_B3HW) -> feats_BDHW`` where ``lr_feats`` are already
    channel-normalised (see :class:`LoftUpWithChannelNorm`) and ``guidance`` is the
    ImageNet-normalised image; the output has the guidance's spatial size. Attention width
    C' = dim + 4 * lr_n_freqs (404 for dim 384).
    """

    def __init__(
        self,
        dim: int,
        *,
        n_freqs: int = 20,
        lr_n_freqs: int = 5,
        num_heads: int = 4,
        num_layers: int = 2,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.lr_pe = ImplicitFeaturizer(color_feats=False, n_freqs=lr_n_freqs)
        width = dim + self.lr_pe.out_channels
        self.fourier_feat = nn.Sequential(
            MinMaxScaler(), ImplicitFeaturizer(color_feats=True, n_freqs=n_freqs)
        )
        in_ch = self.fourier_feat[1].out_channels
        self.first_conv = nn.Sequential(
            ChannelNorm(in_ch),
            nn.Conv2d(in_ch, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.final_conv = nn.Sequential(nn.Conv2d(width, dim, kernel_size=1), LayerNorm2d(dim))
        self.ca_transformer = CATransformer(
            width, depth=num_layers, num_heads=num_heads, mlp_dim=dim
        )

    def forward(
        self,
        lr_feats_BDhw: torch.Tensor,
        guidance_B3HW: torch.Tensor,
        *,
        query_chunk_size: int | None = DEFAULT_QUERY_CHUNK,
    ) -> torch.Tensor:
        """Upsample; ``query_chunk_size`` pixels at a time (None: all at once; same result)."""
        if lr_feats_BDhw.ndim != 4 or lr_feats_BDhw.shape[1] != self.dim:
            raise ValueError(
                f"LoftUp({self.dim}) expects low-resolution features (B, {self.dim}, h, w), got "
                f"{tuple(lr_feats_BDhw.shape)}"
            )
        if guidance_B3HW.ndim != 4 or guidance_B3HW.shape[:2] != (lr_feats_BDhw.shape[0], 3):
            raise ValueError(
                f"guidance must be (B, 3, H, W) with B = {lr_feats_BDhw.shape[0]}, got "
                f"{tuple(guidance_B3HW.shape)}"
            )
        if query_chunk_size is not None and query_chunk_size < 1:
            raise ValueError(f"query_chunk_size must be >= 1 or None, got {query_chunk_size}")
        queries_BCHW = self.first_conv(self.fourier_feat(guidance_B3HW))
        b, _, h, w = queries_BCHW.shape
        queries_BNC = queries_BCHW.flatten(2).transpose(1, 2)
        kv_BChw = torch.cat([lr_feats_BDhw, self.lr_pe(lr_feats_BDhw)], dim=1)
        kvs = self.ca_transformer.project_kv(kv_BChw.flatten(2).transpose(1, 2))

        n = h * w
        step = n if query_chunk_size is None else query_chunk_size
        out_BDN = queries_BNC.new_empty(b, self.dim, n)
        for start in range(0, n, step):
            q_BnC = self.ca_transformer(queries_BNC[:, start : start + step], kvs)
            # final_conv is per pixel (1x1 conv + channel norm): apply it to the chunk as a
            # (B, C', 1, n) map so the (B, C', H, W) transformer output is never stored whole.
            out = self.final_conv(q_BnC.transpose(1, 2).unsqueeze(2))
            out_BDN[:, :, start : start + step] = out.squeeze(2)
        return out_BDN.view(b, self.dim, h, w)


class LoftUpWithChannelNorm(nn.Module):
    """The released LoftUp model: ``upsampler(channelnorm(lr_feats), guidance)``.

    Its ``state_dict`` keys are exactly those of the official ``pytorch_model.bin`` files.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.upsampler = LoftUp(dim)
        self.channelnorm = ChannelNorm(dim)

    @property
    def dim(self) -> int:
        return self.upsampler.dim

    def forward(
        self,
        lr_feats_BDhw: torch.Tensor,
        guidance_B3HW: torch.Tensor,
        *,
        query_chunk_size: int | None = DEFAULT_QUERY_CHUNK,
    ) -> torch.Tensor:
        return self.upsampler(
            self.channelnorm(lr_feats_BDhw), guidance_B3HW, query_chunk_size=query_chunk_size
        )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> LoftUpWithChannelNorm:
        """Build a model of the right width (read from ``channelnorm.norm.weight``), load strictly."""
        key = "channelnorm.norm.weight"
        if key not in state_dict:
            _raise_key_mismatch(state_dict, set(cls(4).state_dict()), hint="no " + key)
        model = cls(int(state_dict[key].shape[0]))
        load_state_dict_strict(model, state_dict)
        return model.eval()


def _raise_key_mismatch(
    state_dict: Mapping[str, torch.Tensor], expected: set[str], *, hint: str = ""
) -> None:
    got = set(state_dict)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    msg = [f"not a LoftUp state dict ({hint})" if hint else "LoftUp state dict keys do not match"]
    if missing:
        msg.append(f"{len(missing)} missing keys, e.g. {missing[:5]}")
    if unexpected:
        msg.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
    msg.append(
        "expected the official layout: keys 'upsampler.*' and 'channelnorm.*' as in "
        f"{DEFAULT_LOFTUP}/{LOFTUP_FILENAME}"
    )
    raise LoftUpCheckpointError("; ".join(msg))


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(strict=True)`` with a readable :class:`LoftUpCheckpointError`."""
    expected = model.state_dict()
    if set(state_dict) != set(expected):
        _raise_key_mismatch(state_dict, set(expected))
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if not isinstance(v, torch.Tensor) or v.shape != expected[k].shape
    ]
    if bad:
        raise LoftUpCheckpointError(
            f"LoftUp state dict has {len(bad)} tensors of the wrong shape, e.g. {bad[:3]}"
        )
    model.load_state_dict(dict(state_dict), strict=True)


_TRAINING_CHANNELNORM = "model.1."
"""Prefix of the channel norm in the upstream training module (``model.0`` is the backbone)."""


def from_training_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released layout of a state dict saved by LoftUp's *training* module.

    The training module (what its Lightning ``.ckpt`` files hold under ``"state_dict"``) keeps
    the upsampler under ``upsampler.``, as released, but the channel norm as ``model.1.`` next
    to the frozen backbone ``model.0.``. This renames ``model.1.*`` to ``channelnorm.*``, keeps
    ``upsampler.*`` (and ``channelnorm.*``) and drops everything else (backbone, other heads).
    A state dict without ``model.*`` keys is returned unchanged, so that stray keys of a
    released-style file are still reported by the strict load.
    """
    if not any(k.startswith("model.") for k in state_dict):
        return dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(("upsampler.", "channelnorm.")):
            out[key] = value
        elif key.startswith(_TRAINING_CHANNELNORM):
            out["channelnorm." + key.removeprefix(_TRAINING_CHANNELNORM)] = value
    return out


def _conversion_recipe(path: Path) -> str:
    # Still weights_only=True: only the classes the user allowlists (those torch names in its
    # error) may be rebuilt, nothing else in the file runs. We never suggest plain unpickling.
    return (
        "if it is a LoftUp training checkpoint from a source you trust, extract its tensors "
        "once in Python, allowlisting only the classes torch names below: "
        "with torch.serialization.safe_globals([TheClass, ...]): "
        f"ckpt = torch.load({str(path)!r}, map_location='cpu', weights_only=True); "
        "torch.save(ckpt['state_dict'], 'loftup.bin') -- and pass loftup.bin (its upsampler.* / "
        "model.1.* keys are converted on loading)"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a LoftUp state dict from a ``.bin``/``.pt``/``.ckpt`` file without unpickling code.

    Accepts a flat tensor dict (the released files) or a training checkpoint
    (``{"state_dict": ..., <counters, optimiser state>}``, or its extracted ``state_dict``),
    whose keys are brought to the released layout by :func:`from_training_state_dict`.
    A file holding other Python objects is refused by ``torch.load(weights_only=True)``; the
    error says how to extract the tensors from a trusted one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoftUp weights file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise LoftUpCheckpointError(
            f"could not read {str(path)!r} as a plain tensor state dict (loaded with "
            f"weights_only=True, so files holding arbitrary Python objects are refused); "
            f"{_conversion_recipe(path)}. torch said: {err}"
        ) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a training checkpoint: the module's weights
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise LoftUpCheckpointError(
            f"{str(path)!r} does not hold a flat dict of tensors (got {type(obj).__name__}"
            + (f" with keys {sorted(obj)[:5]}" if isinstance(obj, Mapping) else "")
            + ")"
        )
    return from_training_state_dict(obj)


_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors")


def _local_weights(source: str | Path, filename: str) -> Path | None:
    """The local file ``source`` names, or None when it is a Hub repo id.

    Something that exists is local; something that looks like a path (a ``Path``, a leading
    ``/``, ``.`` or ``~``, more than one ``/``, a weights suffix) or is no valid repo id is a
    local file that is missing -- ``FileNotFoundError`` -- instead of a confusing Hub error.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path / filename
    if path.is_file():
        return path
    text = str(source)
    looks_local = (
        isinstance(source, Path)
        or text.startswith(("/", ".", "~", "\\"))
        or text.count("/") > 1
        or "\\" in text
        or text.lower().endswith(_WEIGHT_SUFFIXES)
    )
    if not looks_local:
        try:
            validate_repo_id(text)
            return None
        except HFValidationError:
            pass
    raise FileNotFoundError(
        f"LoftUp weights {text!r} not found: no such file or directory, and not a Hub repo id "
        f"(those look like {DEFAULT_LOFTUP!r}); check the path"
    )


def load_loftup(
    source: str | Path = DEFAULT_LOFTUP,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    filename: str = LOFTUP_FILENAME,
) -> LoftUpWithChannelNorm:
    """Official LoftUp weights (eval mode) from a local file, ``<directory>/<filename>``, or a
    Hub repo id (``hf_hub_download`` with ``revision``, ``cache_dir``, ``local_files_only``).

    A local file may also be an upstream training checkpoint (see :func:`read_state_dict`); a
    path that does not exist raises ``FileNotFoundError``."""
    path = _local_weights(source, filename)
    if path is None:
        path = Path(
            hf_hub_download(
                repo_id=str(source),
                filename=filename,
                revision=revision,
                cache_dir=None if cache_dir is None else str(cache_dir),
                local_files_only=local_files_only,
                token=token,
            )
        )
    return LoftUpWithChannelNorm.from_state_dict(read_state_dict(path))


class LoftUpUpsampler(nn.Module):
    """LoftUp as an :class:`~c2score.features.base.Upsampler` of [0, 1] images.

    Normalises the guidance image with ImageNet statistics (LoftUp's input convention) and,
    with ``per_image=True`` (default), upsamples each image of a batch on its own: LoftUp's
    min-max scaling spans the whole batch, so this makes every image's features independent
    of what it is batched with (and equal to the reference run on that image alone).
    ``per_image=False`` reproduces the reference's batch-wide scaling exactly instead.
    ``query_chunk_size`` bounds the cross-attention memory (None: unchunked; same result).
    """

    def __init__(
        self,
        model: LoftUpWithChannelNorm,
        *,
        per_image: bool = True,
        query_chunk_size: int | None = DEFAULT_QUERY_CHUNK,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.per_image = per_image
        self.query_chunk_size = query_chunk_size

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path = DEFAULT_LOFTUP,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        per_image: bool = True,
        query_chunk_size: int | None = DEFAULT_QUERY_CHUNK,
    ) -> LoftUpUpsampler:
        model = load_loftup(
            source,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        return cls(model, per_image=per_image, query_chunk_size=query_chunk_size)

    @property
    def dim(self) -> int:
        return self.model.dim

    @torch.no_grad()
    def forward(self, lowres_BDhw: torch.Tensor, images_B3HW: torch.Tensor) -> torch.Tensor:
        check_rgb_images(images_B3HW)
        if lowres_BDhw.ndim != 4 or lowres_BDhw.shape[0] != images_B3HW.shape[0]:
            raise ValueError(
                f"low-resolution features {tuple(lowres_BDhw.shape)} and images "
                f"{tuple(images_B3HW.shape)} must be 4-d with the same batch size"
            )
        if lowres_BDhw.shape[1] != self.dim:
            raise ValueError(
                f"this LoftUp was trained for {self.dim}-d features, got {lowres_BDhw.shape[1]}-d; "
                "pick the LoftUp checkpoint that matches the backbone"
            )
        param = next(self.model.parameters())
        lowres = lowres_BDhw.to(device=param.device, dtype=param.dtype)
        guidance = imagenet_normalize(images_B3HW.to(device=param.device, dtype=param.dtype))
        if not self.per_image:
            return self.model(lowres, guidance, query_chunk_size=self.query_chunk_size)
        return torch.cat(
            [
                self.model(
                    lowres[i : i + 1], guidance[i : i + 1], query_chunk_size=self.query_chunk_size
                )
                for i in range(lowres.shape[0])
            ]
        )
