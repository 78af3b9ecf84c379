"""The diagnosis web page and its JSON API (Flask), over one loaded model and its batcher.

    GET  /               the page (serve/static: no external asset)
    GET  /api/health     liveness and what has been served
    GET  /api/model      what answers: backbone, weights, training data, date, test AUROC with n and interval,
                         labels, thresholds and where they came from, calibration, warnings, limits
    GET  /api/model-card the run's model card (common.evaluation.model_card): JSON and its markdown
    POST /api/predict    one radiograph (multipart field `file`, or the raw bytes) -> per-finding JSON

Bad input is answered with a 4xx and a one-line JSON `error`, and the next request is served: an
empty body 400, a malformed multipart body or one with a form field over 500 KB 400, a body over
--max-upload-mb 413, a content type that is no image 415, bytes that
do not decode as a radiograph (not an image, truncated, unsupported DICOM, more than --max-pixels,
checked from the header before decoding) 422. Uploads stay in memory: nothing is written unless
--keep-uploads names a folder (a failure to keep one is logged; the answer is still given), and no
name from the request is ever used as a path.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flask import Flask, Request, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from common import atomic
from common.evaluation.model_card import NOTICE, card_markdown
from common.images.decode import MAX_PIXELS

STATIC = Path(__file__).resolve().parent / "static"
# Raw bodies the API takes; multipart uploads are judged by their bytes, whatever type the browser guessed.
RAW_TYPES = ("image/png", "image/jpeg", "image/tiff", "image/bmp", "application/dicom", "application/octet-stream")
CAM_GRID = 64  # long side of the grid CAM maps are sent on; the page scales them over the image smoothly
PREVIEW_SIDE = 512


@dataclass
class Settings:
    max_upload_mb: float = 20.0
    max_pixels: int = MAX_PIXELS
    keep_uploads: str | None = None
    timeout_s: float = 60.0  # a request never waits longer than this for the model


class BadUpload(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _one_line(text: str, limit: int = 300) -> str:
    """A message safe to return: one line, no control characters, bounded."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", " ".join(str(text).split()))[:limit]


def _client_name(name: str | None) -> str:
    """The client's file name, only for messages and as the id of the image: its last part, printable."""
    base = re.split(r"[\\/]", name or "")[-1]
    return _one_line(base, 120) or "upload"


def _form_files() -> list:
    """The multipart body's parts named 'file', or BadUpload.

    Werkzeug raises one 413 for three things: a body over --max-upload-mb (the only true 413, raised
    here as it is), a text field over its form memory limit, and a body in which the boundary never
    appears (buffered as a preamble up to that limit). The body, read first, tells the last two apart.
    """
    boundary = request.mimetype_params.get("boundary")
    if not boundary:
        raise BadUpload(400, "multipart/form-data without its boundary in the Content-Type header")
    body = request.get_data(cache=True, parse_form_data=False)  # the form is parsed from this copy
    try:
        files = request.files.getlist("file")
    except RequestEntityTooLarge:
        files = None
    if not files and b"--" + boundary.encode("latin-1") not in body:
        raise BadUpload(400, f"malformed multipart body: its boundary {boundary!r} (from the Content-Type) "
                             f"is not in it")
    if files is None:
        raise BadUpload(400, f"multipart form refused: a form field over {request.max_form_memory_size // 1000} KB "
                             f"or more than {request.max_form_parts} parts (only the 'file' part may be large)")
    return files


def _upload() -> tuple[bytes, str]:
    """The uploaded bytes and the client's file name, or BadUpload."""
    ctype = (request.mimetype or "").lower()
    if ctype == "multipart/form-data":
        files = _form_files()
        if len(files) != 1:
            raise BadUpload(400, f"multipart upload needs exactly one field 'file' (got {len(files)})")
        data, name = files[0].read(), files[0].filename
    elif ctype in RAW_TYPES:
        data, name = request.get_data(cache=False), request.args.get("name")
    elif not ctype and not request.content_length:
        raise BadUpload(400, "empty body: send an image as multipart field 'file' or as the raw body")
    else:
        raise BadUpload(415, f"content type {ctype or 'missing'!r} is not an image upload; use multipart/form-data "
                             f"or one of {', '.join(RAW_TYPES)}")
    if not data:
        raise BadUpload(400, "empty upload (0 bytes)")
    return data, _client_name(name)


def _keep(folder: str, data: bytes) -> str:
    """Write an upload under its sha256 (never a client's name), atomically; the name written."""
    digest = hashlib.sha256(data).hexdigest()
    target = Path(folder) / f"{digest}.bin"
    if not target.exists():
        atomic.write_bytes(target, data)
    return target.name


def _png_data_url(gray: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _display(source, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The upload as a gray image for the page (long side <= PREVIEW_SIDE) and its full (width, height)."""
    from PIL import Image

    from common.images.decode import decode_gray, to_unit_array

    source.seek(0)
    gray, scale = decode_gray(source, PREVIEW_SIDE, max_pixels)
    width, height = gray.size
    k = min(1.0, PREVIEW_SIDE / max(width, height))
    shown = gray.resize((max(1, round(width * k)), max(1, round(height * k))), Image.Resampling.BILINEAR)
    return to_unit_array(shown, scale), (width, height)


def _cam_maps(cams: np.ndarray, names: list[str], data_config, size: tuple[int, int], which: list[int]) -> dict:
    """The chosen classes' maps on the image's own grid (long side CAM_GRID), each scaled to [0, 1]."""
    import torch

    from common.models.cam import map_to_grid

    width, height = size
    k = CAM_GRID / max(width, height)
    grid = (max(1, round(width * k)), max(1, round(height * k)))
    maps = map_to_grid(torch.as_tensor(cams[which]), data_config, grid).numpy()
    low = maps.reshape(len(which), -1).min(axis=1)[:, None, None]
    high = maps.reshape(len(which), -1).max(axis=1)[:, None, None]
    maps = (maps - low) / np.maximum(high - low, 1e-12)
    return {"grid": list(grid), "maps": {names[c]: np.round(m, 3).tolist() for c, m in zip(which, maps)}}


class InMemoryRequest(Request):
    """Multipart file parts kept in memory (Werkzeug spools parts over 500 KB to a temporary file): an upload is
    written nowhere unless --keep-uploads says so. The body is capped by --max-upload-mb, so is the memory."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def _cam_classes(want_cam: str, names: list[str]) -> list[int]:
    """The classes ?cam= asks for: 'all' or one finding's name, or BadUpload."""
    if want_cam == "all":
        return list(range(len(names)))
    if want_cam in names:
        return [names.index(want_cam)]
    raise BadUpload(400, f"cam={_one_line(want_cam, 80)!r}: not a finding of this model "
                         f"(use 'all' or one of {', '.join(names)})")


class Service:
    """What the routes answer, over one loaded model (serve.model.Served), its batcher and the settings;
    it counts the answers given and the uploads rejected."""

    def __init__(self, served, batcher, settings: Settings, logger):
        self.served, self.batcher, self.settings, self.logger = served, batcher, settings, logger
        self.names = served.label_names
        self.counts = {"ok": 0, "rejected": 0}

    def bad_upload(self, exc: BadUpload):
        self.counts["rejected"] += 1
        return jsonify(error=_one_line(str(exc))), exc.status

    def http_error(self, exc: HTTPException):
        if exc.code == 413:
            self.counts["rejected"] += 1
            message = f"upload larger than the limit of {self.settings.max_upload_mb:g} MB (--max-upload-mb)"
        else:
            message = exc.description or exc.name
        return jsonify(error=_one_line(message)), exc.code

    def model_error(self, exc: Exception):
        # The model failed on a batch (out of memory, a broken file on disk): this request gets a JSON
        # 500 naming the cause, the batcher goes on with the next batch.
        self.logger.exception("predict failed")
        return jsonify(error=_one_line(f"the model failed: {type(exc).__name__}: {exc}")), 500

    def health(self):
        batcher = self.batcher
        return jsonify(status="ok", model=self.served.kind, batches=batcher.batches, images=batcher.images,
                       waiting=batcher.waiting, answered=self.counts["ok"], rejected=self.counts["rejected"])

    def model(self):
        served, names = self.served, self.names
        return jsonify(**served.identity, label_names=names,
                       thresholds=dict(zip(names, served.thresholds.tolist())), has_cam=served.has_cam,
                       limits={"max_upload_mb": self.settings.max_upload_mb, "max_pixels": self.settings.max_pixels},
                       notice=NOTICE)

    def model_card(self):
        return jsonify(card=self.served.card, markdown=card_markdown(self.served.card))

    def predict(self):
        started = time.perf_counter()
        data, name = _upload()
        source = io.BytesIO(data)
        source.name = name  # for messages and the DICOM suffix rule; never a path
        inputs, error = self.served.decode(source, self.settings.max_pixels)
        if error is not None:
            raise BadUpload(422, f"cannot read the upload as a radiograph: {error}")
        decoded = time.perf_counter()
        future = self.batcher.submit(inputs, name)
        try:
            result, row, waited, batch_size = future.result(timeout=self.settings.timeout_s)
        except TimeoutError:
            return jsonify(error=f"the model did not answer within {self.settings.timeout_s:g} s; try again"), 503
        if result.errors[row] is not None:
            raise BadUpload(422, f"{name}: {result.errors[row]}")
        answered = time.perf_counter()
        out = self._findings(result, row, name, len(data))
        self._add_pictures(out, source, result, row)
        if not self.served.has_cam:
            out["cam_note"] = self.served.identity.get("heatmap")
        if self.settings.keep_uploads:
            self._keep_upload(out, data, name)
        self.counts["ok"] += 1
        out["timing_ms"] = {"decode": round(1000 * (decoded - started), 1), "wait": round(1000 * waited, 1),
                            "model_and_wait": round(1000 * (answered - decoded), 1),
                            "total": round(1000 * (time.perf_counter() - started), 1)}
        out["batch_size"] = batch_size
        return jsonify(out)

    def _findings(self, result, row: int, name: str, size: int) -> dict:
        """The answer for one image: its findings, most probable first, and the model's columns."""
        served, names = self.served, self.names
        probs = result.probs[row].astype(float)
        sources = served.identity.get("threshold_sources", {})
        findings = sorted(({"name": n, "probability": p, "threshold": t, "above_threshold": bool(p >= t),
                            "threshold_source": sources.get(n)}
                           for n, p, t in zip(names, probs.tolist(), served.thresholds.tolist())),
                          key=lambda f: -f["probability"])
        return {
            "image": {"name": name, "bytes": size},
            "model": {k: served.identity.get(k) for k in ("kind", "backbone", "weights", "view", "run")},
            "findings": findings,
            "probabilities": dict(zip(names, probs.tolist())),
            "calibration": served.identity.get("calibration"),
            "thresholds": dict(zip(names, served.thresholds.tolist())),
            **{k: v[row] for k, v in result.columns.items()},
        }

    def _add_pictures(self, out: dict, source, result, row: int) -> None:
        """What ?preview= and ?cam= ask for: the image as the page shows it (and the masked input), the maps."""
        want_cam = request.args.get("cam")
        want_preview = request.args.get("preview") in ("1", "true")
        if not (want_preview or (want_cam and result.cams is not None)):
            return
        shown, size = _display(source, self.settings.max_pixels)
        if want_preview:
            out["preview"] = _png_data_url(shown)
            if result.masked is not None:
                out["masked_input"] = _png_data_url(result.masked[row])
        if want_cam and result.cams is not None:
            which = _cam_classes(want_cam, self.names)
            out["cam"] = _cam_maps(result.cams[row], self.names, self.served.data_config, size, which)

    def _keep_upload(self, out: dict, data: bytes, name: str) -> None:
        # Keeping is a side effect: its failure is the operator's to see, the diagnosis still the client's.
        try:
            out["kept_as"] = _keep(self.settings.keep_uploads, data)
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            self.logger.warning("--keep-uploads %s: %s not kept (%s)", self.settings.keep_uploads, name, why)
            out["kept_as"], out["keep_error"] = None, why


def _page():
    return send_from_directory(STATIC, "index.html")


def create_app(served, batcher, settings: Settings | None = None) -> Flask:
    """The Flask app over a loaded model (serve.model.Served) and its batcher."""
    settings = settings or Settings()
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.request_class = InMemoryRequest
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_upload_mb * 1024 * 1024)
    service = Service(served, batcher, settings, app.logger)
    app.register_error_handler(BadUpload, service.bad_upload)
    app.register_error_handler(HTTPException, service.http_error)
    app.register_error_handler(Exception, service.model_error)
    app.add_url_rule("/", "page", _page, methods=["GET"])
    app.add_url_rule("/api/health", "health", service.health, methods=["GET"])
    app.add_url_rule("/api/model", "model", service.model, methods=["GET"])
    app.add_url_rule("/api/model-card", "model_card", service.model_card, methods=["GET"])
    app.add_url_rule("/api/predict", "predict", service.predict, methods=["POST"])
    return app
