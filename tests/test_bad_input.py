"""A corpus of bad input through every CLI command and the GUI's open and import paths.

Each case must end in one sentence (stderr or a dialog), a non-zero exit status, no traceback,
and nothing the user made changed.
"""

from __future__ import annotations

import io
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resources import shipped_model_path
from tests.conftest import CMU_SVS
from viewer.cli import main

BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10))
    + ']><ASAP_Annotations><Annotations><Annotation Name="&lol9;" PartOfGroup="IDC" Type="Polygon">'
    '<Coordinates><Coordinate Order="0" X="0" Y="0"/></Coordinates></Annotation></Annotations></ASAP_Annotations>'
)


def _tiff_claiming(path: Path, side: int) -> Path:
    """A tiled TIFF header claiming side x side pixels (and no pixel data)."""
    entries = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
               (277, 3, 1, 3), (322, 3, 1, 256), (323, 3, 1, 256), (324, 4, 1, 8), (325, 4, 1, 0)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd)
    return path


def bad_slides(d: Path) -> dict[str, Path]:
    png = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png, "PNG")
    files = {
        "zero-byte": b"",
        "truncated": CMU_SVS.read_bytes()[:300_000],
        "random": np.random.default_rng(0).bytes(50_000),
        "png-renamed": png.getvalue(),
    }
    out = {}
    for name, data in files.items():
        p = d / f"{name}.svs"
        p.write_bytes(data)
        out[name] = p
    out["huge-claim"] = _tiff_claiming(d / "huge.tif", 1_000_000)
    out["folder"] = d
    return out


def bad_checkpoints(d: Path) -> dict[str, Path]:
    good = shipped_model_path().read_bytes()

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("pwned",))

    evil = io.BytesIO()
    torch.save({"payload": Evil()}, evil, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    out = {}
    for name, data in {"truncated": good[: len(good) // 2], "random": np.random.default_rng(1).bytes(4096),
                       "pickle-payload": evil.getvalue(), "zero-byte": b""}.items():
        p = d / f"{name}.pt"
        p.write_bytes(data)
        out[name] = p
    return out


def bad_annotations(d: Path) -> dict[str, Path]:
    texts = {
        "malformed.geojson": '{"type": "FeatureCollection", "features": [',
        "deep.geojson": "[" * 100_000 + "]" * 100_000,
        "huge-coords.geojson": '{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},'
                               ' "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1e300, 0], [1e300, 1e300],'
                               ' [0, 0]]]}}]}',
        "nan-coords.geojson": '{"type": "Feature", "geometry": {"type": "Point", "coordinates": [NaN, 1]}}',
        "billion-laughs.xml": BILLION_LAUGHS,
        "deep.xml": "<a>" * 50_000 + "</a>" * 50_000,
        "random.xml": np.random.default_rng(2).bytes(5000).decode("latin-1"),
    }
    out = {}
    for name, text in texts.items():
        p = d / name
        p.write_text(text, encoding="latin-1")
        out[name] = p
    return out


def assert_one_sentence(rc: int, err: str) -> None:
    assert rc != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) >= 1 and "Traceback" not in err, err
    assert all(ln.startswith("idc-viewer") for ln in lines), err
    assert all(ln.rstrip().endswith((".", ")")) for ln in lines if "error" in ln), err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    d = tmp_path_factory.mktemp("corpus")
    for sub in ("slides", "ckpt", "ann"):
        (d / sub).mkdir()
    return {"slides": bad_slides(d / "slides"), "ckpt": bad_checkpoints(d / "ckpt"), "ann": bad_annotations(d / "ann")}


@pytest.mark.parametrize("name", ["zero-byte", "truncated", "random", "png-renamed", "huge-claim", "folder"])
@pytest.mark.parametrize("command", ["predict", "export", "evaluate"])
def test_bad_slides_through_every_command(corpus, command: str, name: str, tmp_path: Path, capsys) -> None:
    slide = corpus["slides"][name]
    ann = tmp_path / "mine.geojson"
    ann.write_text('{"type": "FeatureCollection", "features": []}')
    before = ann.read_bytes()
    argv = {"predict": ["predict", str(slide), "--out", str(tmp_path / "out")],
            "export": ["export", str(slide), "--annotations", str(ann), "--out", str(tmp_path / "out")],
            "evaluate": ["evaluate", str(slide), "--truth", str(ann)]}[command]
    rc = main(argv)
    assert_one_sentence(rc, capsys.readouterr().err)
    assert ann.read_bytes() == before


@pytest.mark.parametrize("name", ["truncated", "random", "pickle-payload", "zero-byte"])
@pytest.mark.parametrize("command", ["predict", "evaluate", "train"])
def test_bad_checkpoints_through_every_command(corpus, command: str, name: str, tmp_path: Path, capsys) -> None:
    ckpt = corpus["ckpt"][name]
    folder = tmp_path / "patches"
    (folder / "p1" / "0").mkdir(parents=True)
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(folder / "p1" / "0" / "p1_idx5_x0_y0_class0.png")
    argv = {"predict": ["predict", str(CMU_SVS), "--out", str(tmp_path / "out"), "--model", str(ckpt)],
            "evaluate": ["evaluate", str(CMU_SVS), "--model", str(ckpt)],
            "train": ["train", str(folder), "--out", str(tmp_path / "m.pt"), "--init", str(ckpt)]}[command]
    rc = main(argv)
    err = capsys.readouterr()
    assert "pwned" not in err.out + err.err  # loading never unpickles arbitrary objects
    assert_one_sentence(rc, err.err)


@pytest.mark.parametrize("name", ["malformed.geojson", "deep.geojson", "huge-coords.geojson", "nan-coords.geojson",
                                  "billion-laughs.xml", "deep.xml", "random.xml"])
def test_hostile_annotation_files(corpus, name: str, tmp_path: Path, capsys) -> None:
    rc = main(["export", str(CMU_SVS), "--annotations", str(corpus["ann"][name]), "--out", str(tmp_path / "out")])
    assert_one_sentence(rc, capsys.readouterr().err)
    rc = main(["evaluate", str(CMU_SVS), "--truth", str(corpus["ann"][name])])
    assert_one_sentence(rc, capsys.readouterr().err)


def test_slide_without_mpp_asks_for_it(slide_no_mpp, tmp_path: Path, capsys) -> None:
    rc = main(["predict", str(slide_no_mpp[0]), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert_one_sentence(rc, err)
    assert "--mpp" in err


def test_unwritable_output_folder(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    rc = main(["predict", str(CMU_SVS), "--out", str(blocker / "out")])
    assert_one_sentence(rc, capsys.readouterr().err)
    assert blocker.read_text() == "mine"


def test_bad_input_through_the_gui(qtbot, corpus, tmp_path: Path) -> None:
    """Open every bad slide and import every hostile annotation file: one sentence each, the
    open slide and its annotations stay as they were (on screen and on disk)."""
    from tests.viewer.conftest import show_window

    w = show_window(qtbot, tmp_path, 900, 600)
    errors: list[str] = []
    w.error_shown.connect(errors.append)
    slide = tmp_path / CMU_SVS.name
    shutil.copy(CMU_SVS, slide)
    assert w.open_path(slide)
    from shapely.geometry import box

    from inference.annotations import Annotation

    w.annotations.store.add(Annotation(geometry=box(10, 10, 200, 200), cls="IDC", name="mine"))
    w.annotations.save_now()
    saved = w.annotations.save_path.read_bytes()
    for name, bad in corpus["slides"].items():
        n = len(errors)
        assert not w.open_path(bad), name
        assert len(errors) == n + 1 and "\n" not in errors[-1] and errors[-1].endswith("."), (name, errors[-1:])
        assert w.slide.path == slide
    for name, bad in corpus["ann"].items():
        n = len(errors)
        w.annotations.import_file(str(bad))
        assert len(errors) == n + 1 and "\n" not in errors[-1], (name, errors[-1:])
        assert [a.name for a in w.annotations.store.items] == ["mine"], name
    w.annotations.save_now()
    assert w.annotations.save_path.read_bytes() == saved
    w.close()
