"""Sobol concept importance: through the concept head from cached codes vs re-running the network.

One image of a B-cos ResNet-50 (``bcos_layers.models.create("resnet50")``, random weights: only
time matters) with a bias-free TopK concept layer of K = 4096 concepts after ``layer3``
(Block 3/4, TopK 32) or ``layer4`` (Block 4/4, TopK 16), as in FaCT's Table A1:

    codes = TopK(ReLU(E f(x)))        f = stem..layer3 (or ..layer4), E: 1x1 conv C -> K
    h(u)  = rest(D u)                 D: 1x1 conv K -> C (bias-free), rest = [layer4] + classifier

Both sides estimate the same Sobol total indices (Jansen estimator, the package's default
i.i.d. uniform design with the same seed, concept-wise multiplicative masks) with the same
chunking (the head's cost does not depend on the design's values):

* cached: ``concept_deletion.sobol_total_indices`` -- codes computed once, every masked code
  goes through ``h`` only;
* naive: every masked row re-runs the whole network on the input image, masking the code at the
  concept layer (backbone, encoder and TopK recomputed each time).

A full estimate needs ``N (K + 1)`` head evaluations per image (N designs); on a shared 2-core
CPU that is hours for the naive side, so both sides are timed on the rows of a subset of
concepts (``--concepts``; same design, so the indices of those concepts are identical to the
full estimate's) and the full design is extrapolated: cached = codes once + rows x (head cost
per row), naive = rows x (network cost per row). The script checks that both sides give the same
indices and prints medians of ``--repeats`` interleaved runs and their ratios, in wall-clock and
in process CPU time (on a machine shared with other jobs, CPU time is the stable measure of the
work done; one torch thread by default, as oversubscribed threads distort both).

    uv run --all-packages python benchmarks/deletion_speed.py [--size 224] [--layers layer3 layer4]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bcos_layers.models import create
from concept_deletion import (
    ImportanceConfig,
    apply_masks,
    jansen_total_indices,
    sobol_total_indices,
)
from concept_deletion.head import rows_per_chunk

TOPK = {"layer3": 32, "layer4": 16}
CHANNELS = {"layer3": 1024, "layer4": 2048}


class ConceptResNet(nn.Module):
    """B-cos ResNet-50 split at a bias-free TopK concept layer of ``k`` concepts."""

    def __init__(self, layer: str, n_concepts: int) -> None:
        super().__init__()
        self.net = create("resnet50").eval()
        self.layer, self.topk = layer, TOPK[layer]
        c = CHANNELS[layer]
        gen = torch.Generator().manual_seed(0)
        self.encoder = nn.Conv2d(c, n_concepts, 1, bias=False)
        self.decoder = nn.Conv2d(n_concepts, c, 1, bias=False)
        with torch.no_grad():
            self.encoder.weight.copy_(
                torch.randn(self.encoder.weight.shape, generator=gen) / c**0.5
            )
            self.decoder.weight.copy_(
                torch.randn(self.decoder.weight.shape, generator=gen) / self.topk**0.5
            )
        self.eval()

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        """Rescale encoder and decoder so that codes and logits are O(1) for ``x``.

        A randomly initialised B-cos network shrinks activations by orders of magnitude; every
        layer after the stem is positively homogeneous, so rescaling keeps the architecture and
        the cost and makes the index check below non-trivial.
        """
        self.encoder.weight /= self.codes(x).abs().max().clamp_min(1e-30)
        logits = self.head(self.codes(x))
        self.decoder.weight /= logits.std().clamp_min(1e-30)

    def features(self, x: Tensor) -> Tensor:
        n = self.net
        f = n.pool(n.bn1(n.conv1(x)))
        f = n.layer3(n.layer2(n.layer1(f)))
        return n.layer4(f) if self.layer == "layer4" else f

    def codes(self, x: Tensor) -> Tensor:
        z = torch.relu(self.encoder(self.features(x)))
        vals, idx = z.topk(self.topk, dim=1)
        return torch.zeros_like(z).scatter_(1, idx, vals)

    def head(self, codes: Tensor) -> Tensor:
        f = self.decoder(codes)
        if self.layer == "layer3":
            f = self.net.layer4(f)
        return self.net.forward_head(f)


def timed(fn: Callable[[], Tensor]) -> tuple[float, float, Tensor]:
    """Wall-clock and process CPU seconds of ``fn()`` (CPU time is robust to a shared machine)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def bench_layer(args: argparse.Namespace, layer: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = ConceptResNet(layer, args.n_concepts)
    img = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    x = torch.cat([img, 1 - img], dim=1)  # B-cos input: RGB + inverse
    model.calibrate(x)
    with torch.no_grad():
        codes = model.codes(x)
        target = int(model.head(codes).argmax(1))
    k = codes.shape[1]
    active = torch.nonzero(codes[0].flatten(1).any(1)).flatten()
    cfg = ImportanceConfig(
        sobol_designs=args.designs, skip_inactive=False, max_elements=args.max_elements
    )
    chunk = rows_per_chunk(tuple(codes.shape[1:]), args.max_elements)

    def cached(subset: Tensor) -> Tensor:
        # Codes once per image, then every masked row through h only.
        with torch.no_grad():
            u = model.codes(x)
        return sobol_total_indices(model.head, u, target, "BKHW", cfg, concepts=subset)[0]

    def naive_f(masks: Tensor) -> Tensor:
        with torch.no_grad():
            u = model.codes(x.expand(masks.shape[0], -1, -1, -1))
            return model.head(apply_masks(u, masks.to(u.dtype), "BKHW"))[:, target]

    def naive(subset: Tensor) -> Tensor:
        return jansen_total_indices(
            naive_f, k, args.designs, indices=subset, chunk_rows=chunk, dtype=torch.float64
        ).to(codes.dtype)

    subset = active[: args.concepts]
    rows = args.designs * (subset.numel() + 1)
    full_rows = args.designs * (k + 1)
    skip_rows = args.designs * (active.numel() + 1)
    print(
        f"\n[{layer}] input {args.size}x{args.size}, code {tuple(codes.shape[1:])}, "
        f"TopK {model.topk}, target {target}, {active.numel()}/{k} concepts active, "
        f"{args.designs} designs, timed rows {rows} (of {full_rows} for all K), chunk {chunk}"
    )
    cached(active[:1])  # warm-up of both paths
    naive(active[:1])
    wall_c, wall_n, cpu_c, cpu_n, cpu_codes = [], [], [], [], []
    for r in range(args.repeats):
        with torch.no_grad():
            cpu_codes.append(timed(lambda: model.codes(x))[1])
        wc, cc, st_c = timed(lambda: cached(subset))
        wn, cn, st_n = timed(lambda: naive(subset))
        wall_c.append(wc)
        wall_n.append(wn)
        cpu_c.append(cc)
        cpu_n.append(cn)
        print(
            f"  run {r}: cached {wc:6.2f} s wall {cc:6.2f} s cpu | naive {wn:6.2f} s wall "
            f"{cn:6.2f} s cpu | ratio wall {wn / wc:5.2f} cpu {cn / cc:5.2f}"
        )
    err = (st_c[subset] - st_n[subset]).abs().max().item()
    scale = st_n[subset].abs().max().item()
    assert err <= 1e-3 * max(scale, 1e-12), f"cached and naive indices differ by {err}"
    med = statistics.median
    mc, mn, m_codes = med(cpu_c), med(cpu_n), med(cpu_codes)
    # Cached = codes once + one head evaluation per row; naive = one network pass per row.
    per_c, per_n = (mc - m_codes) / rows, mn / rows
    full_c, full_n = m_codes + per_c * full_rows, per_n * full_rows
    skip_c = m_codes + per_c * skip_rows
    print(
        f"  median wall: cached {med(wall_c):.2f} s, naive {med(wall_n):.2f} s, ratio "
        f"{med(wall_n) / med(wall_c):.2f}x\n"
        f"  median cpu:  cached {mc:.2f} s (codes {m_codes:.3f} s), naive {mn:.2f} s, "
        f"ratio {mn / mc:.2f}x\n"
        f"  indices: max |ST_cached - ST_naive| = {err:.2e}, max ST {scale:.3g}\n"
        f"  cpu per row: head only {1e3 * per_c:.1f} ms, whole network {1e3 * per_n:.1f} ms "
        f"({per_n / per_c:.2f}x)\n"
        f"  full design ({full_rows} rows), extrapolated cpu: cached {full_c:.0f} s, naive "
        f"{full_n:.0f} s, ratio {full_n / full_c:.2f}x; cached with skip_inactive "
        f"({skip_rows} rows): {skip_c:.0f} s, ratio {full_n / skip_c:.1f}x"
    )
    return {"cached_cpu_s": mc, "naive_cpu_s": mn, "full_ratio": full_n / full_c}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224, help="input resolution")
    p.add_argument("--n-concepts", type=int, default=4096, help="K")
    p.add_argument("--designs", type=int, default=4, help="Sobol designs N (paper: 4)")
    p.add_argument("--concepts", type=int, default=4, help="concepts whose rows are timed")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-elements", type=int, default=2**25, help="memory budget per forward")
    p.add_argument("--layers", nargs="+", default=["layer3", "layer4"], choices=sorted(TOPK))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable CPU time)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    for layer in args.layers:
        bench_layer(args, layer)


if __name__ == "__main__":
    main()
