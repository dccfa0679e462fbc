"""``/signin`` and ``/signout``: the dashboard's browser sign-in with an API key.

``GET /signin`` shows a form; ``POST /signin`` (form fields ``key`` and ``next``) checks the key
and keeps it in an HttpOnly, SameSite=Strict cookie, then redirects to ``next`` (a local path;
default ``/dashboard``). ``POST /signout`` clears the cookie. The cookie is honoured for GET and
HEAD requests only (see :mod:`service.auth`); scripts use ``Authorization: Bearer``.
"""

from __future__ import annotations

import html
from urllib.parse import parse_qs, urlsplit

import anyio.to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from runtime.process import Runtime
from service.auth import COOKIE_MAX_AGE, COOKIE_NAME, encode_cookie, lookup

router = APIRouter(tags=["auth"], include_in_schema=False)

#: The sign-in form's body is tiny; anything longer is refused unread.
MAX_FORM_BYTES = 8192
DEFAULT_NEXT = "/dashboard"

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Slimstore — sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font:16px system-ui,sans-serif;max-width:26rem;margin:12vh auto;padding:0 1rem;color:#222}}
h1{{font-size:1.4rem}} label{{display:block;margin:.8rem 0 .3rem}}
input[type=password]{{width:100%;padding:.5rem;font:inherit;box-sizing:border-box}}
button{{margin-top:1rem;padding:.5rem 1.2rem;font:inherit}}
.error{{color:#a00;margin:.8rem 0}} p.hint{{color:#666;font-size:.9rem}}
</style></head>
<body><h1>Sign in to Slimstore</h1>{error}
<form method="post" action="/signin">
<label for="key">API key</label>
<input type="password" id="key" name="key" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{next}">
<button type="submit">Sign in</button></form>
<p class="hint">Any key with role read or higher. <code>slim serve</code> prints the first admin
key; more are made with <code>slim keys create --namespace NS --role read</code>.</p>
</body></html>
"""


def safe_next(value: str | None) -> str:
    """A local path to go to after signing in (never another site)."""
    if not value:
        return DEFAULT_NEXT
    parts = urlsplit(value)
    if (
        parts.scheme
        or parts.netloc
        or not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or any(ord(c) < 0x20 for c in value)
    ):
        return DEFAULT_NEXT
    return value


def _page(next_path: str, error: str | None = None, status: int = 200) -> HTMLResponse:
    err = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    body = _PAGE.format(error=err, next=html.escape(safe_next(next_path), quote=True))
    headers = {"Cache-Control": "no-store", "X-Frame-Options": "DENY"}
    return HTMLResponse(body, status_code=status, headers=headers)


@router.get("/signin", response_class=HTMLResponse)
def signin_form(next: str = Query(DEFAULT_NEXT, max_length=2048)) -> HTMLResponse:
    """The sign-in form."""
    return _page(next)


@router.post("/signin", response_class=HTMLResponse)
async def signin(request: Request) -> Response:
    """Check the key from the form; on success set the cookie and redirect to ``next``."""
    if not _same_origin(request):
        return _page(DEFAULT_NEXT, "sign in from this server's own page", status=403)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return _page(DEFAULT_NEXT, "the form is too large", status=413)
    try:
        fields = parse_qs(body.decode(), max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        fields = {}
    token = (fields.get("key") or [""])[0].strip()
    next_path = safe_next((fields.get("next") or [DEFAULT_NEXT])[0])
    runtime: Runtime = request.app.state.runtime
    caller = await anyio.to_thread.run_sync(lambda: lookup(runtime, token, "cookie"))
    if caller is None:
        return _page(next_path, "That key is unknown or was revoked.", status=401)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        encode_cookie(token),
        max_age=COOKIE_MAX_AGE,
        path="/",
        httponly=True,
        samesite="strict",
        secure=_secure(request, runtime),
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@router.post("/signout")
def signout(request: Request) -> Response:
    """Forget the sign-in cookie and go back to the form."""
    runtime: Runtime = request.app.state.runtime
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(
        COOKIE_NAME, path="/", httponly=True, samesite="strict", secure=_secure(request, runtime)
    )
    return response


def _secure(request: Request, runtime: Runtime) -> bool:
    if runtime.settings.cookie_secure is not None:
        return runtime.settings.cookie_secure
    return request.url.scheme == "https"


def _same_origin(request: Request) -> bool:
    """Refuse a cross-site form post (login CSRF); browsers send Origin with every POST."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")
