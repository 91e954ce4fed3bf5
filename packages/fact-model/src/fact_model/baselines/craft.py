"""CRAFT (Fel et al., CVPR 2023) as a concept set of a FaCT model's B-cos network.

Configured as in the FaCT paper, App. C.3: per class, non-negative matrix factorisation
(``sklearn.decomposition.NMF``, 16 components by default) of the layer's activations of that
class's training images, every spatial position one row (full maps, no crops, as in holistic
CRAFT); the concept attribution is the NMF coefficient map upsampled (bilinear) to the input.

API (for ``fact compare`` and the metrics in :mod:`fact_model.consistency`)::

    craft = CraftConcepts.fit(model, dataset, layer=None, n_components=16,
                              per_class_images=600, classes=None, basis="predicted",
                              batch_size=64, device=None, progress=True, seed=0, max_iter=200)
    craft.save(path)            # <path>.safetensors + <path>.json, atomic
    craft = CraftConcepts.load(model, path)
    c2_score(craft, dataset, extractor);  deletion(craft, dataset, out_dir, cfg)

``dataset`` is an :class:`~fact_model.data.IndexedImages` (its ``targets`` select the class
images: the first ``per_class_images`` of each class). Concepts are class-specific: concept id
``c * n_components + j`` is component ``j`` of class ``classes[c]`` (``classes`` defaults to
every class of the model; ``n_concepts = len(classes) * n_components``).

Decisions:

* **Non-negativity.** NMF needs ``A >= 0``. The original CRAFT asserts it (post-ReLU layers of a
  standard ResNet); B-cos layers have no ReLU and their outputs can be negative (the tiny test
  backbones have many negative entries). App. C.3 ran CRAFT on a standard (ReLU) torchvision
  ResNet-50, so it says nothing about this. We clamp the activations at 0 (``A+ = max(A, 0)``)
  before fitting and transforming; the reconstruction ``U W`` approximates ``A+``, so
  ``head(codes(x))`` differs from the B-cos logits by the NMF error *and* the clamped negative
  part. :attr:`fit_report` records the fraction of negative entries and the relative
  reconstruction error of the fit data.
* **Which basis codes use.** ``basis="predicted"`` (default, CRAFT's use: an image's decision
  is explained with the concepts of its predicted class): each image's activations are
  transformed onto its predicted class's basis (the B-cos network's argmax over ``classes``);
  every other class's codes are 0. ``basis="all"``: one non-negative least-squares transform
  onto the concatenation of every class's basis (better reconstruction, concepts of several
  classes may be active in one image). The transform is sklearn's (``non_negative_factorization``
  with the basis fixed, the same as ``NMF.transform``).

``head(codes)`` reconstructs ``sum_k u_k W_k`` at every position and runs the rest of the B-cos
network (every SAE bypassed), so ``contributions(codes, t)`` (gradient x codes in explanation
mode, where the head is linear) sum to the logit minus the bias. Only ``BKHW`` (map) layers are
supported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from fact_model._atomic import atomic_path, atomic_write_json
from fact_model.data import IndexedImages, image_loader, iterate
from fact_model.explain import ConceptAttributions
from fact_model.model import FaCT

__all__ = ["CraftConcepts"]

Basis = Literal["predicted", "all"]
FORMAT = "fact-craft-v1"


def _nmf_fit(rows: np.ndarray, n_components: int, seed: int, max_iter: int) -> np.ndarray:
    import warnings

    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    nmf = NMF(n_components=n_components, random_state=seed, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        nmf.fit(rows)
    return nmf.components_.astype(np.float32)


def nmf_transform(rows: np.ndarray, basis: np.ndarray, max_iter: int = 200) -> np.ndarray:
    """Non-negative codes of ``rows`` (N, C) on the fixed ``basis`` (K, C), as sklearn's
    ``NMF.transform`` computes them."""
    import warnings

    from sklearn.decomposition import non_negative_factorization
    from sklearn.exceptions import ConvergenceWarning

    if rows.shape[0] == 0:
        return np.zeros((0, basis.shape[0]), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        u, _, _ = non_negative_factorization(
            rows.astype(basis.dtype),
            H=basis,
            n_components=basis.shape[0],
            update_H=False,
            max_iter=max_iter,
        )
    return u.astype(np.float32)


class CraftConcepts:
    """Class-specific CRAFT concepts at one layer of a FaCT model's B-cos network."""

    kind = "craft"

    def __init__(
        self,
        model: FaCT,
        layer: str,
        bases: Tensor,
        classes: Sequence[int],
        *,
        basis: Basis = "predicted",
        max_iter: int = 200,
        fit_report: dict[str, Any] | None = None,
    ) -> None:
        if basis not in ("predicted", "all"):
            raise ValueError(f"basis must be 'predicted' or 'all', got {basis!r}")
        self.model = model
        self.info = model.layer_info(layer)
        self.layer = self.info.name
        if self.info.layout != "BKHW":
            raise ValueError(
                f"CRAFT supports map layers (BKHW) only; {self.layer!r} is {self.info.layout}"
            )
        self._chain = model.chain()
        self._chain.index(self.layer)
        self.layout = "BKHW"
        bases = torch.as_tensor(bases, dtype=torch.float32)
        if bases.ndim != 3 or bases.shape[0] != len(classes) or bases.shape[2] != self.info.d_in:
            raise ValueError(
                f"bases must be ({len(classes)}, n_components, {self.info.d_in}), "
                f"got {tuple(bases.shape)}"
            )
        self.bases = bases
        self.classes = [int(c) for c in classes]
        self.n_components = int(bases.shape[1])
        self.n_concepts = len(self.classes) * self.n_components
        self.basis = basis
        self.max_iter = max_iter
        self.fit_report = dict(fit_report or {})

    @property
    def name(self) -> str:
        return f"CRAFT {self.layer}"

    @property
    def concept_dim(self) -> int:
        return 1

    def __repr__(self) -> str:
        return (
            f"CraftConcepts({self.name!r}, n_concepts={self.n_concepts}, "
            f"n_components={self.n_components}, basis={self.basis!r})"
        )

    # ------------------------------------------------------------------ activations
    def activations(self, images: Tensor) -> Tensor:
        """The layer's B-cos activations (B, C, H, W), every SAE bypassed (not clamped)."""
        with torch.no_grad(), self.model.bcos_mode():
            out = self.model.forward_with_codes(images, layers=[self.layer], stop_after=self.layer)
        return out.features[self.layer]

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        model: FaCT,
        dataset: IndexedImages,
        layer: str | None = None,
        *,
        n_components: int = 16,
        per_class_images: int | None = 600,
        classes: Sequence[int] | None = None,
        basis: Basis = "predicted",
        batch_size: int = 64,
        device: Any = None,
        progress: bool = True,
        seed: int = 0,
        max_iter: int = 200,
    ) -> CraftConcepts:
        """Fit one NMF per class on the layer's (clamped) activations of its images."""
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        info = model.layer_info(layer)  # a clear error for an unknown layer
        classes = list(range(model.num_classes)) if classes is None else [int(c) for c in classes]
        if not classes:
            raise ValueError("no classes to fit")
        targets = dataset.targets
        shell = cls(
            model,
            info.name,
            torch.zeros(len(classes), n_components, info.d_in),
            classes,
            basis=basis,
            max_iter=max_iter,
        )
        bases, report = [], {"classes": {}, "negative_fraction": 0.0}
        n_neg = n_all = 0
        for c in tqdm(classes, desc=f"CRAFT NMF {info.name}", disable=not progress):
            idx = [i for i, t in enumerate(targets) if t == c]
            if per_class_images is not None:
                idx = idx[:per_class_images]
            if not idx:
                raise ValueError(f"class {c} has no images in the dataset")
            chunks = []
            for batch in iterate(image_loader(dataset, batch_size=batch_size, indices=idx)):
                x = batch.images.to(device) if device is not None else batch.images
                a = shell.activations(x).cpu()
                chunks.append(a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]))
            if not chunks:
                raise ValueError(f"class {c}: none of its images could be read")
            rows = torch.cat(chunks)
            n_neg += int((rows < 0).sum())
            n_all += rows.numel()
            rows_np = rows.clamp_min(0).double().numpy()
            if n_components > rows_np.shape[0]:
                raise ValueError(
                    f"class {c}: n_components={n_components} > {rows_np.shape[0]} activation "
                    f"rows ({len(idx)} images x positions)"
                )
            w = _nmf_fit(rows_np, n_components, seed, max_iter)
            u = nmf_transform(rows_np.astype(np.float32), w, max_iter)
            err = float(np.linalg.norm(rows_np - u @ w) / max(np.linalg.norm(rows_np), 1e-12))
            report["classes"][str(c)] = {"images": len(idx), "rows": rows_np.shape[0],
                                         "relative_error": err}  # fmt: skip
            bases.append(torch.from_numpy(w))
        report["negative_fraction"] = n_neg / max(n_all, 1)
        shell.bases = torch.stack(bases)
        shell.fit_report = report
        return shell

    # ------------------------------------------------------------------ ConceptModel
    def predicted(self, images: Tensor) -> Tensor:
        """(B,) index into ``classes`` of the B-cos network's prediction among ``classes``."""
        with torch.no_grad(), self.model.bcos_mode():
            logits = self.model(images)
        return logits[:, self.classes].argmax(1)

    def codes(self, images: Tensor, class_index: Tensor | None = None) -> Tensor:
        """Dense codes (B, K, H, W); ``class_index`` (B,) overrides the predicted class."""
        a = self.activations(images)
        b, ch, h, w = a.shape
        r = self.n_components
        rows = a.permute(0, 2, 3, 1).reshape(b, h * w, ch).clamp_min(0).cpu().numpy()
        out = torch.zeros(b, h * w, self.n_concepts)
        if self.basis == "all":
            full = self.bases.reshape(-1, ch).numpy()
            u = nmf_transform(rows.reshape(-1, ch), full, self.max_iter)
            out = torch.from_numpy(u).reshape(b, h * w, -1)
        else:
            ci = self.predicted(images) if class_index is None else torch.as_tensor(class_index)
            for i in range(b):
                c = int(ci[i])
                u = nmf_transform(rows[i], self.bases[c].numpy(), self.max_iter)
                out[i, :, c * r : (c + 1) * r] = torch.from_numpy(u)
        return out.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous().to(a.device)

    def reconstruct(self, codes: Tensor) -> Tensor:
        """Activations (B, C, H, W) ``sum_k u_k W_k`` from codes (B, K, H, W)."""
        full = self.bases.reshape(self.n_concepts, -1).to(codes.device, codes.dtype)
        return torch.einsum("bkhw,kc->bchw", codes, full)

    def head(self, codes: Tensor) -> Tensor:
        """Logits from (possibly perturbed) codes: the B-cos network after the layer on U W."""
        with self.model.bcos_mode():
            return self._chain.tail(self.layer, self.reconstruct(codes))

    def contributions(self, codes: Tensor, targets: Tensor | int) -> Tensor:
        """(B, K) gradient x codes of the target logits in explanation mode (sums to the logit
        minus the bias: the head is linear in the codes there)."""
        from fact_model.concepts import head_contributions

        return head_contributions(self.model, self.head, codes, targets, "BKHW")

    def presence(self, images: Tensor) -> Tensor:
        """(B, K) concept presence: codes summed over positions."""
        return self.codes(images).sum((2, 3))

    def attributions(
        self, images: Tensor, concepts: int | Sequence[int] | Tensor, *, keep_weights: bool = False
    ) -> ConceptAttributions:
        """NMF coefficient maps of ``concepts`` (int, (M,) or (B, M)) upsampled (bilinear) to
        the input size (as in CRAFT); ``value`` is the presence; ``keep_weights`` is ignored
        (there are no dynamic linear maps)."""
        b = images.shape[0]
        ids = torch.as_tensor(concepts, dtype=torch.long, device=images.device)
        ids = ids.reshape(1, -1).expand(b, -1) if ids.ndim < 2 else ids
        if ids.shape[0] != b:
            raise ValueError(f"concepts must be an int, (M,) or ({b}, M), got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_concepts):
            raise ValueError(f"concept ids must lie in [0, {self.n_concepts})")
        codes = self.codes(images)
        sel = codes.gather(1, ids[:, :, None, None].expand(-1, -1, *codes.shape[2:]))
        maps = F.interpolate(sel, size=images.shape[-2:], mode="bilinear", align_corners=False)
        value = sel.sum((2, 3))
        # Upsampled maps are not a decomposition of the presence: the "completeness error" is
        # only value - sum(maps) (bilinear upsampling multiplies the sum by about the area ratio).
        return ConceptAttributions(
            self.layer, ids, value, maps, None, torch.zeros_like(value), value - maps.sum((2, 3))
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``<path>.safetensors`` (the bases) and ``<path>.json`` (settings), atomically."""
        p = Path(path)
        with atomic_path(p.with_suffix(".safetensors")) as tmp:
            save_file({"bases": self.bases.contiguous()}, str(tmp), metadata={"format": FORMAT})
        meta = {
            "format": FORMAT, "layer": self.layer, "classes": self.classes,
            "n_components": self.n_components, "basis": self.basis, "max_iter": self.max_iter,
            "fit_report": self.fit_report,
        }  # fmt: skip
        atomic_write_json(p.with_suffix(".json"), meta)
        return p

    @classmethod
    def load(
        cls, model: FaCT, path: str | os.PathLike[str], *, basis: Basis | None = None
    ) -> CraftConcepts:
        """Read a :meth:`save` d CRAFT for ``model`` (its layer must match the model)."""
        p = Path(path)
        js, st = p.with_suffix(".json"), p.with_suffix(".safetensors")
        if not js.exists() or not st.exists():
            raise FileNotFoundError(f"no saved CRAFT at {p} (need {js.name} and {st.name})")
        meta = json.loads(js.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{js} is not a {FORMAT} file (format {meta.get('format')!r})")
        return cls(
            model,
            meta["layer"],
            load_file(str(st))["bases"],
            meta["classes"],
            basis=basis or meta["basis"],
            max_iter=int(meta["max_iter"]),
            fit_report=meta.get("fit_report"),
        )
