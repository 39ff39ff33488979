from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.geometry import Rect
from inference.slide import SlideError, open_slide
from tests.conftest import CMU_SVS, DEMO


def box_down(img: np.ndarray, f: int) -> np.ndarray:
    h, w = img.shape[0] // f * f, img.shape[1] // f * f
    return img[:h, :w].reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3))


def test_properties_of_generated_pyramid(slide_mpp) -> None:
    path, img = slide_mpp
    with open_slide(path) as s:
        assert s.dimensions == (1500, 1100)
        assert len(s.info.level_dimensions) == 3
        assert s.info.level_downsamples[1] == pytest.approx(4, rel=0.01)
        assert s.mpp == pytest.approx(0.5)
        assert s.info.mpp_from_file


def test_level0_read_is_exact(slide_mpp) -> None:
    path, img = slide_mpp
    with open_slide(path) as s:
        out = s.read(Rect(123, 456, 300, 200), (300, 200))
        np.testing.assert_array_equal(out, img[456:656, 123:423])


def test_downsampled_read_matches_box_filter(slide_mpp) -> None:
    path, img = slide_mpp
    with open_slide(path) as s:
        out = s.read(Rect(0, 0, 1200, 800), (300, 200)).astype(float)
    ref = box_down(img[:800, :1200], 4)
    assert np.abs(out - ref).mean() < 3


def test_read_at_mpp(slide_mpp) -> None:
    path, img = slide_mpp
    with open_slide(path) as s:
        out = s.read_at_mpp(Rect(0, 0, 400, 400), 2.0)  # 0.5 um/px -> 2 um/px = 4x down
    assert out.shape == (100, 100, 3)


def test_non_power_of_two_levels(slide_npot) -> None:
    path, img = slide_npot
    with open_slide(path) as s:
        assert [round(d) for d in s.info.level_downsamples] == [1, 3, 9]
        out = s.read(Rect(0, 0, 900, 900), (300, 300)).astype(float)
        out2 = s.read(Rect(300, 300, 90, 60), (10, 7))
    assert np.abs(out - box_down(img[:900, :900], 3)).mean() < 3
    assert out2.shape == (7, 10, 3)


def test_outside_slide_is_background(slide_mpp) -> None:
    path, _img = slide_mpp
    with open_slide(path) as s:
        out = s.read(Rect(1400, 1000, 200, 200), (200, 200))
    assert (out[150:, 150:] == 255).all()  # beyond the slide: the background colour (white)


def test_no_mpp_slide_opens_and_accepts_user_mpp(slide_no_mpp) -> None:
    path, _img = slide_no_mpp
    with open_slide(path) as s:
        assert s.mpp is None
        with pytest.raises(SlideError, match="unknown"):
            s.read_at_mpp(Rect(0, 0, 100, 100), 4.0)
        s2 = s.with_mpp(0.25)
        assert s2.mpp == 0.25 and not s2.info.mpp_from_file
        assert s.mpp is None  # slides are immutable: the old one keeps its (unknown) resolution
        assert s2.shares_file(s) and s2.read(Rect(0, 0, 8, 8), (8, 8)).shape == (8, 8, 3)
        with pytest.raises(SlideError):
            s.with_mpp(-1)
    with pytest.raises(SlideError, match="closed"):  # closing either closes the one file
        s2.read(Rect(0, 0, 8, 8), (8, 8))
    with open_slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5


def test_concurrent_reads_equal_serial(slide_mpp) -> None:
    path, _img = slide_mpp
    rects = [Rect(x, y, 256, 256) for x in range(0, 1200, 200) for y in range(0, 800, 200)]
    with open_slide(path) as s:
        serial = [s.read(r, (128, 128)) for r in rects]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda r: s.read(r, (128, 128)), rects))
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)


def test_real_aperio_slide() -> None:
    with open_slide(CMU_SVS) as s:
        assert s.dimensions == (2220, 2967)
        assert s.info.vendor == "aperio"
        assert s.mpp == pytest.approx(0.499)
        assert s.info.objective_power == 20
        assert set(s.info.associated) >= {"label", "macro", "thumbnail"}
        assert s.associated_image("label").ndim == 3
        tissue = s.thumbnail(256)
    assert tissue.shape[0] == 256 and tissue.std() > 10


def test_demo_slide() -> None:
    with open_slide(DEMO) as s:
        assert s.mpp == pytest.approx(4.0)
        assert 3500 < s.dimensions[0] < 3800 and 2600 < s.dimensions[1] < 2800
        assert len(s.info.level_dimensions) == 3


def test_plain_png(tmp_path: Path) -> None:
    img = (np.random.default_rng(0).random((700, 900, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "plain.png")
    with open_slide(tmp_path / "plain.png") as s:
        assert s.dimensions == (900, 700) and s.mpp is None
        np.testing.assert_array_equal(s.read(Rect(10, 20, 30, 40), (30, 40)), img[20:60, 10:40])


def _absurd_tiff(path: Path) -> None:
    """A tiled TIFF header claiming 3,000,000 x 3,000,000 pixels."""
    entries = [(256, 4, 1, 3_000_000), (257, 4, 1, 3_000_000), (258, 3, 1, 8), (259, 3, 1, 1),
               (262, 3, 1, 2), (277, 3, 1, 3), (322, 3, 1, 256), (323, 3, 1, 256),
               (324, 4, 1, 8), (325, 4, 1, 0)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd)


@pytest.mark.parametrize("kind", ["missing", "empty", "random_svs", "text", "truncated", "absurd", "folder"])
def test_bad_input_is_one_clear_sentence(kind: str, tmp_path: Path) -> None:
    p = tmp_path / "bad.svs"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "random_svs":
        p.write_bytes(np.random.default_rng(0).bytes(10_000))
    elif kind == "text":
        p = tmp_path / "notes.txt"
        p.write_text("not a slide\n" * 100)
    elif kind == "truncated":
        p = tmp_path / "truncated.svs"
        p.write_bytes(CMU_SVS.read_bytes()[:300_000])
    elif kind == "absurd":
        p = tmp_path / "absurd.tif"
        _absurd_tiff(p)
    elif kind == "folder":
        p = tmp_path
    with pytest.raises(SlideError) as info:
        open_slide(p)
    msg = str(info.value)
    assert msg.endswith(".") and "\n" not in msg and "Traceback" not in msg


def test_close_waits_for_reads_in_flight_and_refuses_later_ones(slide_mpp) -> None:
    import threading
    import time

    slide = open_slide(slide_mpp[0])
    errors: list[BaseException] = []
    reads = [0]

    def reader() -> None:
        try:
            while True:
                slide.read(Rect(0, 0, 1500, 1100), (750, 550))
                reads[0] += 1
        except SlideError as exc:
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    while reads[0] < 3:
        time.sleep(0.01)
    slide.close()  # from another thread, mid-read: waits, then the reader gets one sentence
    t.join(10)
    assert not t.is_alive() and len(errors) == 1 and "was closed" in str(errors[0])
