"""Direct decoding of JPEG pyramid tiles: OpenSlide's pixels at full scale, aligned at reduced
scales, and OpenSlide wherever the file is not plain JPEG tiles or decodes otherwise."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

import inference.jpeg_tiles as jt
from inference.geometry import Rect
from inference.slide import SlideError, open_slide
from inference.tiff_writer import write_pyramid_from_array
from tests.conftest import CMU_SVS, pattern


def rgba(a: np.ndarray) -> np.ndarray:
    return a if a.shape[2] == 4 else np.dstack((a, np.full(a.shape[:2], 255, np.uint8)))


@pytest.fixture(scope="module", params=["ycbcr", "rgb"])
def jpeg_pyramid(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A JPEG pyramid (1, 4, 16) as a scanner writes it (YCbCr 4:2:0) or with RGB tiles, whose
    level sizes are not multiples of its 256 px tiles."""
    img = pattern(2000, 1488, seed=4)  # levels 2000 x 1488, 500 x 372, 125 x 93
    path = tmp_path_factory.mktemp("jpeg") / f"{request.param}.tif"
    write_pyramid_from_array(path, img, 0.5, downsamples=(1, 4, 16), ycbcr=request.param == "ycbcr", quality=85)
    return path, img


def test_full_scale_equals_openslide_at_every_level(jpeg_pyramid) -> None:
    path, _ = jpeg_pyramid
    rng = np.random.default_rng(0)
    osr = openslide.OpenSlide(str(path))
    with open_slide(path) as s:
        backend = s._backend
        assert backend.jpeg is not None, "this JPEG pyramid should be decoded directly"
        for level, (w_lv, h_lv) in enumerate(s.info.level_dimensions):
            ds = osr.level_downsamples[level]
            assert ds == int(ds)  # whole downsamples: OpenSlide reads whole level pixels too
            for _ in range(12):  # regions across tile borders, the level's edges and beyond
                x, y = int(rng.integers(-40, w_lv)), int(rng.integers(-40, h_lv))
                w, h = int(rng.integers(1, 300)), int(rng.integers(1, 300))
                ours = rgba(backend.read_level(level, x, y, w, h))
                theirs = np.asarray(osr.read_region((x * int(ds), y * int(ds)), level, (w, h)))
                np.testing.assert_array_equal(ours, theirs)
    osr.close()


def test_real_aperio_slide_equals_openslide() -> None:
    """Aperio's RGB-coded JPEG tiles with shared tables (libjpeg alone would read them as YCbCr)."""
    osr = openslide.OpenSlide(str(CMU_SVS))
    with open_slide(CMU_SVS) as s:
        assert s._backend.jpeg is not None
        w, h = s.dimensions
        for x, y in ((0, 0), (235, 470), (w - 300, h - 200)):
            np.testing.assert_array_equal(rgba(s._backend.read_level(0, x, y, 400, 300)),
                                          np.asarray(osr.read_region((x, y), 0, (400, 300))))
    osr.close()


@pytest.mark.parametrize("factor", [2, 8, 32])  # level 0 at 1/2, level 1 at 1/2, level 2 at 1/2
def test_reduced_decode_is_the_box_filtered_region_in_place(jpeg_pyramid, factor: int) -> None:
    """Between pyramid levels a display read decodes the finer level at reduced scale: its pixels are a
    smooth reduction of the same region, not shifted by even one pixel."""
    path, _ = jpeg_pyramid
    with open_slide(path) as s:
        assert s._backend.scales(0) == (1, 2, 4, 8)
        rect = Rect(480, 352, 1024, 768)  # whole tiles of the reduced level and not
        size = (rect.w // factor, rect.h // factor)
        full = s.read(rect, size).astype(float)  # level 0 decoded in full, box-filtered
        fast = s.read(rect, size, reduced_decode=True).astype(float)
        assert fast.shape == full.shape
        err = np.abs(fast - full).mean()
        assert err < 3.0  # grey levels: libjpeg's reduction is smooth, not a box filter
        # The same comparison one output pixel off in each direction is clearly worse.
        for dy, dx in ((0, 1), (1, 0)):
            shifted = np.abs(fast[dy:, dx:] - full[: full.shape[0] - dy, : full.shape[1] - dx]).mean()
            assert shifted > 2 * err


def test_reduced_decode_only_where_the_output_is_that_much_smaller(jpeg_pyramid) -> None:
    """1.5x smaller than level 0 is still decoded in full: exactly the full read."""
    path, _ = jpeg_pyramid
    with open_slide(path) as s:
        rect = Rect(100, 100, 600, 450)
        np.testing.assert_array_equal(s.read(rect, (400, 300), reduced_decode=True), s.read(rect, (400, 300)))


def test_other_compressions_and_plain_images_are_left_to_their_readers(slide_mpp, tmp_path: Path) -> None:
    path, img = slide_mpp  # zlib tiles
    png = tmp_path / "plain.png"
    Image.fromarray(img).save(png)
    for p in (path, png):
        with open_slide(p) as s:
            assert getattr(s._backend, "jpeg", None) is None and s._backend.scales(0) == (1,)
            out = s.read(Rect(0, 0, 800, 600), (200, 150), reduced_decode=True)
            np.testing.assert_array_equal(out, s.read(Rect(0, 0, 800, 600), (200, 150)))


def test_a_file_decoding_unlike_openslide_is_left_to_openslide(monkeypatch) -> None:
    """Without the marker that gives libjpeg the TIFF's colour space, Aperio's RGB-coded tiles
    decode as YCbCr: the check at open sees other colours and leaves the slide to OpenSlide."""
    monkeypatch.setattr(jt, "_adobe_marker", lambda transform: b"")
    with open_slide(CMU_SVS) as s, open_slide(CMU_SVS, direct_jpeg=False) as ref:
        assert s._backend.jpeg is None
        np.testing.assert_array_equal(s.read(Rect(10, 20, 300, 200), (300, 200)),
                                      ref.read(Rect(10, 20, 300, 200), (300, 200)))


def test_concurrent_reads_equal_serial(jpeg_pyramid) -> None:
    path, _ = jpeg_pyramid
    rng = np.random.default_rng(1)
    rects = [Rect(int(rng.integers(0, 1700)), int(rng.integers(0, 1200)), 300, 300) for _ in range(24)]
    with open_slide(path) as s:
        serial = [s.read(r, (150, 150), reduced_decode=True) for r in rects]
        s._backend.jpeg._cache.clear()
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda r: s.read(r, (150, 150), reduced_decode=True), rects))
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_damaged_tile_is_one_sentence_and_the_slide_stays_usable(jpeg_pyramid, tmp_path: Path) -> None:
    path, _ = jpeg_pyramid
    broken = tmp_path / "broken.tif"
    shutil.copy(path, broken)
    with tifffile.TiffFile(broken) as tif:
        page = tif.pages[0]
        cols = -(-page.imagewidth // page.tilewidth)
        index = cols + 1  # row 1, column 1: not the tile checked at open
        off, n = page.dataoffsets[index], page.databytecounts[index]
    with open(broken, "r+b") as f:
        f.seek(off + n // 2)
        f.write(bytes(n - n // 2))
    with open_slide(broken) as s:
        assert s._backend.jpeg is not None
        with pytest.raises(SlideError, match="damaged"):
            s.read(Rect(256, 256, 256, 256), (256, 256))
        assert s.read(Rect(0, 0, 256, 256), (256, 256)).shape == (256, 256, 3)
