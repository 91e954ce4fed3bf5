"""The bias-free TopK sparse autoencoder (no encoder bias, no decoder bias, no centring).

``code = TopK(ReLU(W_enc x / s))`` and ``x_hat = s * sum_{j in code} value_j * atom_j``, where
``s = input_scale`` is one global scalar estimated from the training data and saved with the
model. Every quantity is therefore positively homogeneous in ``x`` (``encode(a x) = a encode(x)``
for ``a > 0``), which keeps each concept activation a dynamic-linear function of the features.
Code values are in units of the scaled input (comparable across layers); reconstructions are in
the units of the raw features.

Selection is ReLU-then-TopK: when fewer than k pre-activations of a row are positive, the code
still holds k entries and the extra ones have value exactly 0 (their indices are arbitrary and
they contribute nothing, and no gradient flows through them).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Self, overload

import torch
from torch import Tensor, nn

from topk_sae.kernels import gather_preacts, sparse_decode

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, HfApi


class SparseCode(NamedTuple):
    """The K active latents of each input: ``values`` (float) and ``indices`` (int64), same shape.

    For rows ``(N, K)``; for maps ``(B, K, H, W)``; for tokens ``(B, T, K)``.
    """

    values: Tensor
    indices: Tensor

    def to_dense(self, n_latents: int, dim: int = -1) -> Tensor:
        """Scatter into a dense code with ``n_latents`` entries along ``dim`` (the K axis)."""
        shape = list(self.values.shape)
        shape[dim] = n_latents
        dense = self.values.new_zeros(shape)
        return dense.scatter_(dim, self.indices, self.values)


class SAEOutput(NamedTuple):
    """Reconstruction (raw feature units, input layout) and the sparse code."""

    recon: Tensor
    code: SparseCode


class TrainForward(NamedTuple):
    """What the trainer needs from one forward pass on *scaled* rows ``(N, D)``."""

    recon_ND: Tensor
    """Reconstruction of the scaled input from the k main latents."""
    values_NK: Tensor
    indices_NK: Tensor
    aux_recon_ND: Tensor | None
    """Reconstruction from the top ``k_aux`` dead latents (None when no latent is dead)."""
    num_dead: int


class BiasFreeTopKSAE(nn.Module):
    """TopK SAE without any bias; atoms are the unit-norm rows of ``W_dec`` (n_latents, d_in).

    Parameters: ``W_enc`` (n_latents, d_in) and ``W_dec`` (n_latents, d_in); buffer
    ``input_scale`` (0-d float32). The encoder is initialised as a copy of the decoder
    (tied at initialisation only, as in the FaCT release).
    """

    model_type = "bias_free_topk_sae"

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int,
        *,
        input_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("n_latents", n_latents), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if k > n_latents:
            raise ValueError(f"k={k} must be <= n_latents={n_latents}")
        if not (math.isfinite(input_scale) and input_scale > 0):
            raise ValueError(f"input_scale must be a positive finite number, got {input_scale}")
        self.d_in = d_in
        self.n_latents = n_latents
        self.k = k
        atoms = torch.randn(n_latents, d_in, generator=generator)
        atoms /= atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec = nn.Parameter(atoms)
        self.W_enc = nn.Parameter(atoms.clone())
        self.register_buffer("input_scale", torch.tensor(float(input_scale), dtype=torch.float32))

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> dict[str, Any]:
        """Architecture hyper-parameters (what ``config.json`` stores)."""
        return {"d_in": self.d_in, "n_latents": self.n_latents, "k": self.k}

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}, "
            f"input_scale={float(self.input_scale):.6g}"
        )

    # ------------------------------------------------------------------ shape checks
    def _check_rows(self, x: Tensor, what: str = "x") -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.d_in:
            hint = ""
            if x.ndim == 3 and x.shape[-1] == self.d_in:
                hint = " For tokens (B, T, D) use encode_tokens / forward_tokens."
            elif x.ndim == 4 and x.shape[1] == self.d_in:
                hint = " For feature maps (B, C, H, W) use encode_map / forward_map."
            raise ValueError(
                f"{what} must have shape (N, d_in={self.d_in}), got {tuple(x.shape)}.{hint}"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(f"{what} must be floating point, got {x.dtype}")

    def _check_k(self, k: int | None) -> int:
        k = self.k if k is None else k
        if not 0 < k <= self.n_latents:
            raise ValueError(f"k must be in [1, n_latents={self.n_latents}], got {k}")
        return k

    # ------------------------------------------------------------------ core (scaled rows)
    def preactivations(self, xs_ND: Tensor, *, bf16: bool = False) -> Tensor:
        """Dense pre-activations ``xs @ W_enc^T`` (N, n_latents), float32, no autograd."""
        with torch.no_grad():
            if bf16:
                with torch.autocast(device_type=xs_ND.device.type, dtype=torch.bfloat16):
                    return (xs_ND @ self.W_enc.T).float()
            return xs_ND @ self.W_enc.T

    def _select(
        self, xs_ND: Tensor, k: int, bf16: bool, dead_n: Tensor | None = None, k_aux: int = 0
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, int]:
        """TopK (and AuxK) selection; returns (values_NK, indices_NK, aux values, aux idx, n_dead)."""
        pre_Nn = self.preactivations(xs_ND, bf16=bf16)
        top = pre_Nn.topk(k, dim=1, sorted=False)
        idx_parts, pre_parts = [top.indices], [top.values]
        num_dead = 0
        if dead_n is not None and k_aux > 0:
            dead_ids = dead_n.nonzero().squeeze(1)
            num_dead = int(dead_ids.numel())
            k_eff = min(k_aux, num_dead)
            if k_eff > 0:
                aux = pre_Nn.index_select(1, dead_ids).topk(k_eff, dim=1, sorted=False)
                idx_parts.append(dead_ids[aux.indices])
                pre_parts.append(aux.values)
        indices = torch.cat(idx_parts, dim=1) if len(idx_parts) > 1 else idx_parts[0]
        # After a bf16 matmul the selected entries are recomputed exactly in float32.
        known = None if bf16 else (torch.cat(pre_parts, 1) if len(pre_parts) > 1 else pre_parts[0])
        values = torch.relu(gather_preacts(xs_ND, self.W_enc, indices, known))
        if indices.shape[1] == k:
            return values, indices, None, None, num_dead
        return values[:, :k], indices[:, :k], values[:, k:], indices[:, k:], num_dead

    def train_forward(
        self,
        xs_ND: Tensor,
        *,
        k: int | None = None,
        dead_n: Tensor | None = None,
        k_aux: int = 0,
        bf16: bool = False,
    ) -> TrainForward:
        """Forward on scaled rows for training: main reconstruction plus the AuxK reconstruction.

        The main and auxiliary pre-activations are gathered in one sparse autograd call, so the
        AuxK gradient reaches ``W_enc`` (at the selected dead latents) as well as ``W_dec``.
        """
        self._check_rows(xs_ND)
        k = self._check_k(k)
        values, indices, aux_values, aux_indices, num_dead = self._select(
            xs_ND, k, bf16, dead_n, k_aux
        )
        recon = sparse_decode(values, indices, self.W_dec)
        aux_recon = None
        if aux_values is not None and aux_indices is not None:
            aux_recon = sparse_decode(aux_values, aux_indices, self.W_dec)
        return TrainForward(recon, values, indices, aux_recon, num_dead)

    # ------------------------------------------------------------------ rows (N, D)
    @overload
    def encode(
        self, x_ND: Tensor, dense: Literal[False] = ..., *, k: int | None = ...
    ) -> SparseCode: ...
    @overload
    def encode(self, x_ND: Tensor, dense: Literal[True], *, k: int | None = ...) -> Tensor: ...

    def encode(
        self, x_ND: Tensor, dense: bool = False, *, k: int | None = None
    ) -> SparseCode | Tensor:
        """Sparse code of raw feature rows (N, d_in); ``dense=True`` returns (N, n_latents)."""
        self._check_rows(x_ND)
        k = self._check_k(k)
        xs = x_ND.to(self.W_enc.dtype) / self.input_scale
        values, indices, *_ = self._select(xs, k, bf16=False)
        code = SparseCode(values, indices)
        return code.to_dense(self.n_latents) if dense else code

    def decode(self, code: SparseCode) -> Tensor:
        """Reconstruction (N, d_in) in raw feature units from a row code (N, K)."""
        values, indices = code
        if values.ndim != 2:
            raise ValueError(
                f"decode expects a row code (N, K), got values {tuple(values.shape)}; use "
                "decode_map / decode_tokens for map / token codes"
            )
        if indices.dtype != torch.int64:
            raise TypeError(f"code indices must be int64, got {indices.dtype}")
        return sparse_decode(values, indices, self.W_dec) * self.input_scale

    def forward(self, x_ND: Tensor) -> SAEOutput:
        """``(recon, code)`` for raw feature rows (N, d_in)."""
        code = self.encode(x_ND)
        return SAEOutput(self.decode(code), code)

    # ------------------------------------------------------------------ maps (B, C, H, W)
    def _check_map(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.d_in:
            raise ValueError(
                f"feature map must have shape (B, C=d_in={self.d_in}, H, W), got {tuple(x.shape)}"
            )

    def encode_map(self, x_BCHW: Tensor, dense: bool = False) -> SparseCode | Tensor:
        """Per-pixel code of a feature map (a 1x1 convolution): values/indices (B, K, H, W), or
        the dense code (B, n_latents, H, W)."""
        self._check_map(x_BCHW)
        b, c, h, w = x_BCHW.shape
        code = self.encode(x_BCHW.permute(0, 2, 3, 1).reshape(-1, c))
        code = SparseCode(*(t.reshape(b, h, w, -1).permute(0, 3, 1, 2) for t in code))
        return code.to_dense(self.n_latents, dim=1) if dense else code

    def decode_map(self, code_BKHW: SparseCode) -> Tensor:
        """Reconstruction (B, d_in, H, W) from a map code (B, K, H, W)."""
        values = code_BKHW.values
        if values.ndim != 4:
            raise ValueError(f"decode_map expects (B, K, H, W) codes, got {tuple(values.shape)}")
        b, kk, h, w = values.shape
        rows = SparseCode(*(t.permute(0, 2, 3, 1).reshape(-1, kk) for t in code_BKHW))
        return self.decode(rows).reshape(b, h, w, self.d_in).permute(0, 3, 1, 2)

    def forward_map(self, x_BCHW: Tensor) -> SAEOutput:
        code = self.encode_map(x_BCHW)
        assert isinstance(code, SparseCode)
        return SAEOutput(self.decode_map(code), code)

    # ------------------------------------------------------------------ tokens (B, T, D)
    def _check_tokens(self, x: Tensor) -> None:
        if x.ndim != 3 or x.shape[2] != self.d_in:
            raise ValueError(
                f"tokens must have shape (B, T, D=d_in={self.d_in}), got {tuple(x.shape)}"
            )

    def encode_tokens(self, x_BTD: Tensor, dense: bool = False) -> SparseCode | Tensor:
        """Per-token code: values/indices (B, T, K), or dense (B, T, n_latents)."""
        self._check_tokens(x_BTD)
        b, t, d = x_BTD.shape
        code = self.encode(x_BTD.reshape(-1, d))
        code = SparseCode(*(c.reshape(b, t, -1) for c in code))
        return code.to_dense(self.n_latents) if dense else code

    def decode_tokens(self, code_BTK: SparseCode) -> Tensor:
        """Reconstruction (B, T, d_in) from a token code (B, T, K)."""
        values, _ = code_BTK
        if values.ndim != 3:
            raise ValueError(f"decode_tokens expects (B, T, K) codes, got {tuple(values.shape)}")
        b, t, kk = values.shape
        rows = SparseCode(*(c.reshape(-1, kk) for c in code_BTK))
        return self.decode(rows).reshape(b, t, self.d_in)

    def forward_tokens(self, x_BTD: Tensor) -> SAEOutput:
        code = self.encode_tokens(x_BTD)
        assert isinstance(code, SparseCode)
        return SAEOutput(self.decode_tokens(code), code)

    # ------------------------------------------------------------------ dictionary upkeep
    @torch.no_grad()
    def normalize_atoms_(self) -> None:
        """Rescale every atom (row of ``W_dec``) to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove from ``W_dec.grad`` the component parallel to each (unit-norm) atom."""
        grad = self.W_dec.grad
        if grad is None:
            return
        parallel_n = torch.linalg.vecdot(grad, self.W_dec)
        grad.addcmul_(self.W_dec, parallel_n.unsqueeze(1), value=-1.0)

    # ------------------------------------------------------------------ serialization
    def save_pretrained(
        self, save_directory: str | Path, *, metadata: dict[str, Any] | None = None
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` and a model card ``README.md``."""
        from topk_sae.hub import save_pretrained

        return save_pretrained(self, save_directory, metadata=metadata)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        subfolder: str | None = None,
        map_location: str | torch.device = "cpu",
    ) -> Self:
        """Load strictly from a local directory or a Hugging Face Hub repository id.

        The Hub arguments are ``huggingface_hub.hf_hub_download``'s (``HF_HUB_OFFLINE=1`` or
        ``local_files_only=True`` read the cache only); they are ignored for a local directory.
        ``config.json`` is validated field by field and the weights are checked (finite, unit
        atoms, positive scale); see :mod:`topk_sae.hub`.
        """
        from topk_sae.hub import from_pretrained

        return from_pretrained(
            cls,
            name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            subfolder=subfolder,
            map_location=map_location,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        branch: str | None = None,
        create_pr: bool = False,
        commit_message: str = "Upload bias-free TopK SAE",
        commit_description: str | None = None,
        metadata: dict[str, Any] | None = None,
        api: HfApi | None = None,
    ) -> CommitInfo:
        """Create the repository if needed and upload the model as one commit (to ``branch``,
        or as a pull request with ``create_pr=True``); returns ``huggingface_hub.CommitInfo``.
        """
        from topk_sae.hub import push_to_hub

        return push_to_hub(
            self,
            repo_id,
            private=private,
            token=token,
            branch=branch,
            create_pr=create_pr,
            commit_message=commit_message,
            commit_description=commit_description,
            metadata=metadata,
            api=api,
        )
