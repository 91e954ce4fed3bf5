"""Worker for test_fact_model_distributed.py: concept statistics, C2 and concept deletion of a
saved FaCT model on an image folder, in one process or under ``torchrun`` (gloo)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import c2score
import concept_deletion
from fact_model import FaCT
from fact_model.concepts import LayerConcepts
from fact_model.consistency import c2_score, deletion
from fact_model.data import IndexedImages, eval_transform_for, open_dataset
from fact_model.stats import concept_statistics
from topk_sae import distributed as dist


class PixelFeatures:
    """A fixed random per-pixel map of RGB (plus position) to 8 features."""

    patch_size = 2
    dim = 8

    def __init__(self) -> None:
        self.w = torch.randn(8, 5, generator=torch.Generator().manual_seed(7))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        inp = torch.cat([x, yy.expand(b, 1, h, w), xx.expand(b, 1, h, w)], dim=1)
        return torch.tanh(torch.einsum("dc,bchw->bdhw", self.w, inp)) + 0.5


def floats(t: torch.Tensor) -> list:
    return [None if math.isnan(v) else v for v in t.double().tolist()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_from_env("cpu")
    torch.set_num_threads(1)
    model = FaCT.from_pretrained(args.model).eval()
    data = IndexedImages(open_dataset(f"imagefolder:{args.images}"), eval_transform_for(model))
    concepts = LayerConcepts(model, model.layers[0])
    out = Path(args.out)
    st = concept_statistics(concepts, data, top_k=4, extent_images=2, batch_size=4, progress=False)
    c2 = c2_score(
        concepts, data, PixelFeatures(), batch_size=4, work_dir=out / "c2",
        config=c2score.EvalConfig(
            selection=c2score.SelectionConfig(top_fraction=0.5, min_images=2),
            batch_size=4, progress=False,
        ),
    )  # fmt: skip
    cfg = concept_deletion.ProtocolConfig(
        n_classes=3, per_class=3,
        comparison=concept_deletion.ComparisonConfig(
            measures=("contribution", "saliency", "random"), schedule="linear", n_steps=6
        ),
    )  # fmt: skip
    curves = deletion(concepts, data, out / "deletion", cfg, progress=False)
    result = {
        "stats": {
            "n_images": st.n_images,
            "frequency": floats(st.frequency),
            "entropy": floats(st.entropy),
            "extent": floats(st.spatial_extent),
            "top_ids": st.top_images.tolist(),
            "top_values": floats(st.top_values.flatten()),
            "skipped": st.skipped,
        },
        "c2": {"c2": c2.c2, "consistency": c2.consistency, "ids": c2.concept_ids,
               "used": c2.n_images_used},
        "deletion": {f"{c.measure}|{c.mode}": c.auc_score for c in curves},
    }  # fmt: skip
    (out / f"rank{dist.rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
