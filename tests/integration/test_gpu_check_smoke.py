"""``benchmarks/gpu_check.py --device cpu --smoke`` end to end, as a maintainer would run it.

The script exists to be run once on a GPU machine, so it has to work the first time: here every
correctness check and every timing row runs at tiny sizes on the CPU (the "device" side is a
second CPU run) and must come back complete, passing, and written to the JSON report.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

FAMILIES = {"resnet": "tiny_resnet_bottleneck", "densenet": "tiny_densenet", "vit": "tiny_vitc"}
CHECKS = {
    *(f"bcos_layers/{m}/{what}" for m in FAMILIES.values() for what in ("logits", "explanation", "completeness")),
    "topk_sae/train",
    "topk_sae/kernels",
    "topk_sae/train_bf16_vs_fp32",
    "c2score/planted_oracle",
    "c2score/tiny_dinov2",
    "concept_deletion/linear_head",
    "concept_deletion/fact_head",
    # the smoke run builds the tiny FaCT models of two families (all three on the GPU)
    *(f"fact_model/{f}/{what}" for f in ("resnet", "vit") for what in ("contributions", "attributions", "completeness")),
}  # fmt: skip
TIMINGS = [
    "matmul 256^3 fp32, TF32 off",
    "matmul 256^3 TF32",
    "matmul 256^3 bf16",
    "SAE encoder matmul x @ W_enc^T, fp32",
    "SAE train step, fp32",
    "SAE train step, TF32",
    "SAE train step, bf16 autocast",
    "B-cos resnet50 forward",
    "FaCT resnet50 forward (SAE at layer4)",
    "FaCT encoder matmul alone (overhead floor)",
    "FaCT overhead (FaCT - B-cos forward)",
    "FaCT explanation (Eq. 9 all + Eq. 12 one)",
]


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    report = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--json", str(report)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(report.read_text())  # strict JSON: NaN / inf are written as null
    assert data["ok"] is True
    assert data["environment"]["device"] == "cpu" and data["environment"]["smoke"] is True
    assert data["environment"]["torch"]

    checks = {c["name"]: c for c in data["checks"]}
    assert len(checks) == len(data["checks"])  # no name twice
    assert set(checks) == CHECKS
    for name, c in checks.items():
        assert c["status"] == "pass", (name, c)
        assert c["errors"], name  # every check compares something
        for what, e in c["errors"].items():
            assert e["rel_err"] is not None and 0 <= e["rel_err"] <= e["tol"], (name, what, e)
        assert all(c["conditions"].values()), (name, c["conditions"])
        assert f"PASS  {name}" in proc.stdout
    # the SAE training really trained with AuxK and compared a loss history
    train = checks["topk_sae/train"]
    assert train["conditions"]["AuxK was active"] and train["info"]["steps"] == 8
    assert train["info"]["min_topk_margin"] > 1e-5
    # the planted C2 problem is recognised as such
    planted = checks["c2score/planted_oracle"]["info"]
    assert planted["aligned"] > 0.99 > 0.3 > planted["random"]

    rows = data["timings"]
    assert [r["name"] for r in rows] == TIMINGS
    for r in rows:
        assert r["status"] == "ok", r
        assert r["seconds"] is not None and math.isfinite(r["seconds"]), r
        assert r["flops"] and r["flops"] > 0 and r["flop_source"], r
        if r["name"] == "FaCT overhead (FaCT - B-cos forward)":
            # a difference of two medians: at smoke sizes on a CPU it can be ~0 or negative
            assert r["fact_s"] > 0 and r["bcos_s"] > 0 and r["fact_over_bcos"] > 0, r
            continue
        assert r["seconds"] > 0 and r["tflops"] > 0, r
        assert r["frac_fp32"] > 0 and r["frac_bf16"] > 0, r
    rates = data["matmul_rates_tflops"]
    assert set(rates) == {"fp32", "tf32", "bf16"} and all(v > 0 for v in rates.values())
    by_name = {r["name"]: r for r in rows}
    assert by_name["matmul 256^3 fp32, TF32 off"]["frac_fp32"] == 1.0
    # FLOPs counted by torch's counter where the table says so, analytic where it says so
    step = by_name["SAE train step, fp32"]
    assert step["flop_source"] == "FlopCounterMode"
    assert step["flops"] >= step["encoder_matmul_flops_analytic"]
    assert by_name["FaCT explanation (Eq. 9 all + Eq. 12 one)"]["flop_source"] in (
        "FlopCounterMode",
        "flop_registry",
    )
    assert "explanation_over_forward" in data["summary"]
    for needle in ("timing table", "TFLOP/s", "22/22 correctness checks passed"):
        assert needle in proc.stdout, needle


def test_gpu_check_refuses_a_device_it_cannot_use(tmp_path: Path) -> None:
    """A machine without the device: a clear message and exit status 2, no traceback."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "no-such-device", "--smoke"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot use device 'no-such-device'" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_gpu_check_reports_a_device_that_computes_differently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The comparisons can fail: with the "device" copies of the models perturbed (as a device
    with a wrong kernel would compute), their checks say FAIL, the exact-by-construction
    completeness checks still pass, and the exit status is 1."""
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, gpu_check)  # dataclasses look the module up
    spec.loader.exec_module(gpu_check)
    on_device = gpu_check.Context.on_device

    def perturbed(self: object, module: torch.nn.Module) -> torch.nn.Module:
        moved = on_device(self, module)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in moved.parameters():
                p.mul_(1 + 1e-3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        return moved

    gpu_check.Context.on_device = perturbed
    report = tmp_path / "perturbed.json"
    rc = gpu_check.main(["--device", "cpu", "--smoke", "--skip-timings", "--json", str(report)])
    out = capsys.readouterr().out
    assert rc == 1
    status = {c["name"]: c["status"] for c in json.loads(report.read_text())["checks"]}
    assert set(status) == CHECKS
    for family, model in FAMILIES.items():
        assert status[f"bcos_layers/{model}/logits"] == "fail"
        assert status[f"bcos_layers/{model}/explanation"] == "fail"
        assert status[f"bcos_layers/{model}/completeness"] == "pass"
        if family != "densenet":  # not built in the smoke run
            assert status[f"fact_model/{family}/contributions"] == "fail"
            assert status[f"fact_model/{family}/attributions"] == "fail"
            assert status[f"fact_model/{family}/completeness"] == "pass"
    assert status["concept_deletion/fact_head"] == "fail"
    assert status["topk_sae/train"] == "pass"  # does not go through on_device
    assert "FAIL  bcos_layers/tiny_densenet/logits" in out and "FAILED:" in out
