"""The concept bottleneck: a backbone module followed by a bias-free TopK SAE (paper Eq. 6-7).

:class:`ConceptLayer` replaces one module of a B-cos network by itself followed by the SAE: the
rest of the network sees only the SAE reconstruction, so every downstream quantity is a
dynamic-linear function of the concept codes. It is ordinary module state -- no global hooks --
so two FaCT models never interfere, and ``deepcopy``, ``state_dict`` and ``torch.compile`` work.

The layer also serves the analyses: ``bypass`` turns it into the original module (the B-cos
network the SAE was trained on), and a *recorder* set for one forward pass by
:class:`fact_model.model.FaCT` keeps the layer's features and codes (or substitutes codes).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from topk_sae import BiasFreeTopKSAE, SparseCode
from topk_sae.kernels import sparse_decode

__all__ = [
    "ConceptLayer",
    "Layout",
    "Recorder",
    "StopForward",
    "decode_dense",
    "find_module",
    "set_module",
]

Layout = Literal["BKHW", "BTK"]
"""Code layout of a layer: CNN feature maps ``(B, K, H, W)`` or ViT tokens ``(B, T, K)``."""


class StopForward(Exception):
    """Raised by a :class:`ConceptLayer` once it has recorded what was asked: the rest of the
    forward pass is not needed (caught by :class:`~fact_model.model.FaCT`)."""


@dataclass
class Recorder:
    """What one forward pass should keep (or substitute) at one :class:`ConceptLayer`.

    Attributes:
        leaf_codes: make the code values (in bypass mode: the features) a fresh autograd leaf
            (``requires_grad``): gradients of downstream values w.r.t. the codes, without a
            graph through the backbone prefix.
        stop: raise :class:`StopForward` after recording (nothing downstream is computed).
        features: recorded module output (what the SAE encodes), set by the forward pass.
        code: recorded sparse code (values ``(B, K, H, W)`` / ``(B, T, K)``).
        recon: recorded reconstruction passed downstream.
    """

    leaf_codes: bool = False
    stop: bool = False
    features: Tensor | None = None
    code: SparseCode | None = None
    recon: Tensor | None = None


def layout_of(features: Tensor) -> Layout:
    """``BKHW`` for (B, C, H, W) maps, ``BTK`` for (B, T, D) tokens; anything else is refused."""
    if features.ndim == 4:
        return "BKHW"
    if features.ndim == 3:
        return "BTK"
    raise ValueError(
        f"a concept layer needs a (B, C, H, W) feature map or (B, T, D) tokens, got a tensor of "
        f"shape {tuple(features.shape)}; choose a layer that outputs one of those"
    )


class _DenseDecode(torch.autograd.Function):
    """``recon = s * codes @ W_dec`` from dense row codes (N, n), sparse in the forward.

    Concept heads decode perturbed dense codes; when each row has at most ``cap`` nonzeros (a
    masked TopK code always has at most k) the forward is a sparse embedding bag. The backward
    is the exact dense gradient ``grad @ W_dec^T * s`` for every entry -- also the inactive
    ones, whose gradient importance measures such as saliency need.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        codes_Nn: Tensor,
        atoms_nD: Tensor,
        scale: Tensor,
        cap: int,
    ) -> Tensor:
        ctx.save_for_backward(atoms_nD, scale)
        if cap > 0:
            values, indices = codes_Nn.topk(cap, dim=1, sorted=False)
            recon = sparse_decode(values, indices, atoms_nD)
        else:
            recon = codes_Nn.to(atoms_nD.dtype) @ atoms_nD
        return recon * scale

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_ND: Tensor
    ) -> tuple[Tensor | None, None, None, None]:
        atoms_nD, scale = ctx.saved_tensors
        grad_codes = None
        if ctx.needs_input_grad[0]:
            grad_codes = (grad_ND @ atoms_nD.T) * scale
        return grad_codes, None, None, None


def decode_dense(sae: BiasFreeTopKSAE, codes: Tensor, layout: Layout) -> Tensor:
    """Reconstruction of dense codes (``(B, n, H, W)`` or ``(B, T, n)``) in feature units.

    Exactly ``input_scale * sum_j codes_j * atom_j`` at every position; differentiable in the
    codes (the atoms are treated as constants). Sparse when every position has at most k
    nonzeros (masked codes), dense otherwise.
    """
    n = sae.n_latents
    if layout == "BKHW":
        if codes.ndim != 4 or codes.shape[1] != n:
            raise ValueError(f"expected dense codes (B, {n}, H, W), got {tuple(codes.shape)}")
        b, _, h, w = codes.shape
        rows = codes.permute(0, 2, 3, 1).reshape(-1, n)
    else:
        if codes.ndim != 3 or codes.shape[2] != n:
            raise ValueError(f"expected dense codes (B, T, {n}), got {tuple(codes.shape)}")
        b, t, _ = codes.shape
        rows = codes.reshape(-1, n)
    nnz = int((rows != 0).sum(1).max()) if rows.numel() else 0
    # Sparse forward while it is cheaper than the dense matmul (it always is for TopK codes).
    cap = max(nnz, 1) if nnz <= max(4 * sae.k, n // 8) else 0
    recon = _DenseDecode.apply(rows, sae.W_dec.detach(), sae.input_scale, cap)
    if layout == "BKHW":
        return recon.reshape(b, h, w, sae.d_in).permute(0, 3, 1, 2)
    return recon.reshape(b, t, sae.d_in)


class ConceptLayer(nn.Module):
    """``module`` followed by a bias-free TopK SAE: outputs the reconstruction (paper Eq. 7).

    Args:
        module: the backbone module whose output is decomposed into concepts.
        sae: a :class:`topk_sae.BiasFreeTopKSAE` with ``d_in`` = the module's output channels,
            or ``None`` for a tap (always bypassed; records the module's output).
        name: the module's name in the backbone (``"layer4"``), used in messages and results.

    Attributes:
        bypass: when ``True`` the layer returns the module output unchanged (the original B-cos
            network); set through :meth:`fact_model.FaCT.bcos_mode`.
        recorder: a :class:`Recorder` for the current forward pass, or ``None`` (set by FaCT).
    """

    def __init__(self, module: nn.Module, sae: BiasFreeTopKSAE | None, name: str) -> None:
        super().__init__()
        if sae is not None and not isinstance(sae, BiasFreeTopKSAE):
            raise TypeError(
                f"the SAE for {name!r} must be a topk_sae.BiasFreeTopKSAE (bias-free, so that "
                f"contributions are exact), got {type(sae).__name__}"
            )
        self.module = module
        self.sae = sae
        self.layer_name = name
        # Without an SAE the layer is a *tap*: the original module, with recording (used to
        # extract the features an SAE is then trained on).
        self.bypass = sae is None
        self.recorder: Recorder | None = None

    def extra_repr(self) -> str:
        return f"layer={self.layer_name!r}, bypass={self.bypass}"

    def encode(self, features: Tensor) -> SparseCode:
        """The sparse code of the module output (maps or tokens; the SAE's input scale applied)."""
        if self.sae is None:
            raise RuntimeError(f"layer {self.layer_name!r} is a tap without an SAE")
        layout = layout_of(features)
        if (features.shape[1] if layout == "BKHW" else features.shape[2]) != self.sae.d_in:
            raise ValueError(
                f"layer {self.layer_name!r} output {tuple(features.shape)} does not match the "
                f"SAE's d_in={self.sae.d_in}"
            )
        code = (
            self.sae.encode_map(features) if layout == "BKHW" else self.sae.encode_tokens(features)
        )
        assert isinstance(code, SparseCode)
        return code

    def decode(self, code: SparseCode, layout: Layout) -> Tensor:
        """Reconstruction of a sparse code of this layer's layout."""
        return self.sae.decode_map(code) if layout == "BKHW" else self.sae.decode_tokens(code)

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        rec = self.recorder
        features = self.module(*args, **kwargs)
        if not isinstance(features, Tensor):
            raise TypeError(
                f"layer {self.layer_name!r} returns a {type(features).__name__}; a concept layer "
                "needs a module that returns one tensor"
            )
        if self.bypass or self.sae is None:
            if rec is None:
                return features
            if rec.leaf_codes:  # in B-cos mode the channels are the concepts
                features = features.detach().requires_grad_(True)
            rec.features = features
            if rec.stop:
                raise StopForward
            # Downstream code may add into its input in place (residual blocks): hand on a copy
            # so the recorded features stay what this module produced.
            return features.clone()
        layout = layout_of(features)
        code = self.encode(features)
        if rec is not None:
            rec.features = features
            if rec.leaf_codes:
                code = SparseCode(code.values.detach().requires_grad_(True), code.indices)
            rec.code = code
        recon = self.decode(code, layout)
        if rec is not None:
            rec.recon = recon
            if rec.stop:
                raise StopForward
        return recon


def find_module(model: nn.Module, name: str, *, what: str = "layer") -> nn.Module:
    """``model``'s submodule called ``name``; a clear error with close matches otherwise."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.5)
    hint = f" Close matches: {close}." if close else ""
    raise ValueError(
        f"no {what} named {name!r} in {type(model).__name__}.{hint} Any name of "
        f"model.named_modules() works (this model has {len(names)}; e.g. {names[:8]})."
    )


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace ``model``'s submodule ``name`` (dotted path) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = module
    else:
        setattr(parent, child, module)


def concept_layers(model: nn.Module) -> Iterator[tuple[str, ConceptLayer]]:
    """Every :class:`ConceptLayer` of ``model`` with its qualified name, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, ConceptLayer):
            yield name, module
