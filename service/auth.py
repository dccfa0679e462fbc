"""Who is calling: API keys (``Authorization: Bearer``), the dashboard's sign-in cookie, roles.

Every route that touches stored data depends on one of the callables here (most through
``service.deps.NamespaceDep``); the namespace a route acts in is always the caller's key's
namespace, so rows of other namespaces answer 404 exactly like rows that do not exist.

Rules (``docs/security.md`` says why):

- A key arrives as ``Authorization: Bearer <key>``. ``?key=`` is never read.
- The sign-in cookie (:data:`COOKIE_NAME`, set by ``POST /signin``; HttpOnly, SameSite=Strict)
  is accepted for ``GET``/``HEAD`` only, so a cross-site form can never change anything.
- Roles: ``read`` may read (GET/HEAD), ``write`` may also create, upload, commit, cancel and
  delete, ``admin`` may also read server-wide data (``/metrics``).
- 401 ``unauthorized``: no key, an unknown or revoked key. 403 ``forbidden``: the key is valid
  but its role is too low. Rows of another namespace: 404 ``not_found``.
- Open mode (``SLIM_OPEN=true``, loopback only; see ``runtime.settings``): no key needed, every
  request acts as admin of the default namespace.
- ``/healthz``, ``/readyz``, ``/openapi.json``, ``/docs``, ``/redoc`` (and their assets) and the
  sign-in page need no key: they reveal nothing stored.
- The OpenAPI document declares the ``bearer`` scheme (:data:`BEARER_SCHEME`) on every route
  whose dependency checks a key, so ``/docs``' "Authorize" button sends it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, ClassVar
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request, Security
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from runtime.process import Runtime
from service.errors import ApiError, error_response
from storage import keys
from storage.db import begin_write, is_sqlite
from storage.models import DEFAULT_NAMESPACE, ApiKey, ApiKeyRole

log = logging.getLogger("slim.auth")

#: The dashboard's sign-in cookie: the key, base64url-encoded (cookie-safe), HttpOnly.
COOKIE_NAME = "slim_key"
#: How long the sign-in cookie lives (seconds).
COOKIE_MAX_AGE = 12 * 3600
#: Methods that never change anything (the only ones the cookie is accepted for).
SAFE_METHODS = frozenset({"GET", "HEAD"})

#: The OpenAPI security scheme ``bearer`` (what ``/docs``' "Authorize" button fills in). It is
#: declared by every key-checking dependency below and checks nothing itself
#: (``auto_error=False``): :func:`authenticate` reads the header and answers 401/403.
BEARER_SCHEME = HTTPBearer(
    scheme_name="bearer",
    bearerFormat="slim_<prefix>_<secret>",
    description=(
        "An API key, sent as `Authorization: Bearer <key>`. `slim serve` prints the first "
        "admin key; `slim keys create --namespace NS --role read|write|admin` makes more. "
        "`read` keys may GET/HEAD, `write` keys may also change things, `admin` keys may also "
        "read `/metrics`."
    ),
    auto_error=False,
)
#: A dependency parameter that puts the ``bearer`` scheme on a route's OpenAPI operation.
DeclaredBearer = Annotated[HTTPAuthorizationCredentials | None, Security(BEARER_SCHEME)]


class Unauthorized(ApiError):
    code = "unauthorized"
    headers: ClassVar[dict[str, str] | None] = {"WWW-Authenticate": 'Bearer realm="slimstore"'}


class Forbidden(ApiError):
    code = "forbidden"


class SignInRequired(Exception):
    """A browser page needs a signed-in caller: answered with a redirect to the sign-in form
    (or 401 JSON for clients that do not accept HTML)."""

    def __init__(self, next_path: str, detail: str) -> None:
        super().__init__(detail)
        self.next_path = next_path
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller: the namespace it acts in, its role, and how it proved it."""

    namespace: str
    role: ApiKeyRole
    key_prefix: str | None  # None in open mode
    via: str  # bearer | cookie | open

    def allows(self, role: ApiKeyRole | str) -> bool:
        return keys.role_allows(self.role, role)


# -- reading credentials -----------------------------------------------------------------------


def encode_cookie(token: str) -> str:
    return base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def decode_cookie(value: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None


def bearer_token(request: Request) -> str | None:
    """The key of an ``Authorization: Bearer`` header; None when there is no such header.

    Raises:
        Unauthorized: an Authorization header of another scheme, or an empty one.
    """
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            "send the API key as 'Authorization: Bearer <key>' (create one with "
            "`slim keys create --namespace NS --role read|write|admin`)"
        )
    return token


def lookup(runtime: Runtime, token: str, via: str) -> Caller | None:
    """The caller a key belongs to, or None for an unknown or revoked key."""
    with runtime.sessions() as session:
        row = keys.authenticate(session, token)
        if row is None:
            return None
        return Caller(row.namespace, ApiKeyRole(row.role), row.key_prefix, via)


def authenticate(request: Request, *, allow_cookie: bool) -> Caller:
    """The caller of ``request`` (cached on ``request.state``).

    Raises:
        Unauthorized: no credentials, or an unknown or revoked key.
    """
    cached: Caller | None = getattr(request.state, "caller", None)
    if cached is not None and (allow_cookie or cached.via != "cookie"):
        return cached
    runtime: Runtime = request.app.state.runtime
    if runtime.settings.open:
        caller = Caller(DEFAULT_NAMESPACE, ApiKeyRole.ADMIN, None, "open")
    else:
        token, via = bearer_token(request), "bearer"
        if token is None and allow_cookie:
            raw = request.cookies.get(COOKIE_NAME)
            token, via = (decode_cookie(raw) if raw else None), "cookie"
        if token is None:
            raise Unauthorized(
                "this route needs an API key: send 'Authorization: Bearer <key>' (keys are "
                "created with `slim keys create`; `slim serve` prints the first one)"
            )
        found = lookup(runtime, token, via)
        if found is None:
            raise Unauthorized(
                "the API key is unknown or was revoked; ask an admin for a new one "
                "(`slim keys create`)"
            )
        caller = found
    request.state.caller = caller
    return caller


def _check_role(caller: Caller, need: ApiKeyRole) -> Caller:
    if not caller.allows(need):
        raise Forbidden(
            f"this key has role {caller.role.value!r}; the request needs {need.value!r} — "
            "use a key with that role"
        )
    return caller


# -- dependencies ------------------------------------------------------------------------------


def require(role: ApiKeyRole) -> Callable[[Request, DeclaredBearer], Caller]:
    """A dependency: the caller, who must present a key (Bearer; the cookie too for GET/HEAD)
    of at least ``role``. Raises 401/403 otherwise.

    Example::

        @router.get("/metrics", dependencies=[Depends(require(ApiKeyRole.ADMIN))])
    """

    def dependency(request: Request, _declared: DeclaredBearer) -> Caller:
        caller = authenticate(request, allow_cookie=request.method in SAFE_METHODS)
        return _check_role(caller, role)

    dependency.__name__ = f"require_{role.value}"
    return dependency


def method_caller(request: Request, _declared: DeclaredBearer) -> Caller:
    """The caller, with the role the HTTP method needs: ``read`` for GET/HEAD, ``write`` for
    everything else. This is what ``service.deps.NamespaceDep`` uses."""
    need = ApiKeyRole.READ if request.method in SAFE_METHODS else ApiKeyRole.WRITE
    return require(need)(request, _declared)


def dashboard_caller(request: Request) -> Caller:
    """**The dashboard's dependency**: the signed-in caller of a browser page (role ``read`` or
    higher), from the sign-in cookie or a Bearer key.

    Use it on every HTML page route (``caller: DashboardCallerDep``) and show only
    ``caller.namespace``'s data. Without a valid key a browser is redirected (303) to
    ``/signin?next=<this page>``; a client that does not accept HTML gets 401 JSON. Sign-out is
    ``POST /signout`` (a form button; clears the cookie and redirects to ``/signin``).
    """
    try:
        caller = authenticate(request, allow_cookie=True)
    except Unauthorized as exc:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(target, exc.detail) from None
    return _check_role(caller, ApiKeyRole.READ)


CallerDep = Annotated[Caller, Depends(method_caller)]
ReadCallerDep = Annotated[Caller, Depends(require(ApiKeyRole.READ))]
AdminCallerDep = Annotated[Caller, Depends(require(ApiKeyRole.ADMIN))]
DashboardCallerDep = Annotated[Caller, Depends(dashboard_caller)]


def install(app: FastAPI) -> None:
    """Register the sign-in redirect of browser pages."""

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, exc: SignInRequired) -> Response:
        if "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(f"/signin?next={quote(exc.next_path, safe='/')}", 303)
        response: JSONResponse = error_response("unauthorized", exc.detail)
        response.headers.update(Unauthorized.headers or {})
        return response


# -- the first key -----------------------------------------------------------------------------

#: Arbitrary constant naming the PostgreSQL advisory lock that serialises bootstraps.
_BOOTSTRAP_LOCK = 0x511_7E5


def bootstrap(runtime: Runtime) -> str | None:
    """Make sure an admin can get in; returns a generated key to show once, or None.

    With ``SLIM_BOOTSTRAP_KEY``: that value is added as an admin key of the default namespace
    unless a key with its prefix exists already (a revoked one stays revoked). Without it, on a
    fresh install (no key ever created) a random admin key is created and returned. Nothing
    happens in open mode. Database trouble is logged, not raised: the server still starts and
    keys can be created with ``slim keys create``.
    """
    settings = runtime.settings
    if settings.open:
        return None
    given = settings.bootstrap_key.get_secret_value() if settings.bootstrap_key else None
    try:
        with runtime.sessions() as session:
            begin_write(session)
            if not is_sqlite(session):
                session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _BOOTSTRAP_LOCK})
            if given is not None:
                if not _prefix_taken(session, given):
                    keys.create_key(
                        session,
                        role=ApiKeyRole.ADMIN,
                        name="bootstrap (SLIM_BOOTSTRAP_KEY)",
                        token=given,
                    )
                    session.commit()
                    log.info("bootstrap admin key %s added", keys.prefix_of(given))
                return None
            if keys.has_keys(session):
                return None
            token, _ = keys.create_key(session, role=ApiKeyRole.ADMIN, name="first admin key")
            session.commit()
            return token
    except SQLAlchemyError as exc:
        log.warning("could not check the API keys (run `slim migrate`?): %s", exc)
        return None


def _prefix_taken(session: Session, token: str) -> bool:
    stmt = select(ApiKey.id).where(ApiKey.key_prefix == keys.prefix_of(token))
    return session.scalars(stmt).first() is not None


def announce_first_key(token: str, url: str | None = None) -> None:
    """Print a generated first admin key once, where the operator starting the server sees it."""
    where = f" at {url}" if url else ""
    print(
        f"\nslim: first admin key (namespace default; shown once, store it now):\n\n"
        f"    {token}\n\n"
        f"Use it as 'Authorization: Bearer <key>' (export SLIM_API_KEY=...), sign in to the "
        f"dashboard{where}/signin with it, and create narrower keys with `slim keys create`.\n",
        file=sys.stderr,
        flush=True,
    )
