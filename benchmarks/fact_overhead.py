"""FaCT forward overhead vs its B-cos backbone, next to the floor set by the SAE encoder's FLOPs.

Run from the repository root:

    uv run python benchmarks/fact_overhead.py [--device cpu|cuda] [--repeats 7] [--threads N]

Cases (the paper's late layers): B-cos ResNet-50 ``layer4`` and DenseNet-121 ``features.norm5``
with a 16,384-latent, k = 16 bias-free TopK SAE, batch 8, 224 x 224, random weights (timing does
not depend on them).

* ``bcos``: the backbone's forward, ``torch.no_grad()``.
* ``fact``: the FaCT model's forward (backbone + SAE encode / sparse decode at the layer).
* ``matmul``: the SAE encoder's only dense operation alone -- ``(B*H*W, C) @ (C, 16384)`` --
  timed as a plain matmul. Its time is the floor of the overhead: the encoder's extra
  floating-point operations at this machine's matmul rate.
* ``overhead / floor`` = (fact - bcos) / matmul; target <= 1.25 (the decode is sparse and the
  selection, gather and reshapes cost little).
* ``explanation``: all concept contributions of the predicted logit (Eq. 9) plus one concept's
  input attribution (Eq. 12), relative to one FaCT forward pass.

The three forward timings are interleaved (bcos, fact, matmul, bcos, ...) and reported as medians
of wall-clock time, so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

CASES = {"resnet50": "layer4", "densenet121": "features.norm5"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def run_case(arch: str, layer: str, args: argparse.Namespace, device: torch.device) -> dict:
    import bcos_layers
    from fact_model import FaCT, concept_attributions, concept_contributions
    from topk_sae import BiasFreeTopKSAE

    torch.manual_seed(0)
    backbone = bcos_layers.create(arch).to(device)
    x = torch.rand(args.batch, 6, args.size, args.size, device=device)
    feats = {}
    h = backbone.get_submodule(layer).register_forward_hook(
        lambda m, i, o: feats.setdefault("f", o)
    )
    with torch.no_grad():
        backbone(x)
    h.remove()
    f = feats["f"]
    c, hw = f.shape[1], f.shape[2] * f.shape[3]
    sae = BiasFreeTopKSAE(c, args.latents, args.k).to(device)
    model = FaCT(backbone, {layer: sae}).to(device).eval()
    rows = torch.randn(args.batch * hw, c, device=device)
    w_enc = sae.W_enc.detach()

    def bcos() -> None:
        with torch.no_grad():
            backbone(x)

    def fact() -> None:
        with torch.no_grad():
            model(x)

    def matmul() -> None:
        with torch.no_grad():
            rows @ w_enc.T

    def explanation() -> None:
        out = concept_contributions(model, x, layer=layer)
        concept_attributions(
            model, x, out.contributions[:, 0].argmax(1)[:, None], layer=layer, keep_weights=False
        )

    for _ in range(args.warmup):
        bcos(), fact(), matmul()
    times: dict[str, list[float]] = {"bcos": [], "fact": [], "matmul": []}
    for _ in range(args.repeats):
        for name, fn in (("bcos", bcos), ("fact", fact), ("matmul", matmul)):
            times[name].append(_time(fn, device))
    explanation()
    expl = [_time(explanation, device) for _ in range(max(3, args.repeats // 2))]
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = 2 * args.batch * hw * c * args.latents
    res = {
        "arch": arch,
        "layer": layer,
        "channels": c,
        "positions": hw,
        "bcos_s": med["bcos"],
        "fact_s": med["fact"],
        "matmul_s": med["matmul"],
        "encoder_gflop": flops / 1e9,
        "matmul_gflops": flops / med["matmul"] / 1e9,
        "overhead_s": med["fact"] - med["bcos"],
        "overhead_over_floor": (med["fact"] - med["bcos"]) / med["matmul"],
        "fact_over_bcos": med["fact"] / med["bcos"],
        "explanation_s": statistics.median(expl),
        "explanation_over_forward": statistics.median(expl) / med["fact"],
    }
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--latents", type=int, default=16384)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--models", nargs="+", default=list(CASES))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    print(
        f"batch {args.batch}, {args.size}x{args.size}, SAE {args.latents} latents, k {args.k}; medians of {args.repeats}"
    )
    results = []
    header = f"{'case':28s} {'bcos s':>8s} {'fact s':>8s} {'fact/bcos':>9s} {'overhead s':>10s} {'floor s':>8s} {'ovh/floor':>9s} {'GFLOP/s':>8s} {'expl/fwd':>8s}"
    print(header)
    for arch in args.models:
        r = run_case(arch, CASES[arch], args, device)
        results.append(r)
        print(
            f"{arch + ' ' + r['layer']:28s} {r['bcos_s']:8.3f} {r['fact_s']:8.3f} {r['fact_over_bcos']:9.3f} "
            f"{r['overhead_s']:10.4f} {r['matmul_s']:8.4f} {r['overhead_over_floor']:9.2f} "
            f"{r['matmul_gflops']:8.1f} {r['explanation_over_forward']:8.2f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
