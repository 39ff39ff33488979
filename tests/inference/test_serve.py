"""`idc-viewer serve`: a real uvicorn server on 127.0.0.1 and a real HTTP client (httpx)."""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from inference.serve import create_app  # noqa: E402
from tests.conftest import CMU_SVS, DEMO, SHARED_DATA  # noqa: E402
from viewer.cli import main  # noqa: E402

TOKEN = "s3cret-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("served")
    shutil.copy(CMU_SVS, d / "cmu.svs")
    (d / "cases").mkdir()
    shutil.copy(DEMO, d / "cases" / "demo.tif")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(CMU_SVS, outside / "secret.svs")
    (d / "escape.svs").symlink_to(outside / "secret.svs")
    return d


@pytest.fixture(scope="module")
def server(slides: Path) -> Iterator[str]:
    app = create_app(slides, "cpu", TOKEN, max_upload=256 * 1024)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


def one_sentence(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    text = r.json()["error"]
    assert text.endswith(".") and "\n" not in text
    return text


def pcam_patch() -> tuple[bytes, int]:
    label = next(line.split(",") for line in (SHARED_DATA / "pcam_sample" / "labels.csv").read_text().split()[1:])
    return (SHARED_DATA / "pcam_sample" / f"{label[0]}.tif").read_bytes(), int(label[1])


def wait(client: httpx.Client, job: str, states: tuple[str, ...] = ("done", "failed", "cancelled")) -> dict:
    for _ in range(1200):
        j = client.get(f"/v1/jobs/{job}").json()
        if j["status"] in states:
            return j
        time.sleep(0.1)
    raise AssertionError(f"job {job} did not finish")


def test_health_models_and_a_patch(client: httpx.Client) -> None:
    assert client.get("/v1/health").json() == {"status": "ok", "models": ["idc", "metastasis"]}
    models = {m["name"]: m for m in client.get("/v1/models").json()}
    assert models["metastasis"]["input_px"] == 96 and models["idc"]["positive"] == "IDC"
    data, _label = pcam_patch()
    r = client.post("/v1/patches", files={"file": ("p.tif", data)}, data={"model": "metastasis"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "metastasis" and 0 <= body["probability"] <= 1
    assert body["label"] in ("Normal", "Metastasis") and not body["padded"]
    # A 50 px IDC patch alone is scored with a white margin, as beyond a slide's edge.
    png = io.BytesIO()
    Image.fromarray(np.full((50, 50, 3), 200, np.uint8)).save(png, "PNG")
    r = client.post("/v1/patches", files={"file": ("p.png", png.getvalue())})
    assert r.status_code == 200 and r.json()["padded"] and r.json()["model"] == "idc"


def test_bad_requests_get_one_sentence_and_the_server_lives(client: httpx.Client, server: str) -> None:
    assert "Bearer" in one_sentence(httpx.get(f"{server}/v1/health"), 401)
    assert "Bearer" in one_sentence(httpx.get(f"{server}/v1/models", headers={"Authorization": "Bearer no"}), 401)
    one_sentence(client.post("/v1/patches", files={"file": ("x.png", b"not an image")}), 400)
    png = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png, "PNG")
    assert "96 x 96" in one_sentence(client.post("/v1/patches", files={"file": ("x.png", png.getvalue())},
                                                 data={"model": "metastasis"}), 422)
    one_sentence(client.post("/v1/patches", files={"file": ("p.png", png.getvalue())}, data={"model": "nope"}), 404)
    one_sentence(client.post("/v1/patches", files={"file": ("big.tif", b"0" * (300 * 1024))}), 413)
    one_sentence(client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    one_sentence(client.post("/v1/jobs", json=["cmu.svs"]), 422)
    for path, status in (("../outside/secret.svs", 403), ("/etc/passwd", 403), ("escape.svs", 403),
                         ("missing.svs", 404)):
        one_sentence(client.post("/v1/jobs", json={"slide": path}), status)
    one_sentence(client.get("/v1/jobs/nothing"), 404)
    one_sentence(client.get("/no/such/page"), 404)
    assert client.get("/v1/health").status_code == 200  # still serving


def test_a_jobs_files_equal_predicts_and_cancel(client: httpx.Client, slides: Path, tmp_path: Path) -> None:
    assert client.get("/v1/slides").json() == ["cases/demo.tif", "cmu.svs"]
    first = client.post("/v1/jobs", json={"slide": "cmu.svs", "model": "idc"})
    assert first.status_code == 202
    queued = client.post("/v1/jobs", json={"slide": "cases/demo.tif", "model": "metastasis"}).json()["id"]
    assert client.delete(f"/v1/jobs/{queued}").json()["status"] in ("cancelled", "running")
    assert wait(client, queued)["status"] == "cancelled"
    job = wait(client, first.json()["id"])
    assert job["status"] == "done" and job["progress"] == 1.0
    one_sentence(client.get(f"/v1/jobs/{queued}/heatmap.png"), 409)
    assert main(["predict", str(slides / "cmu.svs"), "--model", "idc", "--out", str(tmp_path), "--no-cache"]) == 0
    jid = first.json()["id"]
    for name, mine in (("heatmap.png", "cmu.heatmap.png"), ("patches.csv", "cmu.patches.csv"),
                       ("regions.geojson", "cmu.idc.geojson")):
        r = client.get(f"/v1/jobs/{jid}/{name}")
        assert r.status_code == 200 and r.content == (tmp_path / mine).read_bytes(), name
    summary = client.get(f"/v1/jobs/{jid}/summary.json").json()
    row = json.loads((tmp_path / "cohort.json").read_text())["rows"][0]
    for key in ("idc_fraction", "slide_score", "slide_call", "out_of_domain", "model_id"):
        assert summary[key] == row[key], key
    # A running job is cancelled too.
    running = client.post("/v1/jobs", json={"slide": "cases/demo.tif", "model": "metastasis"}).json()["id"]
    wait(client, running, ("running", "done"))
    client.delete(f"/v1/jobs/{running}")
    assert wait(client, running)["status"] in ("cancelled", "done")


def test_the_page_is_served_without_a_token(server: str) -> None:
    r = httpx.get(f"{server}/")
    assert r.status_code == 200 and "/v1/jobs" in r.text and "http" not in r.text.split("<script>")[1].split("fetch")[0]


def test_the_page_in_headless_chromium_shows_the_heatmap_over_the_thumbnail(slides: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (python3 dev.py test installs it where it may)")
    import subprocess

    app = create_app(slides, "cpu")  # no token: the page as a lab's intranet would open it
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        base = f"http://127.0.0.1:{port}"
        job = httpx.post(f"{base}/v1/jobs", json={"slide": "cmu.svs", "model": "metastasis"}).json()["id"]
        with httpx.Client(base_url=base) as c:
            assert wait(c, job)["status"] == "done"
        shot = tmp_path / "page.png"
        browse = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                  f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,1300", "--virtual-time-budget=8000"]
        page = f"{base}/?slide=cmu.svs&model=metastasis&job={job}"
        subprocess.run([*browse, f"--screenshot={shot}", page], check=True, timeout=120, capture_output=True)
        dom = subprocess.run([*browse, "--dump-dom", page], check=True, timeout=120, capture_output=True,
                             text=True).stdout
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
    # The job's call reached the page, and no error did.
    assert 'class="error"' not in dom and "called fraction of tissue" in dom and ">done<" in dom
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (1300, 1100)
    stage = img[280:]  # below the controls: the thumbnail and its heatmap
    tissue = stage.max(axis=2) - stage.min(axis=2) > 40
    rows, cols = np.nonzero(tissue)
    red = (stage[..., 0] > 120) & (stage[..., 1] < 60) & (stage[..., 2] < 110)  # the darkest heatmap cells
    # The CMU slide is portrait (2220 x 2967 px; a stale thumbnail of the landscape demo slide was
    # once shown under its heatmap), and the metastasis model paints its epidermis.
    assert np.ptp(rows) > 1.1 * np.ptp(cols) and red.sum() > 2000
