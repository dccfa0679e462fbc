"""``/dashboard``: the storage dashboard (HTML), its live JSON and its two static files.

Access (see :mod:`service.auth`): the page takes the signed-in caller
(``DashboardCallerDep``: the sign-in cookie or a Bearer key; a browser without one is sent to
``/signin``), the live JSON the API's own read dependency (``NamespaceDep``, which accepts the
cookie for GET). Both show the caller's namespace only and need the ``read`` role, so a
read-only key sees the whole dashboard. The static files reveal nothing stored and need no key.
Only GET routes live here; they stay out of the OpenAPI document (a page, not the v1 API).
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse

from service import dashboard
from service.auth import DashboardCallerDep
from service.dashboard import view
from service.deps import NamespaceDep, SessionDep

router = APIRouter(tags=["dashboard"], include_in_schema=False)

#: The page loads nothing from elsewhere and runs no inline script or style.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard_page(
    request: Request, caller: DashboardCallerDep, session: SessionDep, checkpoint: str | None = None
) -> HTMLResponse:
    """The dashboard (``?checkpoint=ID`` picks the search trace shown)."""
    namespace = caller.namespace
    page = view.build(session, namespace, selected_id=checkpoint)
    active, failed = page.active_jobs, page.failed_jobs
    html = dashboard.render(
        "dashboard.html",
        view=page,
        namespace=namespace,
        role=caller.role.value,
        signed_in=caller.via == "cookie",
        active=active,
        failed=failed,
        live_url=request.url_for("dashboard_live").path,
        css_url=request.url_for("dashboard_static", name="dashboard.css").path,
        js_url=request.url_for("dashboard_static", name="dashboard.js").path,
        docs_url=request.app.docs_url or "/openapi.json",
    )
    return HTMLResponse(html, headers=HEADERS)


@router.get("/dashboard/live")
def dashboard_live(session: SessionDep, namespace: NamespaceDep) -> JSONResponse:
    """Totals, the jobs panel (HTML, escaped) and a fingerprint of the checkpoints."""
    totals = view.live_totals(session, namespace)
    active, failed = view.jobs(session, namespace)
    body = {
        "totals": totals.text(),
        "jobs_html": dashboard.render("_jobs.html", active=active, failed=failed),
        "active_jobs": len(active),
        "fingerprint": view.checkpoints_fingerprint(session, namespace),
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


@router.get("/dashboard/static/{name}")
def dashboard_static(name: str) -> Response:
    """The dashboard's script and stylesheet."""
    media = dashboard.STATIC.get(name)
    if media is None:
        raise HTTPException(404, f"no dashboard file {name!r}")
    return Response(
        dashboard.static_file(name),
        media_type=media,
        headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
    )
