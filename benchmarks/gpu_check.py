"""One prepared GPU check of the whole workspace: correctness on the device against the CPU,
timings at the paper's sizes, and the device's matrix-multiply rates.

Run from the repository root on a machine with one NVIDIA GPU (sized to finish well within 5
minutes; timings still pending after ``--budget-s`` seconds are skipped; every check and timing
reports its failure and the run goes on):

    uv run python benchmarks/gpu_check.py --json gpu_check.json

``--device cpu --smoke`` runs every check and every timing at tiny sizes on the CPU (the
"device" results are then compared with a second CPU run); the integration test
``tests/integration/test_gpu_check_smoke.py`` does exactly that. The exit status is 1 when a
correctness check fails (or raises), 2 when the device cannot be used at all.

1. **Correctness** (float32; TF32 off for cuBLAS and cuDNN while checking). Every check prints
   PASS / FAIL with its largest relative error: ``max |device - cpu| / max |cpu|`` over a
   tensor (the error relative to the scale of the reference, so that entries that are close to
   zero do not dominate), the worst over the tensors the check compares.

   * bcos-layers: the registry's tiny ResNet (bottleneck), DenseNet and ViTc, BatchNorm
     calibrated on one batch (unit-variance activations) -- logits and the explanation
     (``bcos_layers.explain``: input contributions of the CPU's predicted class) on the device
     against the CPU, and the explanation-mode exactness on the device: the logit equals the sum
     of input-gradient x input contributions plus the logit bias (and, for the ViT, the
     positional-embedding term), relative to the logit scale (``|logit - bias|``).
   * topk-sae: a few deterministic ``topk_sae.train`` steps (same data, same seed, AuxK active
     after the first steps) on the CPU and the device -> weights and loss history agree; the
     sparse kernels (``gather_preacts``, ``sparse_decode``) forward and backward on the device
     against the CPU and against dense autograd on the device; ``autocast_bf16=True`` training
     on the device -> loss history close to the float32 one (looser tolerance: a bfloat16 matmul
     may select other latents at near-ties).
   * c2score: ``evaluate_c2`` on a planted problem (one-hot part masks as oracle features, a
     part-aligned concept and a random one) and with a tiny random DINOv2 + bilinear extractor,
     on the CPU and the device -> C2, the per-concept consistencies and the baseline agree (and
     the aligned concept is consistent, > 0.99).
   * concept-deletion: deletion curves (Gradient x Input and Sobol orders) of a small bias-free
     linear head, and the "contribution" deletion curve of a tiny FaCT model's concept head
     (SAE decoder + rest of the B-cos network), on the CPU and the device.
   * fact-model: tiny FaCT models (tiny backbone, briefly trained 64-latent SAEs at two layers)
     of the three families -> logits, ``concept_contributions`` (Eq. 9) and
     ``concept_attributions`` (Eq. 12) agree, and the completeness errors on the device are at
     float32 round-off (< 1e-4 relative to the logit / concept-value scale). An image whose
     TopK selection differs between CPU and device (a near-tie of two pre-activations, decided
     either way by round-off) is left out of the comparison and counted; more than one fails.
     ``--smoke`` builds the ResNet and ViT models only.

2. **Timings** at the paper's sizes (medians of ``--repeats`` after warm-up, with
   ``torch.cuda.synchronize`` around every call): the SAE training step
   (``topk_sae.trainer.training_step``, d_in 2048, 16,384 latents, k 16, batch 32,768; fp32,
   TF32 and bf16 autocast; AuxK inactive: no dead latent), the SAE encoder matmul alone, the
   B-cos ResNet-50 forward and the FaCT forward (16,384-latent k=16 SAE at ``layer4``, batch
   64, 224 x 224, ``torch.no_grad``), their difference (the FaCT overhead, next to its floor:
   the encoder matmul at that shape) and one explanation (all concept contributions of the
   predicted logit + one concept's input attribution, as in ``benchmarks/fact_overhead.py``).
   Random weights (BatchNorm calibrated): timings do not depend on them.

3. **Matmul rates**: square ``--matmul-size`` matmuls in fp32 (TF32 off), TF32 and bf16. The
   final table lists every timed operation with its FLOPs (counted with
   ``torch.utils.flop_counter.FlopCounterMode``, which counts dense matmuls and convolutions
   only -- the SAE's sparse decode and sparse encoder backward are not in the count; for the
   explanation, whose backward to the input FlopCounterMode's module tracker cannot follow,
   the same per-op formulas, ``flop_registry``, under a plain dispatch mode; or analytic where
   marked), seconds, TFLOP/s and the fraction of the measured fp32 and bf16 matmul rates.

``--json PATH`` writes everything (environment, checks, timings, rates); the file is rewritten
after every check and timing, so an interrupted run leaves what it had.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Sizes:
    """Every size the script uses; ``FULL`` is the paper's, ``SMOKE`` runs on a CPU in seconds."""

    matmul: int
    matmul_inner: int
    sae_d: int
    sae_latents: int
    sae_k: int
    sae_batch: int
    fact_arch: str
    fact_layer: str
    fact_batch: int
    fact_size: int
    fact_latents: int
    fact_k: int
    warmup: int
    repeats: int
    fact_families: tuple[str, ...]


FULL = Sizes(
    matmul=8192, matmul_inner=10,
    sae_d=2048, sae_latents=16384, sae_k=16, sae_batch=32768,
    fact_arch="resnet50", fact_layer="layer4", fact_batch=64, fact_size=224,
    fact_latents=16384, fact_k=16,
    warmup=3, repeats=10,
    fact_families=("resnet", "densenet", "vit"),
)  # fmt: skip
SMOKE = Sizes(
    matmul=256, matmul_inner=2,
    sae_d=64, sae_latents=1024, sae_k=16, sae_batch=512,
    fact_arch="resnet50", fact_layer="layer4", fact_batch=2, fact_size=32,
    fact_latents=512, fact_k=16,
    warmup=1, repeats=3,
    fact_families=("resnet", "vit"),
)  # fmt: skip

TINY_SIZE = 32  # image side of the tiny models
FAMILIES: dict[str, tuple[str, tuple[str, str]]] = {
    # family -> (registry name, (early layer, late layer)); as in the fact-model tests
    "resnet": ("tiny_resnet_bottleneck", ("layer2", "layer3")),
    "densenet": ("tiny_densenet", ("features.transition2", "features.norm5")),
    "vit": ("tiny_vitc", ("0.transformer.encoder_0", "0.transformer.encoder_1")),
}

TOL = 1e-4  # float32, CPU vs device: different summation orders only
TOL_TRAIN = 1e-3  # weights after several Adam steps (Adam divides by the gradient's scale)
TOL_BF16 = 3e-2  # bf16 encoder matmul vs fp32: other latents selected at near-ties
TOL_COMPLETE = 1e-4  # completeness error relative to the explained scale
DATA_SEED = 5  # of the SAE training data (see _train_tiny)


def say(msg: str = "") -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for cuBLAS matmuls and cuDNN convolutions on or off (legacy flags only: mixing
    them with the newer ``fp32_precision`` API is an error in recent torch)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel_err(actual: Any, expected: Any) -> float:
    """``max |actual - expected| / max |expected|`` (absolute when the reference is all 0);
    ``inf`` for a shape mismatch or a non-finite entry that the reference does not have."""
    a = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    e = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    fa, fe = torch.isfinite(a), torch.isfinite(e)
    if not bool((fa == fe).all()) or not bool((a[~fa] == e[~fe]).all()):
        return math.inf
    a, e = a[fe], e[fe]
    if a.numel() == 0:
        return 0.0
    diff = float((a - e).abs().max())
    scale = float(e.abs().max())
    return diff / scale if scale > 0 else diff


def images(n: int, seed: int, size: int = TINY_SIZE) -> Tensor:
    """B-cos inputs [x, 1 - x] of random RGB images."""
    import bcos_layers

    g = torch.Generator().manual_seed(seed)
    return bcos_layers.AddInverse()(torch.rand(n, 3, size, size, generator=g))


def calibrate(model: nn.Module, x: Tensor) -> nn.Module:
    """Every BatchNorm's running statistics from one batch (unit-variance activations), so that
    logits and contributions are O(1) rather than vanishingly small at random initialisation."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None  # cumulative average: one batch sets the statistics
        m.num_batches_tracked.zero_()
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    for m in bns:
        m.momentum = 0.1
    return model


def layer_rows(model: nn.Module, layer: str, x: Tensor) -> Tensor:
    """Rows (N, C) of a layer's output (maps flattened over positions, tokens over tokens)."""
    out: dict[str, Tensor] = {}
    h = model.get_submodule(layer).register_forward_hook(
        lambda m, i, o: out.setdefault("f", o.detach().clone())
    )
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    f = out["f"]
    if f.ndim == 4:
        return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    return f.reshape(-1, f.shape[-1])


def _tail(exc: BaseException, lines: int = 6) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return "".join(tb[-lines:]).strip()


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- report


class Report:
    """Collects checks and timings, prints them as they come, rewrites the JSON each time."""

    def __init__(self, json_path: str | None, env: dict[str, Any]) -> None:
        self.json_path = json_path
        self.env = env
        self.checks: list[dict[str, Any]] = []
        self.timings: list[dict[str, Any]] = []
        self.rates: dict[str, float] = {}
        self.summary: dict[str, Any] = {}
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def save(self) -> None:
        if not self.json_path:
            return
        data = {
            "environment": self.env,
            "ok": self.ok,
            "elapsed_s": self.elapsed(),
            "checks": self.checks,
            "matmul_rates_tflops": self.rates,
            "timings": self.timings,
            "summary": self.summary,
        }
        path = Path(self.json_path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(
                json.dumps(_finite(data), indent=1, default=_json_default, allow_nan=False)
            )
            os.replace(tmp, path)
        except OSError as e:  # never lose the run over the report file
            say(f"  (could not write {path}: {e})")

    @property
    def ok(self) -> bool:
        return all(c["status"] == "pass" for c in self.checks)

    # -- checks
    def check(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Run one correctness check; ``fn`` returns ``{"errors": {what: (err, tol)},
        "conditions": {what: bool}, "info": {...}}``. Exceptions are reported, not raised."""
        t0 = time.perf_counter()
        row: dict[str, Any] = {"name": name}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = fn()
            row["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:200] for w in caught})
            errors = {k: (float(e), float(t)) for k, (e, t) in res.get("errors", {}).items()}
            conditions = {k: bool(v) for k, v in res.get("conditions", {}).items()}
            ok = all(math.isfinite(e) and e <= t for e, t in errors.values()) and all(
                conditions.values()
            )
            worst = max(errors.items(), key=lambda kv: _ratio(*kv[1]), default=None)
            row.update(
                status="pass" if ok else "fail",
                max_rel_err=max((e for e, _ in errors.values()), default=0.0),
                worst=worst[0] if worst else None,
                tol=worst[1][1] if worst else None,
                errors={k: {"rel_err": e, "tol": t} for k, (e, t) in errors.items()},
                conditions=conditions,
                info=res.get("info", {}),
            )
        except Exception as exc:
            row.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=_tail(exc))
        row["seconds"] = time.perf_counter() - t0
        self.checks.append(row)
        self._print_check(row)
        self.save()

    def _print_check(self, row: dict[str, Any]) -> None:
        status = {"pass": "PASS ", "fail": "FAIL ", "error": "ERROR"}[row["status"]]
        if row["status"] == "error":
            say(f"{status} {row['name']:52s} {row['error']}  [{row['seconds']:.1f} s]")
            for line in row["traceback"].splitlines()[-4:]:
                say(f"        {line}")
            return
        tol = f" (tol {row['tol']:.0e}, {row['worst']})" if row["worst"] else ""
        say(
            f"{status} {row['name']:52s} max rel err {row['max_rel_err']:.2e}{tol}  "
            f"[{row['seconds']:.1f} s]"
        )
        parts = [f"{k} {v['rel_err']:.1e}" for k, v in row["errors"].items()]
        parts += [f"{k}: {'ok' if v else 'NO'}" for k, v in row["conditions"].items()]
        if row["status"] == "fail":  # the failing quantities, then the rest
            bad = [k for k, v in row["errors"].items() if not v["rel_err"] <= v["tol"]]
            bad += [k for k, v in row["conditions"].items() if not v]
            say("        failing: " + ", ".join(bad))
        if row["status"] == "fail" or 1 < len(parts) <= 8:
            say("        " + "; ".join(parts))
        elif len(parts) > 8:
            say(f"        {len(parts)} quantities compared, all within tolerance (see the JSON)")
        if row["info"]:
            say("        " + ", ".join(f"{k}={_fmt(v)}" for k, v in row["info"].items()))

    # -- timings
    def timing(self, name: str, fn: Callable[[], dict[str, Any]], budget_s: float) -> None:
        """Run one timing; ``fn`` returns ``{"seconds", "flops", "flop_source", ...}``."""
        row: dict[str, Any] = {"name": name}
        if self.elapsed() > budget_s:
            row.update(status="skipped", error=f"time budget of {budget_s:.0f} s spent")
            say(f"SKIP  {name} (time budget spent)")
        else:
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    row.update(fn())
                row["warnings"] = sorted(
                    {f"{w.category.__name__}: {w.message}"[:200] for w in caught}
                )
                row["status"] = "ok"
                self._rate_fractions(row)
            except Exception as exc:
                row.update(
                    status="error", error=f"{type(exc).__name__}: {exc}", traceback=_tail(exc)
                )
            row["wall_s"] = time.perf_counter() - t0
            self._print_timing(row)
        self.timings.append(row)
        self.save()

    def _rate_fractions(self, row: dict[str, Any]) -> None:
        s, f = row.get("seconds"), row.get("flops")
        row["tflops"] = f / s / 1e12 if s and f and s > 0 else None  # an overhead may be <= 0
        for key in ("fp32", "tf32", "bf16"):
            rate = self.rates.get(key)
            row[f"frac_{key}"] = row["tflops"] / rate if row["tflops"] and rate else None

    def _print_timing(self, row: dict[str, Any]) -> None:
        if row["status"] != "ok":
            say(f"ERROR {row['name']}: {row.get('error')}")
            for line in row.get("traceback", "").splitlines()[-4:]:
                say(f"        {line}")
            return
        rate = f"{row['tflops']:.2f} TFLOP/s" if row.get("tflops") else ""
        say(f"time  {row['name']:52s} {row['seconds'] * 1e3:10.3f} ms  {rate}")


def _ratio(err: float, tol: float) -> float:
    return math.inf if not math.isfinite(err) else err / tol


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _finite(o: Any) -> Any:
    """The report with NaN / inf floats as ``null`` (strict JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (torch.Tensor,)):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


# ----------------------------------------------------------------------------- environment


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": None,
        "device": str(device),
        "device_name": "cpu",
        "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"),
    }
    with contextlib.suppress(Exception):
        env["cudnn"] = torch.backends.cudnn.version()
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(
            device_name=torch.cuda.get_device_name(device),
            capability=f"{p.major}.{p.minor}",
            multiprocessors=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
        )
        with contextlib.suppress(Exception):
            import subprocess

            query = "name,driver_version,clocks.max.sm,clocks.sm,power.limit,temperature.gpu"
            out = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=15,
            ).stdout.strip()  # fmt: skip
            env["nvidia_smi"] = {"query": query, "output": out}
    for dist in ("bcos-layers", "topk-sae", "fact-c2score", "concept-deletion", "fact-model"):
        with contextlib.suppress(Exception):
            import importlib.metadata as md

            env[f"version_{dist}"] = md.version(dist)
    with contextlib.suppress(Exception):
        import subprocess

        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        ).stdout.strip()
    return env


# ============================================================================= 1. correctness


class Context:
    """What the checks share: the device, and tiny models built once on the CPU."""

    def __init__(self, device: torch.device, sizes: Sizes) -> None:
        self.device = device
        self.sizes = sizes
        self._backbones: dict[str, nn.Module] = {}
        self._facts: dict[str, Any] = {}

    def backbone(self, family: str) -> nn.Module:
        if family not in self._backbones:
            import bcos_layers

            name, _ = FAMILIES[family]
            torch.manual_seed(0)
            self._backbones[family] = calibrate(bcos_layers.create(name), images(32, seed=100))
        return self._backbones[family]

    def fact(self, family: str) -> Any:
        """A tiny FaCT model (CPU) with briefly trained SAEs at both layers of the family."""
        if family not in self._facts:
            from fact_model import FaCT
            from topk_sae import TensorSource, TrainConfig, train

            bb = self.backbone(family)
            saes = {}
            for layer in FAMILIES[family][1]:
                rows = layer_rows(bb, layer, images(24, seed=200))
                cfg = TrainConfig(
                    n_latents=64, k=6, epochs=3, lr=5e-3, warmup_epochs=0.2, hold_epochs=0.2,
                    init="data", k_aux=8, progress=False, seed=0, device="cpu",
                    uncentered_warn_ratio=1e9,
                )  # fmt: skip
                with tempfile.TemporaryDirectory() as tmp:
                    sae = train(cfg, TensorSource(rows, batch_size=256, seed=0), out_dir=tmp).model
                saes[layer] = sae.eval()
            self._facts[family] = FaCT(bb, saes, input_size=TINY_SIZE).eval()
        return self._facts[family]

    def on_device(self, module: nn.Module) -> nn.Module:
        return copy.deepcopy(module).to(self.device)


# ----------------------------------------------------------------------------- bcos-layers


def check_bcos_logits(ctx: Context, family: str) -> dict[str, Any]:
    cpu = ctx.backbone(family)
    dev = ctx.on_device(cpu)
    x = images(8, seed=1)
    with torch.no_grad():
        ref = cpu(x)
        out = dev(x.to(ctx.device))
    import bcos_layers

    bias = float(bcos_layers.explain(cpu, x[:1]).bias[0])
    # relative to the pre-bias logits: the constant bias would hide errors in the rest
    err = rel_err(out.cpu() - bias, ref - bias)
    return {
        "errors": {"logits": (err, TOL)},
        "info": {"logit_scale": float((ref - bias).abs().max())},
    }


def check_bcos_explanation(ctx: Context, family: str) -> dict[str, Any]:
    import bcos_layers

    cpu = ctx.backbone(family)
    dev = ctx.on_device(cpu)
    x = images(8, seed=2)
    ref = bcos_layers.explain(cpu, x)
    target = ref.target  # the CPU's predicted class for both
    xd = x.to(ctx.device)
    ex = bcos_layers.explain(dev, xd, target.to(ctx.device))
    return {
        "errors": {
            "contributions": (rel_err(ex.contributions, ref.contributions), TOL),
            "weights": (rel_err(ex.weights, ref.weights), TOL),
            "value": (rel_err(ex.value - ex.bias, ref.value - ref.bias), TOL),
        }
    }


def check_bcos_completeness(ctx: Context, family: str) -> dict[str, Any]:
    """On the device, in explanation mode: logit == sum(x * d logit / dx) + bias (+ pos. emb.)."""
    import bcos_layers

    dev = ctx.on_device(ctx.backbone(family))
    x = images(8, seed=3).to(ctx.device)
    ex = bcos_layers.explain(dev, x)
    scale = float((ex.value - ex.bias).abs().max())
    # an independent pass through explanation_mode itself
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad(), bcos_layers.explanation_mode(dev):
        logits = dev(xg)
        y = logits.gather(1, ex.target[:, None]).sum()
        (g,) = torch.autograd.grad(y, xg)
    manual = (g * x).flatten(1).sum(1) + ex.bias + ex.pos_emb
    picked = logits.detach().gather(1, ex.target[:, None])[:, 0]
    return {
        "errors": {
            "explain completeness": (
                float(ex.completeness_error.abs().max()) / scale,
                TOL_COMPLETE,
            ),
            "explanation_mode grad x input": (
                float((manual - picked).abs().max()) / scale,
                TOL_COMPLETE,
            ),
        },
        "info": {"logit_scale": scale},
    }


# ----------------------------------------------------------------------------- topk-sae


def _sae_data(n: int, d: int, seed: int) -> Tensor:
    """Rows with some structure (a few directions + noise), a bias-free SAE's kind of data."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(12, d, generator=g)
    coef = torch.relu(torch.randn(n, 12, generator=g))
    return coef @ basis + 0.1 * torch.randn(n, d, generator=g)


SAE_TRAIN = {"rows": 512, "d": 32, "latents": 128, "k": 8, "batch": 128, "data_seed": DATA_SEED}


@contextlib.contextmanager
def _topk_margins(k: int, record: list[float]) -> Iterator[None]:
    """Record, for every encoder call, the smallest gap between the k-th and (k+1)-th
    pre-activation of a row (relative to the row's largest one) among rows whose k-th is > 0:
    the margin by which the TopK selection is decided. A device whose float32 round-off is far
    below it selects the same latents as the CPU."""
    from topk_sae import BiasFreeTopKSAE

    original = BiasFreeTopKSAE.preactivations

    def watched(self: Any, xs_ND: Tensor, *, bf16: bool = False) -> Tensor:
        pre = original(self, xs_ND, bf16=bf16)
        top = pre.topk(k + 1, dim=1).values
        live = top[:, k - 1] > 0
        if bool(live.any()):
            gap = (top[:, k - 1] - top[:, k]) / pre.abs().amax(dim=1).clamp_min(1e-30)
            record.append(float(gap[live].min()))
        return pre

    BiasFreeTopKSAE.preactivations = watched  # type: ignore[method-assign]
    try:
        yield
    finally:
        BiasFreeTopKSAE.preactivations = original  # type: ignore[method-assign]


def _train_tiny(
    device: torch.device, bf16: bool = False, margins: list[float] | None = None
) -> Any:
    """A few ``topk_sae.train`` steps: 512 rows, batches of 128, 2 epochs (8 steps); latents
    are dead after 256 inputs without firing, so AuxK is active from the third step. AuxK's
    ``k_aux`` is the dictionary size: it takes every dead latent, so only the main TopK
    selection could differ between devices, and the data seed is one whose selections are
    decided by a wide margin (checked: ``min_topk_margin``)."""
    from topk_sae import TensorSource, TrainConfig, train

    c = SAE_TRAIN
    rows = _sae_data(c["rows"], c["d"], seed=c["data_seed"])
    cfg = TrainConfig(
        n_latents=c["latents"], k=c["k"], epochs=2, lr=2e-3, warmup_epochs=0.25,
        hold_epochs=0.25, k_aux=c["latents"], dead_after_tokens=256, progress=False, seed=0,
        device=str(device), autocast_bf16=bf16, log_every=1, checkpoint_every=10**6,
        uncentered_warn_ratio=1e9,
    )  # fmt: skip
    watch = _topk_margins(c["k"], margins) if margins is not None else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as tmp, watch:
        return train(cfg, TensorSource(rows, batch_size=c["batch"], seed=0), out_dir=tmp)


def _history(res: Any, key: str) -> Tensor:
    return torch.tensor([h[key] for h in res.history], dtype=torch.float64)


def check_sae_train(ctx: Context) -> dict[str, Any]:
    margins: list[float] = []
    ref = _train_tiny(torch.device("cpu"), margins=margins)
    dev = _train_tiny(ctx.device)
    ctx._sae_train_device = dev  # reused by the bf16 check
    sd_ref, sd = ref.model.state_dict(), dev.model.state_dict()
    aux = _history(ref, "auxk")
    return {
        "errors": {
            "W_enc": (rel_err(sd["W_enc"], sd_ref["W_enc"]), TOL_TRAIN),
            "W_dec": (rel_err(sd["W_dec"], sd_ref["W_dec"]), TOL_TRAIN),
            "input_scale": (rel_err(sd["input_scale"], sd_ref["input_scale"]), TOL),
            "loss history": (rel_err(_history(dev, "loss"), _history(ref, "loss")), TOL),
            "auxk history": (rel_err(_history(dev, "auxk"), aux), TOL_TRAIN),
        },
        "conditions": {
            "same number of steps": len(dev.history) == len(ref.history) > 0,
            "AuxK was active": bool((aux > 0).any()),
        },
        "info": {
            "steps": len(ref.history),
            "final_loss": float(_history(ref, "loss")[-1]),
            "min_topk_margin": min(margins, default=math.nan),
        },
    }


def check_sae_bf16(ctx: Context) -> dict[str, Any]:
    fp32 = getattr(ctx, "_sae_train_device", None) or _train_tiny(ctx.device)
    bf16 = _train_tiny(ctx.device, bf16=True)
    l32, l16 = _history(fp32, "loss"), _history(bf16, "loss")
    return {
        "errors": {
            "loss history (bf16 vs fp32)": (rel_err(l16, l32), TOL_BF16),
            "final loss (bf16 vs fp32)": (rel_err(l16[-1:], l32[-1:]), TOL_BF16),
        },
        "conditions": {"finite": bool(torch.isfinite(l16).all())},
        "info": {"final_loss_fp32": float(l32[-1]), "final_loss_bf16": float(l16[-1])},
    }


def _kernel_pass(
    device: torch.device, dense: bool, with_preacts: bool, seed: int = 11
) -> dict[str, Tensor]:
    """Selected pre-activations and a reconstruction, forward and backward, with the sparse
    kernels (or dense autograd), on ``device``; everything returned on the CPU."""
    from topk_sae import gather_preacts, sparse_decode

    g = torch.Generator().manual_seed(seed)
    n, d, m, k = 256, 32, 128, 8
    x = torch.randn(n, d, generator=g)
    w_enc = torch.randn(m, d, generator=g) / d**0.5
    w_dec = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    idx = (x @ w_enc.T).topk(k, dim=1).indices  # the same selection everywhere
    g_out = torch.randn(n, d, generator=g)
    g_val = torch.randn(n, k, generator=g)
    xs, we, wd = (t.to(device).requires_grad_(True) for t in (x, w_enc, w_dec))
    idx_d = idx.to(device)
    if dense:
        pre = (xs @ we.T).gather(1, idx_d)
        code = torch.zeros(n, m, device=device).scatter(1, idx_d, torch.relu(pre))
        out = code @ wd
    else:
        known = None
        if with_preacts:
            with torch.no_grad():
                known = (xs @ we.T).gather(1, idx_d)
        pre = gather_preacts(xs, we, idx_d, known)
        out = sparse_decode(torch.relu(pre), idx_d, wd)
    loss = (out * g_out.to(device)).sum() + (pre * g_val.to(device)).sum()
    gx, ge, gd = torch.autograd.grad(loss, [xs, we, wd])
    return {
        "preacts": pre.detach().cpu(),
        "decode": out.detach().cpu(),
        "grad x": gx.cpu(),
        "grad W_enc": ge.cpu(),
        "grad W_dec": gd.cpu(),
    }


def check_sae_kernels(ctx: Context) -> dict[str, Any]:
    errors = {}
    for with_preacts in (False, True):
        tag = "given preacts" if with_preacts else "recomputed"
        ref = _kernel_pass(torch.device("cpu"), dense=False, with_preacts=with_preacts)
        dev = _kernel_pass(ctx.device, dense=False, with_preacts=with_preacts)
        dense = _kernel_pass(ctx.device, dense=True, with_preacts=False)
        for key in ref:
            errors[f"{key} device/cpu ({tag})"] = (rel_err(dev[key], ref[key]), TOL)
            errors[f"{key} sparse/dense ({tag})"] = (rel_err(dev[key], dense[key]), TOL)
    return {"errors": errors}


# ----------------------------------------------------------------------------- c2score


def _planted(
    n: int = 40, s: int = 28, seed: int = 0
) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """Images with three coloured parts at random places, their one-hot part masks (the
    oracle's features), activations and maps of a "head" concept and of a random blob."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.2, 0.9]])
    ims, masks = [], []
    for _ in range(n):
        label = torch.zeros(s, s, dtype=torch.long)
        for part, size in ((2, 12), (1, 6), (3, 5)):
            y, x = torch.randint(0, s - size, (2,), generator=g).tolist()
            label[y : y + size, x : x + size] = part
        ims.append((colours[label].permute(2, 0, 1) + 0.05 * torch.rand(3, s, s, generator=g)).clamp(0, 1))  # fmt: skip
        masks.append(torch.nn.functional.one_hot(label, 4).permute(2, 0, 1).float())
    masks_t = torch.stack(masks)
    head = masks_t[:, 1]
    acts = torch.stack(
        [head.sum(dim=(1, 2)) + torch.rand(n, generator=g), torch.rand(n, generator=g) + 0.1], 1
    )
    blob = torch.nn.functional.interpolate(
        torch.rand(n, 1, 4, 4, generator=g), size=(s, s), mode="bilinear"
    )[:, 0]
    maps = torch.stack([head * (0.5 + torch.rand(n, s, s, generator=g)), blob], dim=1)
    return ims, acts, maps, masks_t


def _c2_vector(res: Any) -> Tensor:
    return torch.tensor(
        [res.c2, res.mean_consistency, res.baseline_mean, *res.consistency], dtype=torch.float64
    )


def check_c2_planted(ctx: Context) -> dict[str, Any]:
    from c2score import EvalConfig, OracleFeatures, evaluate_c2

    ims, acts, maps, masks = _planted()
    oracle = OracleFeatures(masks, dim=4)
    ref = evaluate_c2(ims, acts, maps, oracle, EvalConfig(progress=False))
    dev = evaluate_c2(ims, acts, maps, oracle, EvalConfig(progress=False, device=str(ctx.device)))
    by_id = dict(zip(dev.concept_ids, dev.consistency))
    return {
        "errors": {"c2, consistencies, baseline": (rel_err(_c2_vector(dev), _c2_vector(ref)), TOL)},
        "conditions": {
            "same concepts scored": dev.concept_ids == ref.concept_ids,
            "aligned concept > 0.99": by_id.get(0, 0.0) > 0.99,
            "random concept < 0.3": by_id.get(1, 1.0) < 0.3,
        },
        "info": {"c2": dev.c2, "aligned": by_id.get(0), "random": by_id.get(1)},
    }


def check_c2_dinov2(ctx: Context) -> dict[str, Any]:
    from transformers import Dinov2Config, Dinov2Model

    from c2score import EvalConfig, evaluate_c2
    from c2score.features import BilinearUpsampler, Dinov2PatchFeatures, UpsampledFeatureExtractor

    torch.manual_seed(0)
    config = Dinov2Config(
        image_size=28, patch_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    ext = UpsampledFeatureExtractor(Dinov2PatchFeatures(Dinov2Model(config)), BilinearUpsampler())
    ext = ext.eval()
    g = torch.Generator().manual_seed(0)
    ims = [torch.rand(3, 28, 28, generator=g) for _ in range(24)]
    acts = torch.rand(24, 4, generator=g)
    maps = torch.rand(24, 4, 7, 7, generator=g)
    ref = evaluate_c2(ims, acts, maps, ext, EvalConfig(batch_size=4, progress=False))
    ext_d = copy.deepcopy(ext).to(ctx.device)
    cfg_d = EvalConfig(batch_size=4, progress=False, device=str(ctx.device))
    dev = evaluate_c2(ims, acts, maps, ext_d, cfg_d)
    return {
        "errors": {"c2, consistencies, baseline": (rel_err(_c2_vector(dev), _c2_vector(ref)), TOL)},
        "conditions": {
            "same concepts scored": dev.concept_ids == ref.concept_ids,
            "finite": math.isfinite(dev.c2),
        },
        "info": {"c2": dev.c2, "concepts": len(dev.concept_ids)},
    }


# ----------------------------------------------------------------------------- concept-deletion


class _LinearHead(nn.Module):
    """Bias-free linear concept head: 1x1 conv, average pooling, linear (float32)."""

    def __init__(self, k: int, c: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(24, k, generator=g) / k**0.5)
        self.w2 = nn.Parameter(torch.randn(c, 24, generator=g) / 24**0.5)

    def forward(self, codes: Tensor) -> Tensor:
        return torch.einsum("bkhw,jk->bj", codes, self.w1) / codes[0, 0].numel() @ self.w2.T


def _deletion_linear(device: torch.device) -> dict[str, Any]:
    from concept_deletion import ImportanceConfig, deletion_curve, local_importance

    g = torch.Generator().manual_seed(3)
    codes = torch.relu(torch.randn(6, 16, 4, 4, generator=g)).to(device)
    head = _LinearHead(16, 5).to(device)
    with torch.no_grad():
        targets = _LinearHead(16, 5)(codes.cpu()).argmax(1).to(device)  # fixed: the CPU's
    out = {}
    for measure in ("gradient_x_input", "sobol"):
        imp = local_importance(
            measure, head, codes, targets, "BKHW", ImportanceConfig(sobol_designs=16, seed=0)
        )
        curve = deletion_curve(head, codes, targets, imp, "BKHW", labels=targets, measure=measure)
        out[f"{measure} importance"] = imp.detach().cpu()
        out[f"{measure} curve"] = torch.as_tensor(curve.scores)
        out[f"{measure} AUC"] = torch.tensor([curve.auc_score])
    return out


def check_deletion_linear(ctx: Context) -> dict[str, Any]:
    ref = _deletion_linear(torch.device("cpu"))
    dev = _deletion_linear(ctx.device)
    errors = {k: (rel_err(dev[k], ref[k]), TOL) for k in ref}
    return {"errors": errors}


def _same_selection(fact_cpu: Any, fact_dev: Any, x: Tensor, device: torch.device) -> Tensor:
    """(B,) bool: images whose active latents (code > 0) are the same on the CPU and the device
    at every decomposed layer.

    A TopK selection decided by a near-tie of two pre-activations may go either way under
    another summation order; such an image has another (equally valid) code, so it is left out
    of the comparison, and the checks require that at most one image is left out (a real bug
    changes the selection everywhere)."""
    same = torch.ones(x.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for layer in fact_cpu.layers:
            a = fact_cpu.dense_codes(x, layer) > 0
            b = fact_dev.dense_codes(x.to(device), layer).cpu() > 0
            same &= ~(a != b).flatten(1).any(1)
    return same


def _selection_report(same: Tensor) -> tuple[dict[str, bool], dict[str, Any]]:
    n_out = int((~same).sum())
    return (
        {"same latents selected on all but <= 1 image": n_out <= 1 and bool(same.any())},
        {"images_left_out_near_tie": n_out},
    )


def _deletion_fact(fact: Any, x: Tensor, targets: Tensor) -> dict[str, Tensor]:
    from concept_deletion import deletion_curve, local_importance
    from fact_model import LayerConcepts

    concepts = LayerConcepts(fact)
    codes = concepts.codes(x)
    contrib = concepts.contributions(codes, targets)
    imp = local_importance(
        "contribution", concepts.head, codes, targets, concepts.layout, contributions=contrib
    )
    curve = deletion_curve(
        concepts.head, codes, targets, imp, concepts.layout, labels=targets,
        schedule="linear", n_steps=16, measure="contribution",
    )  # fmt: skip
    return {
        "codes": codes.detach().cpu(),
        "contributions": contrib.detach().cpu(),
        "curve": torch.as_tensor(curve.scores),
        "AUC": torch.tensor([curve.auc_score]),
    }


def check_deletion_fact(ctx: Context) -> dict[str, Any]:
    fact = ctx.fact("resnet")
    x = images(6, seed=7)
    with torch.no_grad():
        targets = fact(x).argmax(1)
    dev_fact = ctx.on_device(fact)
    same = _same_selection(fact, dev_fact, x, ctx.device)
    ref = _deletion_fact(fact, x, targets)
    dev = _deletion_fact(dev_fact, x.to(ctx.device), targets.to(ctx.device))
    errors = {k: (rel_err(dev[k][same], ref[k][same]), TOL) for k in ref if k != "AUC"}
    if bool(same.all()):  # the mean curve's area needs every image
        errors["AUC"] = (rel_err(dev["AUC"], ref["AUC"]), TOL)
    conditions, info = _selection_report(same)
    return {"errors": errors, "conditions": conditions, "info": info}


# ----------------------------------------------------------------------------- fact-model


def check_fact_contributions(ctx: Context, family: str) -> dict[str, Any]:
    from fact_model import concept_contributions

    fact = ctx.fact(family)
    dev = ctx.on_device(fact)
    x = images(6, seed=9)
    same = _same_selection(fact, dev, x, ctx.device)
    errors = {}
    with torch.no_grad():
        ref_logits = fact(x)
        out_logits = dev(x.to(ctx.device)).cpu()
    bias = fact.logit_bias
    errors["logits"] = (rel_err(out_logits[same] - bias, ref_logits[same] - bias), TOL)
    targets = torch.stack([ref_logits.argmax(1), ref_logits.argmin(1)], 1)  # two logits each
    for layer in fact.layers:
        ref = concept_contributions(fact, x, targets, layer=layer)
        out = concept_contributions(dev, x.to(ctx.device), targets.to(ctx.device), layer=layer)
        errors[f"contributions {layer}"] = (
            rel_err(out.contributions[same.to(ctx.device)], ref.contributions[same]),
            TOL,
        )
        errors[f"presence {layer}"] = (
            rel_err(out.presence[same.to(ctx.device)], ref.presence[same]),
            TOL,
        )
    conditions, info = _selection_report(same)
    return {"errors": errors, "conditions": conditions, "info": info}


def check_fact_attributions(ctx: Context, family: str) -> dict[str, Any]:
    from fact_model import concept_attributions, concept_contributions

    fact = ctx.fact(family)
    dev = ctx.on_device(fact)
    x = images(4, seed=10)
    same = _same_selection(fact, dev, x, ctx.device)
    errors = {}
    for layer in fact.layers:
        top = concept_contributions(fact, x, layer=layer).contributions[:, 0]
        concepts = top.topk(2, dim=1).indices  # (B, 2): the two largest contributors
        ref = concept_attributions(fact, x, concepts, layer=layer)
        out = concept_attributions(dev, x.to(ctx.device), concepts.to(ctx.device), layer=layer)
        for what, a, e in (
            ("attributions", out.attributions, ref.attributions),
            ("values", out.value, ref.value),
            ("W(x)", out.weights, ref.weights),
        ):
            errors[f"{what} {layer}"] = (rel_err(a.cpu()[same], e[same]), TOL)
    conditions, info = _selection_report(same)
    return {"errors": errors, "conditions": conditions, "info": info}


def check_fact_completeness(ctx: Context, family: str) -> dict[str, Any]:
    from fact_model import concept_attributions, concept_contributions

    dev = ctx.on_device(ctx.fact(family))
    x = images(6, seed=11).to(ctx.device)
    errors, info = {}, {}
    for layer in dev.layers:
        c = concept_contributions(dev, x, layer=layer)
        scale = float((c.logits - c.bias).abs().max())
        errors[f"Eq. 9 {layer}"] = (float(c.completeness_error.abs().max()) / scale, TOL_COMPLETE)
        a = concept_attributions(
            dev, x, c.contributions[:, 0].topk(3, dim=1).indices, layer=layer, keep_weights=False
        )
        vscale = float(a.value.abs().max())
        errors[f"Eq. 12 {layer}"] = (
            float(a.completeness_error.abs().max()) / vscale if vscale > 0 else math.inf,
            TOL_COMPLETE,
        )
        info[f"logit_scale {layer}"] = scale
    return {"errors": errors, "info": info}


def run_checks(report: Report, ctx: Context) -> None:
    say("\n== 1. correctness: device vs CPU (float32, TF32 off) ==")
    for family in ("resnet", "densenet", "vit"):
        name = FAMILIES[family][0]
        report.check(f"bcos_layers/{name}/logits", lambda f=family: check_bcos_logits(ctx, f))
        report.check(
            f"bcos_layers/{name}/explanation", lambda f=family: check_bcos_explanation(ctx, f)
        )
        report.check(
            f"bcos_layers/{name}/completeness", lambda f=family: check_bcos_completeness(ctx, f)
        )
    report.check("topk_sae/train", lambda: check_sae_train(ctx))
    report.check("topk_sae/kernels", lambda: check_sae_kernels(ctx))
    report.check("topk_sae/train_bf16_vs_fp32", lambda: check_sae_bf16(ctx))
    report.check("c2score/planted_oracle", lambda: check_c2_planted(ctx))
    report.check("c2score/tiny_dinov2", lambda: check_c2_dinov2(ctx))
    report.check("concept_deletion/linear_head", lambda: check_deletion_linear(ctx))
    report.check("concept_deletion/fact_head", lambda: check_deletion_fact(ctx))
    for family in ctx.sizes.fact_families:
        report.check(
            f"fact_model/{family}/contributions",
            lambda f=family: check_fact_contributions(ctx, f),
        )
        report.check(
            f"fact_model/{family}/attributions", lambda f=family: check_fact_attributions(ctx, f)
        )
        report.check(
            f"fact_model/{family}/completeness", lambda f=family: check_fact_completeness(ctx, f)
        )


# ============================================================================= 2./3. timings


def median_seconds(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, inner: int = 1
) -> tuple[float, list[float]]:
    """Median wall-clock seconds of one call (``inner`` calls per synchronised measurement)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times), times


def count_flops(fn: Callable[[], object]) -> tuple[float | None, str | None]:
    """FLOPs of one call of ``fn`` and how they were counted (dense matmuls and convolutions).

    ``FlopCounterMode`` first. Its module tracker cannot run inside ``autograd.grad`` with a
    leaf input (the explanation's backward to the image raises), so the fallback applies the
    same per-op formulas (``torch.utils.flop_counter.flop_registry``) under a plain dispatch
    mode. ``(None, None)`` when neither works.
    """
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        total = counter.get_total_flops()
        if total:
            return float(total), "FlopCounterMode"
    except Exception:
        pass
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        class _Count(TorchDispatchMode):
            total = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None:
                    self.total += formula(*args, **kwargs, out_val=out)
                return out

        mode = _Count()
        with mode:
            fn()
        if mode.total:
            return float(mode.total), "flop_registry"
    except Exception:
        pass
    return None, None


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _timed(
    fn: Callable[[], object],
    device: torch.device,
    sizes: Sizes,
    *,
    flops: float | None = None,
    analytic: float | None = None,
    inner: int = 1,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time ``fn``; FLOPs from FlopCounterMode (one extra, untimed call) unless ``flops`` is
    given, the analytic count ``analytic`` as the fallback."""
    _reset_peak(device)
    med, times = median_seconds(fn, device, sizes.warmup, sizes.repeats, inner)
    source: str | None = "given"
    if flops is None:
        flops, source = count_flops(fn)
        if flops is None and analytic is not None:
            flops, source = analytic, "analytic"
    return {
        "seconds": med,
        "all_seconds": times,
        "flops": flops,
        "flop_source": source if flops is not None else None,
        "peak_mem_gib": _peak(device),
        **(extra or {}),
    }


def run_timings(report: Report, device: torch.device, sizes: Sizes, budget_s: float) -> None:
    s = sizes
    say(
        f"\n== 2./3. timings: medians of {s.repeats} after {s.warmup} warm-up, "
        f"{'cuda.synchronize' if device.type == 'cuda' else 'CPU'} =="
    )
    state: dict[str, Any] = {}

    # ---- matmul rates
    def matmul(dtype: torch.dtype, use_tf32: bool) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            n = s.matmul
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(n, n, device=device, generator=g).to(dtype)
            b = torch.randn(n, n, device=device, generator=g).to(dtype)
            c = torch.empty(n, n, device=device, dtype=dtype)
            with tf32(use_tf32):
                res = _timed(
                    lambda: torch.mm(a, b, out=c), device, s, analytic=2.0 * n**3,
                    flops=2.0 * n**3, inner=s.matmul_inner,
                )  # fmt: skip
            res["flop_source"] = "analytic (2 n^3)"
            res["shape"] = f"{n}x{n} @ {n}x{n}"
            return res

        return run

    for key, dtype, use_tf32, label in (
        ("fp32", torch.float32, False, "fp32, TF32 off"),
        ("tf32", torch.float32, True, "TF32"),
        ("bf16", torch.bfloat16, False, "bf16"),
    ):
        report.timing(f"matmul {s.matmul}^3 {label}", matmul(dtype, use_tf32), budget_s)
        row = report.timings[-1]
        if row["status"] == "ok":
            report.rates[key] = row["tflops"]
            report._rate_fractions(row)
    for row in report.timings:  # fractions now that all rates are known
        if row["status"] == "ok":
            report._rate_fractions(row)
    _free(device)

    # ---- SAE training step
    d, n, k, b = s.sae_d, s.sae_latents, s.sae_k, s.sae_batch
    enc_flops = 2.0 * b * d * n

    def sae_setup() -> None:
        if "sae_x" not in state:
            g = torch.Generator(device=device).manual_seed(0)
            state["sae_x"] = torch.randn(b, d, device=device, generator=g)

    def sae_step(bf16: bool, use_tf32: bool) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            from topk_sae import BiasFreeTopKSAE
            from topk_sae.trainer import make_optimizer, training_step

            sae_setup()
            x = state["sae_x"]
            model = BiasFreeTopKSAE(d, n, k).to(device)
            opt = make_optimizer(model, lr=1e-4)
            dead = torch.zeros(n, dtype=torch.bool, device=device)

            def step() -> object:
                return training_step(
                    model, opt, x, k=k, dead_n=dead, k_aux=256, auxk_coef=1 / 32,
                    grad_clip_norm=1.0, bf16=bf16,
                )  # fmt: skip

            with tf32(use_tf32):
                res = _timed(step, device, s, analytic=enc_flops)
            res["shape"] = f"batch {b}, d_in {d}, {n} latents, k {k}"
            res["encoder_matmul_flops_analytic"] = enc_flops
            return res

        return run

    def encoder_matmul() -> dict[str, Any]:
        from topk_sae import BiasFreeTopKSAE

        sae_setup()
        model = BiasFreeTopKSAE(d, n, k).to(device)
        x = state["sae_x"]
        res = _timed(lambda: model.preactivations(x), device, s, flops=enc_flops)
        res["flop_source"] = "analytic (2 B d n)"
        res["shape"] = f"({b}x{d}) @ ({d}x{n})"
        return res

    for name, fn in (
        ("SAE encoder matmul x @ W_enc^T, fp32", encoder_matmul),
        ("SAE train step, fp32", sae_step(False, False)),
        ("SAE train step, TF32", sae_step(False, True)),
        ("SAE train step, bf16 autocast", sae_step(True, False)),
    ):
        report.timing(name, fn, budget_s)
        _free(device)  # the model and optimizer of the row are gone
    state.pop("sae_x", None)
    _free(device)

    # ---- FaCT forward overhead and one explanation
    def fact_setup() -> dict[str, Any]:
        if "fact" in state:
            return state["fact"]
        import bcos_layers
        from fact_model import FaCT
        from topk_sae import BiasFreeTopKSAE

        torch.manual_seed(0)
        backbone = bcos_layers.create(s.fact_arch).to(device)
        g = torch.Generator(device=device).manual_seed(0)
        x = bcos_layers.AddInverse()(
            torch.rand(s.fact_batch, 3, s.fact_size, s.fact_size, device=device, generator=g)
        )
        calibrate(backbone, x)
        rows = layer_rows(backbone, s.fact_layer, x)
        c = rows.shape[1]
        positions = rows.shape[0] // s.fact_batch
        sae = BiasFreeTopKSAE(
            c, s.fact_latents, s.fact_k, input_scale=float(rows.pow(2).sum(1).mean().sqrt())
        )
        backbone = backbone.cpu()  # FaCT copies and probes on the CPU; moved afterwards
        model = FaCT(backbone, {s.fact_layer: sae}, input_size=s.fact_size).to(device).eval()
        backbone = backbone.to(device).eval()
        w_enc = model.sae(s.fact_layer).W_enc.detach()
        feats = rows / model.sae(s.fact_layer).input_scale
        state["fact"] = {
            "backbone": backbone, "model": model, "x": x, "w_enc": w_enc, "rows": feats,
            "channels": c, "positions": positions,
            "enc_flops": 2.0 * rows.shape[0] * c * s.fact_latents,
        }  # fmt: skip
        return state["fact"]

    def fact_shape(f: dict[str, Any]) -> str:
        return (
            f"{s.fact_arch} batch {s.fact_batch} {s.fact_size}x{s.fact_size}, {s.fact_layer} "
            f"({f['channels']} ch, {f['positions']} pos), {s.fact_latents} latents k {s.fact_k}"
        )

    def bcos_forward() -> dict[str, Any]:
        f = fact_setup()

        def fwd() -> None:
            with torch.no_grad():
                f["backbone"](f["x"])

        res = _timed(fwd, device, s)
        res["shape"] = fact_shape(f)
        state["bcos_s"] = res["seconds"]
        return res

    def fact_forward() -> dict[str, Any]:
        f = fact_setup()

        def fwd() -> None:
            with torch.no_grad():
                f["model"](f["x"])

        res = _timed(fwd, device, s)
        res["shape"] = fact_shape(f)
        state["fact_s"] = res["seconds"]
        return res

    def fact_encoder() -> dict[str, Any]:
        f = fact_setup()
        rows, w = f["rows"], f["w_enc"]

        def mm() -> None:
            with torch.no_grad():
                rows @ w.T

        res = _timed(mm, device, s, flops=f["enc_flops"])
        res["flop_source"] = "analytic (2 B HW C n)"
        res["shape"] = f"({rows.shape[0]}x{rows.shape[1]}) @ ({w.shape[1]}x{w.shape[0]})"
        state["floor_s"] = res["seconds"]
        return res

    def fact_overhead() -> dict[str, Any]:
        f = fact_setup()
        if "bcos_s" not in state or "fact_s" not in state:
            raise RuntimeError("needs the B-cos and FaCT forward timings")
        # the two forwards again, interleaved, so that the difference is not two runs apart
        times: dict[str, list[float]] = {"bcos": [], "fact": []}
        mods = {"bcos": f["backbone"], "fact": f["model"]}
        with torch.no_grad():
            for _ in range(s.warmup):
                for m in mods.values():
                    m(f["x"])
            for _ in range(s.repeats):
                for key, m in mods.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    m(f["x"])
                    _sync(device)
                    times[key].append(time.perf_counter() - t0)
        bcos_s, fact_s = statistics.median(times["bcos"]), statistics.median(times["fact"])
        overhead = fact_s - bcos_s
        floor = state.get("floor_s")
        return {
            "seconds": overhead,
            "flops": f["enc_flops"],
            "flop_source": "analytic (encoder matmul 2 B HW C n)",
            "bcos_s": bcos_s,
            "fact_s": fact_s,
            "fact_over_bcos": fact_s / bcos_s,
            "overhead_over_floor": overhead / floor if floor else None,
            "shape": fact_shape(f),
        }

    def explanation() -> dict[str, Any]:
        from fact_model import concept_attributions, concept_contributions

        f = fact_setup()
        model, x = f["model"], f["x"]

        def explain() -> None:
            out = concept_contributions(model, x, layer=s.fact_layer)
            concept_attributions(
                model, x, out.contributions[:, 0].argmax(1)[:, None], layer=s.fact_layer,
                keep_weights=False,
            )  # fmt: skip

        res = _timed(explain, device, s)
        res["shape"] = fact_shape(f) + "; Eq. 9 all concepts + Eq. 12 one concept"
        if state.get("fact_s"):
            res["explanation_over_forward"] = res["seconds"] / state["fact_s"]
        return res

    report.timing(f"B-cos {s.fact_arch} forward", bcos_forward, budget_s)
    report.timing(f"FaCT {s.fact_arch} forward (SAE at {s.fact_layer})", fact_forward, budget_s)
    report.timing("FaCT encoder matmul alone (overhead floor)", fact_encoder, budget_s)
    report.timing("FaCT overhead (FaCT - B-cos forward)", fact_overhead, budget_s)
    report.timing("FaCT explanation (Eq. 9 all + Eq. 12 one)", explanation, budget_s)
    state.clear()
    _free(device)


def print_table(report: Report) -> None:
    say("\n== timing table ==")
    rates = ", ".join(f"{k} {v:.1f}" for k, v in report.rates.items())
    say(f"measured matmul rates (TFLOP/s): {rates or 'none'}")
    head = (
        f"{'operation':46s} {'GFLOP':>10s} {'FLOPs from':18s} {'seconds':>10s} "
        f"{'TFLOP/s':>8s} {'/fp32':>6s} {'/bf16':>6s}"
    )
    say(head)
    say("-" * len(head))
    for r in report.timings:
        if r["status"] != "ok":
            say(f"{r['name']:46s} {r['status']}: {r.get('error', '')}")
            continue

        def num(v: Any, fmt: str) -> str:
            return format(v, fmt) if isinstance(v, (int, float)) and v is not None else "-"

        src = (r.get("flop_source") or "-").split(" (")[0]
        say(
            f"{r['name']:46s} {num((r.get('flops') or 0) / 1e9, '10.1f'):>10s} {src:18s} "
            f"{num(r['seconds'], '10.5f'):>10s} {num(r.get('tflops'), '8.2f'):>8s} "
            f"{num(r.get('frac_fp32'), '6.2f'):>6s} {num(r.get('frac_bf16'), '6.3f'):>6s}"
        )
    by_name = {r["name"]: r for r in report.timings if r["status"] == "ok"}
    summary: dict[str, Any] = {}
    for r in by_name.values():
        for key in ("overhead_over_floor", "fact_over_bcos", "explanation_over_forward"):
            if r.get(key) is not None:
                summary[key] = r[key]
    steps = {k: v["seconds"] for k, v in by_name.items() if k.startswith("SAE train step")}
    enc = by_name.get("SAE encoder matmul x @ W_enc^T, fp32")
    if enc and "SAE train step, fp32" in steps:
        summary["encoder_matmul_share_of_fp32_step"] = (
            enc["seconds"] / steps["SAE train step, fp32"]
        )
    if "SAE train step, bf16 autocast" in steps and "SAE train step, fp32" in steps:
        summary["bf16_step_speedup"] = (
            steps["SAE train step, fp32"] / steps["SAE train step, bf16 autocast"]
        )
    report.summary = summary
    if summary:
        say("; ".join(f"{k} {v:.3g}" for k, v in summary.items()))
    say(
        "FLOPs: FlopCounterMode counts dense matmuls/convolutions only (not the SAE's sparse "
        "decode and sparse encoder backward); 'analytic' rows give their formula in the JSON."
    )


# ============================================================================= main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few repeats (CPU, < 60 s)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every result here")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 3; smoke 1)")
    p.add_argument("--matmul-size", type=int, default=None, help="square matmul side (8192)")
    p.add_argument("--fact-batch", type=int, default=None, help="FaCT timing batch (64)")
    p.add_argument(
        "--budget-s", type=float, default=280.0,
        help="skip the remaining timings once this many seconds have passed (default 280)",
    )  # fmt: skip
    p.add_argument("--skip-checks", action="store_true", help="timings only")
    p.add_argument("--skip-timings", action="store_true", help="correctness checks only")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = SMOKE if args.smoke else FULL
    overrides = {
        "repeats": args.repeats,
        "warmup": args.warmup,
        "matmul": args.matmul_size,
        "fact_batch": args.fact_batch,
    }
    sizes = Sizes(**{**sizes.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    try:
        device = torch.device(args.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("torch.cuda.is_available() is False (CUDA build? driver?)")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)
            torch.zeros(1, device=device).sum().item()  # initialise the context now
        elif device.type != "cpu":
            torch.zeros(1, device=device)
    except Exception as exc:
        say(f"cannot use device {args.device!r}: {type(exc).__name__}: {exc}")
        return 2

    # float32 everywhere: no TF32 unless a timing row asks for it
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    env = environment(device)
    env["tf32_during_checks"] = {
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    env.update(
        sizes={**sizes.__dict__},
        smoke=args.smoke,
        argv=list(argv) if argv is not None else sys.argv[1:],
    )
    report = Report(args.json, env)
    say(f"FaCT GPU check{' (smoke sizes)' if args.smoke else ''}")
    say(
        f"device {device} ({env['device_name']}"
        + (
            f", capability {env.get('capability')}, {env.get('memory_gib')} GiB"
            if device.type == "cuda"
            else ""
        )
        + f"); torch {env['torch']}, CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}; "
        f"Python {env['python']}; {env['cpu_threads']} CPU threads; commit {env.get('git_commit')}"
    )
    report.save()

    if not args.skip_checks:
        ctx = Context(device, sizes)
        with tf32(False):
            run_checks(report, ctx)
        del ctx
        _free(device)
    if not args.skip_timings:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # convolution algorithms tuned in warm-up
            env["cudnn_benchmark_for_timings"] = True
        with tf32(False):
            try:
                run_timings(report, device, sizes, args.budget_s)
            except Exception as exc:  # a bug outside the per-row guards: report, keep going
                say(f"ERROR timings aborted: {type(exc).__name__}: {exc}\n{_tail(exc)}")
                report.timings.append(
                    {"name": "timings", "status": "error", "error": f"{type(exc).__name__}: {exc}"}
                )
        print_table(report)

    n_pass = sum(c["status"] == "pass" for c in report.checks)
    bad = [c["name"] for c in report.checks if c["status"] != "pass"]
    say(
        f"\n{n_pass}/{len(report.checks)} correctness checks passed"
        + (f"; FAILED: {', '.join(bad)}" if bad else "")
        + f"; {sum(t['status'] == 'ok' for t in report.timings)}/{len(report.timings)} timings; "
        f"{report.elapsed():.0f} s"
    )
    report.save()
    if args.json:
        say(f"wrote {args.json}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
