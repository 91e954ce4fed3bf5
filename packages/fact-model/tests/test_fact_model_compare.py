"""``fact compare c2`` / ``fact compare deletion`` end to end on a tiny concept world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fact_model import FaCT
from fact_model.cli import main
from fact_model.demo import DemoConfig, _datasets, train_bcos
from fact_model.model import BackboneSpec
from topk_sae import TensorSource, TrainConfig, train


@pytest.fixture(scope="module")
def world_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-class B-cos ResNet trained briefly on 32 px world images, with a trained SAE at
    layer4, saved as a FaCT model."""
    cfg = DemoConfig(
        world={"image_size": 32}, n_train=192, n_test=24, epochs=2, batch_size=32,
        backbone_kwargs={"num_classes": 12, "inplanes": 8, "small_inputs": False},
    )  # fmt: skip
    trainset, _ = _datasets(cfg, lambda x: torch.cat([x, 1 - x], 0))
    backbone = train_bcos(cfg, trainset, seed=0, device="cpu", progress=False)
    backbone.fact_backbone_spec = BackboneSpec(cfg.backbone, dict(cfg.backbone_kwargs))
    x = torch.stack([trainset[i][0] for i in range(len(trainset))])
    feats = {}
    hook = backbone.layer4.register_forward_hook(lambda m, i, o: feats.update(f=o.detach()))
    with torch.no_grad():
        backbone(x)
    hook.remove()
    rows = feats["f"].permute(0, 2, 3, 1).reshape(-1, feats["f"].shape[1])
    tmp = tmp_path_factory.mktemp("cmp")
    sae = train(
        TrainConfig(n_latents=48, k=4, epochs=8, warmup_epochs=1, hold_epochs=1, init="data",
                    progress=False, uncentered_warn_ratio=1e9, checkpoint_every=10**9),
        TensorSource(rows, batch_size=64, seed=0), out_dir=tmp / "sae", resume=False,
    ).model  # fmt: skip
    model = FaCT(backbone, {"layer4": sae}, input_size=32)
    model.save_pretrained(tmp / "model")
    return tmp / "model"


def test_compare_c2_table_with_ground_truth(world_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "c2"
    code = main(["compare", "c2", str(world_model), "--dataset", "world:test:36",
                 "--train-dataset", "world:train:96", "--craft-components", "3",
                 "--craft-images-per-class", "4", "--out", str(out), "--no-progress",
                 "--batch-size", "16"])  # fmt: skip
    assert code == 0
    table = json.loads((out / "c2.json").read_text())
    assert set(table["methods"]) == {"fact", "channels", "craft"}
    assert table["images"] == 36
    for name, row in table["methods"].items():
        assert row["n_concepts"] > 0, name
        assert row["c2"] is None or -1.0 <= row["c2"] <= 1.0, name
        gt = row["groundtruth"]
        assert 0.0 <= gt["fraction_recovered"] <= 1.0 and gt["auroc_threshold"] == 0.9
    assert table["methods"]["craft"]["n_concepts"] == 12 * 3
    assert (out / "c2.png").stat().st_size > 1000
    # the CRAFT fit was cached next to the tables and is reused by the next command
    assert (out / "craft-layer4.json").is_file()


def test_compare_deletion_table(world_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "del"
    code = main(["compare", "deletion", str(world_model), "--dataset", "world:test:36",
                 "--methods", "fact", "channels", "--per-class", "1", "--out", str(out),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    table = json.loads((out / "deletion.json").read_text())
    assert set(table["methods"]) == {"fact", "channels"}
    for row in table["methods"].values():
        assert set(row["auc"]) == {"contribution", "saliency", "sobol", "random"}
        starts = {m: c["logit"][0] for m, c in row["curves"].items()}
        # nothing removed yet: every measure starts from the same logits
        assert max(starts.values()) - min(starts.values()) < 1e-4, starts
        assert all(c["fractions"][0] == 0.0 and c["fractions"][-1] == 1.0
                   for c in row["curves"].values())  # fmt: skip
    assert (out / "deletion.png").stat().st_size > 1000


def test_compare_refuses_bad_requests(world_model: Path, tmp_path: Path, capsys) -> None:
    assert main(["compare", "c2", str(world_model), "--methods", "crp", "--dataset",
                 "world:test:12", "--out", str(tmp_path)]) == 1  # fmt: skip
    assert "crp method needs a standard torchvision network" in capsys.readouterr().err
    assert main(["compare", "c2", str(world_model), "--dataset", "world:train:12",
                 "--methods", "fact", "--extractor", "oracle", "--out", str(tmp_path),
                 "--no-progress", "--layer", "layer9"]) == 1  # fmt: skip
    assert "layer9" in capsys.readouterr().err


def test_compare_c2_with_crp_on_a_torchvision_network(world_model: Path, tmp_path: Path) -> None:
    """CRP's network takes normalised RGB; the C2 extractor must still see the [0, 1] pixels."""
    pytest.importorskip("crp")
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = torchvision.models.get_model("resnet18", num_classes=12).eval()
    weights = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    out = tmp_path / "c2"
    code = main(["compare", "c2", str(world_model), "--dataset", "world:test:24",
                 "--methods", "fact", "crp", "--crp-model", "resnet18", "--crp-weights",
                 str(weights), "--crp-layer", "layer4", "--out", str(out), "--no-progress",
                 "--batch-size", "12"])  # fmt: skip
    assert code == 0
    table = json.loads((out / "c2.json").read_text())
    assert set(table["methods"]) == {"fact", "crp"}
    crp = table["methods"]["crp"]
    assert crp["n_concepts"] == 512 and crp["n_scored"] > 0
    assert crp["c2"] is not None and -1.0 <= crp["c2"] <= 1.0
    assert 0.0 <= crp["groundtruth"]["fraction_recovered"] <= 1.0
