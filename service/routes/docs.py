"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served with their assets from this server.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so on a machine without internet
access they render blank. Here the pages are FastAPI's (``get_swagger_ui_html`` /
``get_redoc_html``) with every asset URL pointing at :data:`ASSETS_PATH`, a static mount of
the files the ``fastapi-offline`` package ships (``swagger-ui-bundle.js``,
``swagger-ui.css``, ``redoc.standalone.js``, ``favicon.png``; its Python code is not used).
ReDoc runs without Google Fonts and Swagger UI without its online validator badge. Both pages
are sent with a Content-Security-Policy that lets them load from this server only, so what the
vendored scripts still reach for elsewhere (ReDoc's "API docs by Redocly" footer logo) is
blocked in the browser: no request leaves for another host, online or off.

The pages and assets need no key (they reveal nothing stored). Swagger UI's "Authorize"
button takes an API key for the ``bearer`` scheme declared by :mod:`service.auth`, and keeps it
across reloads of the page (``persistAuthorization``, the browser's local storage).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

#: Where the Swagger UI page lives (the dashboard links to it through ``app.docs_url``).
DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
#: The static mount of the Swagger UI and ReDoc files.
ASSETS_PATH = "/docs/assets"
#: The directory of the shipped Swagger UI and ReDoc files.
ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))

#: The pages' scripts and styles come from this server; Swagger UI's bootstrap and ReDoc's
#: styles are inline, ReDoc searches in a blob: worker. Nothing may be loaded from elsewhere.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; worker-src 'self' blob:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@router.get(DOCS_PATH, response_class=HTMLResponse)
def swagger_ui_html(request: Request) -> HTMLResponse:
    """Swagger UI over ``/openapi.json``; its assets come from this server."""
    app: FastAPI = request.app
    page = get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json",
        title=f"{app.title} — API",
        swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
        swagger_ui_parameters={"persistAuthorization": True, "validatorUrl": None},
    )
    page.headers.update(HEADERS)
    return page


@router.get(REDOC_PATH, response_class=HTMLResponse)
def redoc_html(request: Request) -> HTMLResponse:
    """ReDoc over ``/openapi.json``; its script comes from this server, no web fonts."""
    app: FastAPI = request.app
    page = get_redoc_html(
        openapi_url=app.openapi_url or "/openapi.json",
        title=f"{app.title} — API reference",
        redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
        redoc_favicon_url=f"{ASSETS_PATH}/favicon.png",
        with_google_fonts=False,
    )
    page.headers.update(HEADERS)
    return page


def install(app: FastAPI) -> None:
    """Add the two pages and the assets mount to an app made with ``docs_url=None`` and
    ``redoc_url=None`` (FastAPI's CDN pages off); record where they live on the app."""
    if not (ASSETS_DIR / "swagger-ui-bundle.js").is_file():
        raise RuntimeError(f"the Swagger UI files are missing from {ASSETS_DIR}")
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs_assets")
    app.include_router(router)
    app.docs_url, app.redoc_url = DOCS_PATH, REDOC_PATH
