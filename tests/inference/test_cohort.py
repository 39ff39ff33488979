"""Cohorts: local and Ray engines give the same files; failures are recorded; reruns skip."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from inference.cohort import find_slides, output_stems, read_summary
from inference.geometry import Rect
from inference.slide import open_slide
from inference.tiff_writer import write_pyramid_from_array
from tests.conftest import DEMO
from viewer.cli import main

OUTPUT_SUFFIXES = (".heatmap.npz", ".heatmap.png", ".patches.csv", ".idc.geojson")


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small JPEG pyramids of real tissue (crops of the demo slide, 4 um/px) and a bad file."""
    d = tmp_path_factory.mktemp("cohort")
    (d / "sub").mkdir()
    with open_slide(DEMO) as s:
        for i, (x, y) in enumerate([(1200, 900), (1700, 1300), (600, 1500)]):
            img = s.read(Rect(x, y, 500, 400), (500, 400))
            where = d / "sub" if i == 2 else d
            write_pyramid_from_array(where / f"case{i}.tif", img, 4.0, downsamples=(1, 4), compression="jpeg")
    (d / "broken.svs").write_bytes(b"not a slide at all" * 100)
    (d / "notes.txt").write_text("not a slide either, and not a slide format")
    return d


def test_folders_are_searched_for_slide_formats(cohort_dir: Path) -> None:
    names = [p.name for p in find_slides([cohort_dir])]
    assert sorted(names) == ["broken.svs", "case0.tif", "case1.tif", "case2.tif"]
    assert output_stems([Path("a/x.svs"), Path("b/x.svs"), Path("c/y.tif")]) == ["x", "x_2", "y"]


def _outputs(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.endswith(OUTPUT_SUFFIXES)}


def test_local_and_ray_give_the_same_files_failures_are_recorded_and_reruns_skip(cohort_dir: Path, tmp_path: Path,
                                                                               capsys) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (the cluster extra)")
    import torch

    local, on_ray = tmp_path / "local", tmp_path / "ray"
    # Each Ray task runs torch on one thread; the local run does too here, because a network's
    # float sums may round differently on another number of threads (1e-7 in a probability).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["predict", str(cohort_dir), "--out", str(local)]) == 1  # the broken file fails
    finally:
        torch.set_num_threads(threads)
    assert main(["predict", str(cohort_dir), "--out", str(on_ray), "--engine", "ray", "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("broken.svs") >= 2
    a, b = _outputs(local), _outputs(on_ray)
    assert len(a) == 3 * len(OUTPUT_SUFFIXES) and a == b  # byte for byte
    rows = read_summary(on_ray / "cohort.csv")
    assert {r.status for n, r in rows.items() if n.startswith("case")} == {"done"}
    assert rows["broken.svs"].status == "failed" and rows["broken.svs"].reason
    assert all(r.engine == "ray" for r in rows.values())
    with open(local / "cohort.csv", newline="") as fh:
        local_rows = {r["slide"]: r for r in csv.DictReader(fh)}
    for name in ("case0.tif", "case1.tif", "case2.tif"):
        for key in ("tissue_area_um2", "idc_area_um2", "idc_fraction", "max_probability"):
            assert local_rows[name][key] == f"{getattr(rows[name], key):.6f}".rstrip("0").rstrip(".")
        assert 0 < rows[name].tissue_area_um2 <= 500 * 400 * 16
    summary = json.loads((on_ray / "cohort.json").read_text())
    assert (summary["done"], summary["failed"], summary["slides"]) == (3, 1, 4)
    # A second run skips every finished slide and leaves its files as they were.
    assert main(["predict", str(cohort_dir), "--out", str(on_ray), "--engine", "ray"]) == 1
    again = read_summary(on_ray / "cohort.csv")
    assert [again[f"case{i}.tif"].status for i in range(3)] == ["skipped"] * 3
    assert again["case0.tif"].idc_area_um2 == rows["case0.tif"].idc_area_um2
    assert _outputs(on_ray) == b


def test_ray_missing_is_one_sentence_naming_the_extra(cohort_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):  # noqa: ANN001, ANN202
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["predict", str(cohort_dir / "case0.tif"), "--out", str(tmp_path), "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'idc-viewer predict: error: The Ray engine needs the cluster extra: pip install "idc-slide-viewer[cluster]".'
    assert not np.any([p.suffix == ".npz" for p in tmp_path.iterdir()])


def test_ctrl_c_leaves_every_finished_slide_complete(cohort_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Interrupted during the second slide: the first slide's files and its summary row are complete."""
    from inference import cohort

    real = cohort.run_slide
    calls = []

    def interrupted(task, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task, *args, **kwargs)

    monkeypatch.setattr(cohort, "run_slide", interrupted)
    out = tmp_path / "out"
    assert main(["predict", str(cohort_dir / "case0.tif"), str(cohort_dir / "case1.tif"), "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    rows = read_summary(out / "cohort.csv")
    assert list(rows) == ["case0.tif"] and rows["case0.tif"].status == "done"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("case")) == [f"case0{s}" for s in sorted(OUTPUT_SUFFIXES)]
    assert not list(out.glob(".*.part*"))  # no half-written file left (inference.atomic names)


def test_cohort_csv_carries_the_slide_call_and_flags_the_skin_slide(tmp_path: Path) -> None:
    """The CMU skin slide (no breast tissue) is out of the model's domain in the data, with its
    colour score, and its call is uncertain; the demo breast slide is in domain and called IDC.
    The columns read back as they were written, and the cohort's area follows the calls."""
    from tests.conftest import CMU_SVS

    out = tmp_path / "out"
    assert main(["predict", str(CMU_SVS), str(DEMO), "--out", str(out), "--device", "cpu"]) == 0
    with open(out / "cohort.csv", newline="") as fh:
        raw = {r["slide"]: r for r in csv.DictReader(fh)}
    rows = read_summary(out / "cohort.csv")
    cmu, demo = rows[CMU_SVS.name], rows[DEMO.name]
    assert raw[CMU_SVS.name]["out_of_domain"] == "true" and cmu.out_of_domain is True
    assert cmu.slide_call == "uncertain" and cmu.domain_score > 5.91
    assert demo.out_of_domain is False and demo.slide_call == "IDC found" and demo.slide_score > 0.9
    body = json.loads((out / "cohort.json").read_text())
    assert {r["slide"]: r["slide_call"] for r in body["rows"]} == {CMU_SVS.name: "uncertain", DEMO.name: "IDC found"}
    # The area of IDC in the summary is the area of the cells the model calls.
    from inference.heatmap import Heatmap

    hm = Heatmap.load(out / f"{DEMO.stem}.heatmap.npz")
    cell_um2 = (hm.grid.stride_l0 * 4.0) ** 2
    assert demo.idc_area_um2 == pytest.approx(hm.called.sum() * cell_um2)
