"""WSInfer's model format: our models exported for QuPath's WSInfer, and WSInfer folders loaded back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.model import ModelError, load_checkpoint
from inference.tasks import METASTASIS
from inference.tiff_writer import write_pyramid_from_array
from inference.wsinfer import CONFIG, TORCHSCRIPT
from resources import shipped_model_path
from tests.conftest import SHARED_DATA
from training.labelled import load_labelled
from training.loop import predict_patches
from viewer.cli import main


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wsinfer") / "metastasis"
    assert main(["export-model", "--model", "metastasis", "--format", "wsinfer", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    if not (SHARED_DATA / "pcam_sample" / "labels.csv").exists():
        pytest.skip("the PCam sample of ../shared/data is not here")
    return load_labelled(SHARED_DATA / "pcam_sample", METASTASIS).images[:48]


def test_the_config_is_valid_against_the_wsinfer_zoo_schema(exported: Path) -> None:
    zoo = pytest.importorskip("wsinfer_zoo.client")
    cfg = json.loads((exported / CONFIG).read_text())
    zoo.validate_config_json(cfg)  # raises on an invalid config
    parsed = zoo.ModelConfiguration.from_dict(cfg)
    assert (parsed.patch_size_pixels, parsed.spacing_um_px, parsed.class_names) == (96, 0.972, ["Normal", "Metastasis"])
    with pytest.raises(zoo.InvalidModelConfiguration):
        zoo.validate_config_json({**cfg, "spec_version": "9"})


def test_torchscript_gives_our_probabilities_as_wsinfer_reads_them(exported: Path, patches: np.ndarray) -> None:
    ours = load_checkpoint(shipped_model_path("metastasis"))
    expected = predict_patches(ours.net, ours.meta, patches, torch.device("cpu"))
    script = torch.jit.load(str(exported / TORCHSCRIPT))
    cfg = json.loads((exported / CONFIG).read_text())
    norm = next(t["arguments"] for t in cfg["transform"] if t["name"] == "Normalize")
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255  # ToTensor
    x = (x - torch.tensor(norm["mean"]).view(1, 3, 1, 1)) / torch.tensor(norm["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        probs = torch.softmax(script(x), dim=1)[:, 1].numpy()  # WSInfer's reading of a classifier
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_a_wsinfer_folder_loads_only_when_trusted_and_predicts(exported: Path, patches: np.ndarray,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ModelError, match="code that runs on this computer"):
        load_checkpoint(exported)
    model = load_checkpoint(exported, trust_torchscript=True)
    assert (model.meta.positive_class, model.meta.patch_size, model.meta.margin, model.meta.mpp) == \
        ("Metastasis", 96, 0, 0.972)
    ours = load_checkpoint(shipped_model_path("metastasis"))
    np.testing.assert_allclose(predict_patches(model.net, model.meta, patches, torch.device("cpu")),
                               predict_patches(ours.net, ours.meta, patches, torch.device("cpu")), atol=1e-5)
    mosaic = patches[:16].reshape(4, 4, 96, 96, 3).transpose(0, 2, 1, 3, 4).reshape(384, 384, 3)
    slide = write_pyramid_from_array(tmp_path / "node.tif", mosaic, 0.972, downsamples=(1, 4), compression="zlib")
    assert main(["predict", str(slide), "--model", str(exported), "--out", str(tmp_path / "a")]) == 2
    assert "--trust-torchscript" in capsys.readouterr().err
    assert main(["predict", str(slide), "--model", str(exported), "--trust-torchscript", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "node.metastasis.geojson").exists()


def test_a_bad_wsinfer_config_gets_one_sentence(exported: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / TORCHSCRIPT).write_bytes((exported / TORCHSCRIPT).read_bytes())
    for text, match in (("{", "not readable JSON"), ('{"class_names": ["a"]}', "is not a WSInfer model config"),
                        (json.dumps({**json.loads((exported / CONFIG).read_text()), "class_names": ["only"],
                                     "num_classes": 1}), "two or more classes")):
        (bad / CONFIG).write_text(text)
        with pytest.raises(ModelError, match=match):
            load_checkpoint(bad, trust_torchscript=True)
