"""The labeling web app (FastAPI): one page for labelers, one for the admin, and a small JSON API.

Routes::

    GET  /                       the A/B page (templates/label.html); ?labeler=ID
    GET  /admin                  counts per labeler, inter-annotator agreement, agreement with the RM
    GET  /api/next?labeler=ID    the pair to label now: {pair_id, prompt, left, right, progress} or {done: true}
    POST /api/label              {labeler, pair_id, choice: left|right|tie|skip} -> {progress}; committed before it returns
    POST /api/undo               {labeler} -> {pair_id}: the last answer is taken back and that pair is served again
    GET  /api/stats              the admin numbers as JSON

Simulated labelers use the same API (:mod:`.study`). Every error is a JSON ``{"error": "one line"}``
with a 4xx status (503 when the database is unreachable); no traceback ever reaches the browser.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhfgym.envs.feedback.store import AlreadyLabelled, OutOfOrder, PreferenceStore, StoreError, UnknownPair

TEMPLATES = Path(__file__).resolve().parent / "templates"
log = logging.getLogger("rlhfgym.label")


class LabelRequest(BaseModel):
    """One click: ``choice`` is the side the labeler saw (``left``/``right``), ``tie`` or ``skip``."""

    model_config = ConfigDict(extra="forbid")
    labeler: str
    pair_id: int
    choice: str


class UndoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labeler: str


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    """Pydantic's errors as one line: which field, what is wrong."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    if any(err.get("loc", ("",))[0] == "query" for err in exc.errors()):
        return "bad request: " + "; ".join(parts) + "; add ?labeler=YOUR_ID to the URL."
    return ("bad request: " + "; ".join(parts) +
            '; send JSON like {"labeler": "alice", "pair_id": 3, "choice": "left"} (choice: left, right, tie or skip).')


def create_app(store: PreferenceStore, *, order: Callable[[list[int]], list[int]] | None = None,
               title: str = "rlhf-gym labeling", seed: int | None = None) -> FastAPI:
    """The app over ``store``. ``order``: reorders candidate pair ids for serving (active selection,
    :class:`.active.ActiveSelector`); default the pairs' random rank. ``seed`` fixes the display-order
    draws (tests, the study)."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(TEMPLATES))
    app.state.store = store

    # -- errors: one line, never a traceback ----------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _bad_request(_request: Request, exc: RequestValidationError):
        return _error(400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return _error(404, "no such page; the labeling page is / and the admin view is /admin.")
        if exc.status_code == 405:
            return _error(405, "method not allowed here; the page sends POST to /api/label and /api/undo, GET elsewhere.")
        return _error(exc.status_code, exc.detail)

    @app.exception_handler(StoreError)
    async def _store_error(_request: Request, exc: StoreError):
        status = 404 if isinstance(exc, UnknownPair) else 409 if isinstance(exc, (OutOfOrder, AlreadyLabelled)) else 400
        return _error(status, str(exc))

    @app.exception_handler(sa_exc.OperationalError)
    async def _db_down(_request: Request, exc: sa_exc.OperationalError):
        log.error("database error: %s", exc)
        return _error(503, "the database is unreachable right now; your last answer may not be saved. "
                           "Check the database server, then reload the page.")

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception):
        log.exception("unexpected error")  # the traceback goes to the server log only
        return _error(500, f"internal error ({type(exc).__name__}); the server log has details. Reload the page.")

    # -- pages ------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def page(request: Request, labeler: str = ""):
        return templates.TemplateResponse(request, "label.html", {"title": title, "labeler": labeler})

    @app.get("/admin", response_class=HTMLResponse)
    def admin(request: Request):
        return templates.TemplateResponse(request, "admin.html", {"title": title, "stats": store.stats()})

    # -- API --------------------------------------------------------------------------------------
    @app.get("/api/next")
    def next_pair(labeler: str = Query(...)) -> dict[str, Any]:
        served = store.next_pair(labeler, order=order, seed=seed)
        progress = store.progress(labeler).__dict__
        if served is None:
            return {"done": True, "progress": progress}
        return {"done": False, "pair_id": served.pair_id, "prompt": served.prompt, "left": served.left,
                "right": served.right, "progress": progress}

    @app.post("/api/label")
    def label(request: LabelRequest = Body(...)) -> dict[str, Any]:
        if request.choice not in ("left", "right", "tie", "skip"):
            raise StoreError(f"choice {request.choice!r} is not one of left, right, tie, skip.")
        progress = store.record(request.labeler, request.pair_id, request.choice)
        return {"ok": True, "progress": progress.__dict__}

    @app.post("/api/undo")
    def undo(request: UndoRequest = Body(...)) -> dict[str, Any]:
        return {"ok": True, "pair_id": store.undo(request.labeler)}

    @app.get("/api/stats")
    def stats() -> dict[str, Any]:
        return store.stats()

    return app
