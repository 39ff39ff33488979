"""`idc-viewer serve`: the shipped models over HTTP (FastAPI + uvicorn, the `serve` extra).

One process holds every shipped model, loaded once. Patches are scored at once (one at a time
per model, under a lock); slides become jobs that one worker thread runs in order through the
same code as `idc-viewer predict` (:func:`inference.cohort.run_slide`), so a job's files are
predict's files. Only slides under the folder given are served: no absolute paths, no ``..``, no
symlink out of it. Every error is JSON ``{"error": "one sentence"}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import queue
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.atomic import write_bytes
from inference.cohort import SlideTask, find_slides, run_slide
from inference.model import LoadedModel, load_checkpoint, pick_device
from inference.predict import BatchResult
from inference.session import Planned
from inference.slide import SlideError, open_slide
from inference.tasks import task_of
from resources import SHIPPED_MODELS, resource_path, shipped_model_path

log = logging.getLogger(__name__)

#: Largest upload (a patch image) in bytes; a PCam patch is about 27 kB.
MAX_UPLOAD = 4 * 1024 * 1024
#: Files of a finished job, by the name the API gives them -> the suffix `predict` writes.
JOB_FILES = {"heatmap.png": ".heatmap.png", "patches.csv": ".patches.csv", "regions.geojson": None,
             "summary.json": None}


class ApiError(Exception):
    """A request the service refuses: an HTTP status and one sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _Cancelled(BaseException):
    """Raised inside a running job when it is cancelled (not an Exception: run_slide lets it through)."""


@dataclass
class Job:
    id: str
    slide: str  # relative to the slides folder
    model: str
    status: str = "queued"
    progress: float = 0.0
    reason: str = ""
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "slide": self.slide, "model": self.model, "status": self.status,
                "progress": round(self.progress, 4), "reason": self.reason}


class Service:
    """The models, the slides folder and the job queue behind the HTTP routes."""

    def __init__(self, slides: Path, device: str = "auto", out: Path | None = None) -> None:
        self.slides = slides.resolve()
        if not self.slides.is_dir():
            raise ValueError(f"{slides} is not a folder of slides.")
        self.device = pick_device(device)
        self.models: dict[str, LoadedModel] = {n: load_checkpoint(shipped_model_path(n), self.device)
                                               for n in SHIPPED_MODELS if shipped_model_path(n).exists()}
        self.locks = {n: threading.Lock() for n in self.models}
        self._tmp = None if out is not None else tempfile.TemporaryDirectory(prefix="idc-serve-")
        self.out = out if out is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self.jobs: dict[str, Job] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run_jobs, name="idc-serve-jobs", daemon=True)
        self._worker.start()

    def close(self) -> None:
        for job in self.jobs.values():
            job.cancel.set()
        self._queue.put(None)
        self._worker.join(timeout=30)
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- models and patches ------------------------------------------------------------------
    def model(self, name: str) -> LoadedModel:
        if name not in self.models:
            raise ApiError(404, f"No model called {name!r}; the models are {', '.join(self.models)}.")
        return self.models[name]

    def describe(self, name: str) -> dict[str, Any]:
        m = self.models[name].meta
        return {"name": name, "task": m.task, "title": task_of(m.task).title, "classes": list(m.classes),
                "positive": m.positive_class, "mpp": m.mpp, "cell_px": m.patch_size, "margin_px": m.margin,
                "input_px": m.input_px, "threshold": m.threshold,
                "context_threshold": m.context_threshold, "model_id": self.models[name].model_id}

    def score_patch(self, data: bytes, name: str) -> dict[str, Any]:
        """One image scored as the model's input: input_px square, or its cell alone (then its
        margin is white, as beyond a slide's edge)."""
        model = self.model(name)
        meta = model.meta
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                arr = np.asarray(img.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError):
            raise ApiError(400, "The file is not an image this service reads (PNG, JPEG or TIFF).") from None
        h, w = arr.shape[:2]
        padded = (h, w) == (meta.patch_size, meta.patch_size) and meta.margin > 0
        if padded:
            arr = np.pad(arr, ((meta.margin,) * 2, (meta.margin,) * 2, (0, 0)), constant_values=255)
        elif (h, w) != (meta.input_px, meta.input_px):
            raise ApiError(422, f"The {name} model scores {meta.input_px} x {meta.input_px} px images at "
                           f"{meta.mpp:g} um/px (or its {meta.patch_size} px cell alone), not {w} x {h} px.")
        import torch

        with self.locks[name], torch.inference_mode():
            p = float(torch.sigmoid(model.net(model.normalise(arr[None], self.device)).float()).cpu()[0])
        return {"probability": round(p, 6), "label": meta.classes[int(p >= meta.threshold)], "model": name,
                "threshold": meta.threshold, "padded": padded}

    # -- slides and jobs ---------------------------------------------------------------------
    def slide_path(self, rel: object) -> Path:
        """A slide under the folder, or a 4xx: no absolute path, no '..', nothing outside it."""
        if not isinstance(rel, str) or not rel.strip():
            raise ApiError(422, "Give the slide as a path relative to the slides folder.")
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts or "\\" in rel:
            raise ApiError(403, "Slides are named relative to the served folder, without '..'.")
        full = (self.slides / p).resolve()
        if not full.is_relative_to(self.slides):
            raise ApiError(403, "That path leads outside the served folder.")
        if not full.is_file():
            raise ApiError(404, f"No slide {rel} in the served folder.")
        return full

    def list_slides(self) -> list[str]:
        return sorted(str(p.resolve().relative_to(self.slides)) for p in find_slides([self.slides])
                      if p.resolve().is_relative_to(self.slides))

    def thumbnail(self, rel: str, size: int = 512) -> bytes:
        try:
            with open_slide(self.slide_path(rel)) as slide:
                img = slide.thumbnail(size)
        except SlideError as exc:
            raise ApiError(422, str(exc)) from None
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        return buf.getvalue()

    def submit(self, body: Any) -> Job:
        if not isinstance(body, dict):
            raise ApiError(422, 'Send a JSON object such as {"slide": "case1.svs", "model": "idc"}.')
        name = body.get("model", "idc")
        self.model(name if isinstance(name, str) else "")
        job = Job(uuid.uuid4().hex[:16], str(self.slide_path(body.get("slide")).relative_to(self.slides)), name)
        self.jobs[job.id] = job
        self._queue.put(job.id)
        return job

    def job(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise ApiError(404, f"No job {job_id}.")
        return self.jobs[job_id]

    def cancel(self, job_id: str) -> Job:
        job = self.job(job_id)
        if job.status in ("queued", "running"):
            job.cancel.set()
            if job.status == "queued":
                job.status, job.reason = "cancelled", "cancelled before it started"
        return job

    def job_file(self, job_id: str, name: str) -> Path:
        job = self.job(job_id)
        if name not in JOB_FILES:
            raise ApiError(404, f"A job has no file {name}; it has {', '.join(JOB_FILES)}.")
        if job.status != "done":
            raise ApiError(409, f"Job {job_id} is {job.status}; its files come when it is done.")
        folder = self.out / job.id
        if name == "summary.json":
            return folder / "summary.json"
        if name == "regions.geojson":
            return folder / f"{Path(job.slide).stem}.{self.models[job.model].meta.positive_class.lower()}.geojson"
        return folder / f"{Path(job.slide).stem}{JOB_FILES[name]}"

    def _run_jobs(self) -> None:
        while (job_id := self._queue.get()) is not None:
            job = self.jobs[job_id]
            if job.cancel.is_set():
                continue
            job.status = "running"
            folder = self.out / job.id
            task = SlideTask(str(self.slides / job.slide), str(folder), Path(job.slide).stem,
                             str(shipped_model_path(job.model)), device=str(self.device))
            total = [0]

            def on_report(report: object, job: Job = job, total: list[int] = total) -> None:
                if job.cancel.is_set():
                    raise _Cancelled
                if isinstance(report, Planned):
                    total[0] = max(1, report.total)
                    job.progress = report.resumed / total[0]
                elif isinstance(report, BatchResult) and total[0]:
                    job.progress = report.done / total[0]

            try:
                outcome = run_slide(task, self.models[job.model], "serve", on_report)
            except _Cancelled:
                job.status, job.reason = "cancelled", "cancelled while running"
                shutil.rmtree(folder, ignore_errors=True)
                continue
            if outcome.status == "failed":
                job.status, job.reason = "failed", outcome.reason
                continue
            write_bytes(folder / "summary.json", json.dumps({**asdict(outcome), "job": job.id, "model": job.model}).encode())
            job.status, job.progress = "done", 1.0


def create_app(slides: str | Path, device: str = "auto", token: str | None = None,
               max_upload: int = MAX_UPLOAD) -> FastAPI:
    """The FastAPI application; ``app.state.service`` holds the models and jobs."""
    service = Service(Path(slides), device)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()  # the worker stops; running jobs are cancelled

    app = FastAPI(title="IDC Slide Viewer service", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.service = service

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(_r: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        text = {404: "No such address on this service.", 405: "That method is not allowed here."}
        return error(exc.status_code, text.get(exc.status_code, str(exc.detail).rstrip(".") + "."))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, _exc: RequestValidationError) -> JSONResponse:
        return error(422, "The request is malformed; see the API in the README.")

    @app.exception_handler(Exception)
    async def _crash(_r: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return error(500, f"The service failed on this request ({type(exc).__name__}).")

    @app.middleware("http")
    async def _guard(request: Request, call_next):  # noqa: ANN001, ANN202
        if token is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error(401, "This service needs the header 'Authorization: Bearer <token>'.")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_upload):
            return error(413, f"Uploads are limited to {max_upload // 1024} kB.")
        return await call_next(request)

    async def body_bytes(request: Request) -> bytes:
        data = b""
        async for chunk in request.stream():  # a body without a length is capped as it arrives
            data += chunk
            if len(data) > max_upload:
                raise ApiError(413, f"Uploads are limited to {max_upload // 1024} kB.")
        return data

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resource_path("serve.html").read_text(encoding="utf-8"))

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(service.models)}

    @app.get("/v1/models")
    async def models() -> list[dict[str, Any]]:
        return [service.describe(n) for n in service.models]

    @app.get("/v1/slides")
    async def slides_list() -> list[str]:
        return service.list_slides()

    @app.get("/v1/slides/thumbnail")
    def slide_thumbnail(path: str) -> Any:
        from fastapi.responses import Response

        return Response(service.thumbnail(path), media_type="image/png")

    @app.post("/v1/patches")
    async def patches(request: Request) -> dict[str, Any]:
        data = await body_bytes(request)
        form = await _multipart(request, data)
        if "file" not in form:
            raise ApiError(422, "Send the patch as a multipart form field named 'file'.")
        return service.score_patch(form["file"], form.get("model", b"idc").decode(errors="replace") or "idc")

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request) -> dict[str, Any]:
        data = await body_bytes(request)
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "The body is not valid JSON.") from None
        return {"id": service.submit(body).id}

    @app.get("/v1/jobs/{job_id}")
    async def job(job_id: str) -> dict[str, Any]:
        return service.job(job_id).public()

    @app.delete("/v1/jobs/{job_id}")
    async def cancel(job_id: str) -> dict[str, Any]:
        return service.cancel(job_id).public()

    @app.get("/v1/jobs/{job_id}/{name}")
    async def job_file(job_id: str, name: str) -> FileResponse:
        return FileResponse(service.job_file(job_id, name))

    return app


async def _multipart(request: Request, data: bytes) -> dict[str, bytes]:
    """The fields of a multipart form already read (bounded) into ``data``."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request as Plain

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": data, "more_body": False}

    try:
        form = await Plain(request.scope, receive).form()
    except Exception:  # noqa: BLE001 (any malformed form is the client's)
        raise ApiError(400, "The body is not a multipart form.") from None
    out = {}
    for key, value in form.multi_items():
        out[key] = await value.read() if isinstance(value, UploadFile) else str(value).encode()
    return out


def serve(slides: str, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", token: str | None = None) -> int:
    """Run the service until interrupted."""
    import uvicorn

    app = create_app(slides, device, token)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
