"""API keys: generation, hashing, lookup, creation, listing, revocation.

A key looks like ``slim_<prefix>_<secret>``: ``prefix`` (12 lowercase hex characters) is the
public handle stored in clear and shown in listings; ``secret`` (48 hex characters, 192 bits)
is shown once, when the key is created, and only a slow hash of the whole key is kept
(``scrypt`` with a per-key salt; see :func:`hash_key`). A leaked ``api_keys`` table therefore
gives an attacker nothing to present.

Keys supplied from outside (``SLIM_BOOTSTRAP_KEY``) need not follow the format: any string of
at least :data:`MIN_KEY_LENGTH` characters is accepted, and its lookup prefix is derived from a
digest of the value (:func:`prefix_of`).

Verifying a key costs one scrypt evaluation (tens of milliseconds, on purpose); a process
remembers keys it has verified (:class:`VerifiedCache`, in memory only, keyed by a digest of the
presented value and the stored hash), so a client making many requests pays it once. The row
is still read on every request, so a revocation takes effect at once.

Example:
    >>> token, row = create_key(session, namespace="team-a", role=ApiKeyRole.WRITE, name="ci")
    >>> session.commit()
    >>> print(token)  # show it once
    >>> key = authenticate(session, token)  # the ApiKey row, or None
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import InvalidArgument
from storage.errors import AlreadyExists, NotFound, StorageError
from storage.models import DEFAULT_NAMESPACE, ApiKey, ApiKeyRole, utcnow

KEY_PREFIX = "slim_"
MIN_KEY_LENGTH = 20
#: Longest value looked at; anything longer is refused before it is hashed.
MAX_KEY_LENGTH = 512
#: scrypt cost: n=2**14, r=8, p=1 (16 MiB, ~30-60 ms per check; RFC 7914 interactive setting).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
_SCHEME = "scrypt"
_FORMAT = re.compile(r"^slim_([0-9a-f]{12})_([0-9a-f]{48})$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Role order: each role can do what the ones before it can.
ROLE_ORDER = (ApiKeyRole.READ, ApiKeyRole.WRITE, ApiKeyRole.ADMIN)


class InvalidNamespace(InvalidArgument, StorageError):
    """A namespace name breaks the naming rule (the core's ``invalid_argument``)."""


def role_allows(have: ApiKeyRole | str, need: ApiKeyRole | str) -> bool:
    """Whether a key of role ``have`` may do what needs role ``need``."""
    return ROLE_ORDER.index(ApiKeyRole(have)) >= ROLE_ORDER.index(ApiKeyRole(need))


def check_namespace(namespace: str) -> str:
    """Return ``namespace`` if it is 1-64 characters of ``[A-Za-z0-9._-]`` (starting with a
    letter or digit), else raise :class:`InvalidNamespace`."""
    if not _NAMESPACE.match(namespace):
        raise InvalidNamespace(
            f"invalid namespace {namespace!r}; use 1-64 letters, digits, '.', '_' or '-'"
        )
    return namespace


def generate_key() -> str:
    """A fresh random key ``slim_<12 hex>_<48 hex>`` (nothing is stored)."""
    return f"{KEY_PREFIX}{secrets.token_hex(6)}_{secrets.token_hex(24)}"


def prefix_of(token: str) -> str:
    """The lookup prefix of a presented key: the ``<prefix>`` part of a formatted key, else
    ``x`` + 11 hex characters of its sha256 (for free-form bootstrap keys)."""
    match = _FORMAT.match(token)
    if match:
        return match.group(1)
    return "x" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:11]


def hash_key(token: str, *, salt: bytes | None = None) -> str:
    """The stored form of a key: ``scrypt$n$r$p$<salt b64>$<hash b64>`` (random 16-byte salt)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = _scrypt(token, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return "$".join(
        (_SCHEME, str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest))
    )


def verify_key(token: str, stored: str) -> bool:
    """Whether ``token`` hashes to ``stored`` (constant-time comparison; False if malformed)."""
    try:
        scheme, n, r, p, salt, want = stored.split("$")
        if scheme != _SCHEME:
            return False
        got = _scrypt(token, _unb64(salt), int(n), int(r), int(p))
        return hmac.compare_digest(got, _unb64(want))
    except (ValueError, TypeError):
        return False


class VerifiedCache:
    """Remembers (presented key, stored hash) pairs that verified, so the slow hash runs once
    per key and process. Keyed by a sha256 of the presented value (never the value itself)."""

    def __init__(self, size: int = 4096, concurrent_hashes: int = 4) -> None:
        self._size = size
        self._seen: OrderedDict[tuple[bytes, str], None] = OrderedDict()
        self._lock = threading.Lock()
        # Each slow hash takes 16 MiB for tens of milliseconds: bound how many run at once.
        self._slots = threading.BoundedSemaphore(concurrent_hashes)

    def check(self, token: str, stored: str) -> bool:
        entry = (hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest(), stored)
        with self._lock:
            if entry in self._seen:
                self._seen.move_to_end(entry)
                return True
        with self._slots:
            if not verify_key(token, stored):
                return False
        with self._lock:
            self._seen[entry] = None
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)
        return True


_CACHE = VerifiedCache()


def authenticate(session: Session, token: str, cache: VerifiedCache | None = None) -> ApiKey | None:
    """The live (not revoked) key row ``token`` belongs to, or None.

    One indexed lookup by prefix; the hash is checked against the row (cached per process).
    """
    if not MIN_KEY_LENGTH <= len(token) <= MAX_KEY_LENGTH or not token.isprintable():
        return None
    row = session.scalars(select(ApiKey).where(ApiKey.key_prefix == prefix_of(token))).first()
    if row is None or row.revoked_at is not None:
        return None
    if not (cache or _CACHE).check(token, row.key_hash):
        return None
    return row


def live_key(session: Session, key_prefix: str) -> ApiKey | None:
    """The live (not revoked) key row of a prefix, or None (for URLs signed for a key)."""
    row = session.scalars(select(ApiKey).where(ApiKey.key_prefix == key_prefix)).first()
    return row if row is not None and row.revoked_at is None else None


def create_key(
    session: Session,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    role: ApiKeyRole | str = ApiKeyRole.READ,
    name: str = "",
    token: str | None = None,
) -> tuple[str, ApiKey]:
    """Add a key row (flushed, not committed); returns ``(token, row)``. Show the token once.

    Args:
        token: use this value instead of a fresh random one (bootstrap keys).

    Raises:
        InvalidNamespace: the namespace breaks the naming rule.
        AlreadyExists: a key with the same prefix exists (only possible for a given token).
        ValueError: a given token is shorter than :data:`MIN_KEY_LENGTH` or not printable.
    """
    check_namespace(namespace)
    role = ApiKeyRole(role)
    if token is None:
        token = generate_key()
    elif not MIN_KEY_LENGTH <= len(token) <= MAX_KEY_LENGTH or not token.isprintable():
        raise ValueError(
            f"an API key must be {MIN_KEY_LENGTH}-{MAX_KEY_LENGTH} printable characters; "
            "generate one with `slim keys create` or `openssl rand -hex 32`"
        )
    prefix = prefix_of(token)
    if session.scalars(select(ApiKey).where(ApiKey.key_prefix == prefix)).first() is not None:
        raise AlreadyExists(f"a key with prefix {prefix} already exists")
    row = ApiKey(
        key_prefix=prefix, key_hash=hash_key(token), namespace=namespace, role=role, name=name
    )
    session.add(row)
    session.flush()
    return token, row


def list_keys(session: Session, *, namespace: str | None = None) -> Sequence[ApiKey]:
    """Every key (revoked ones included), oldest first, optionally of one namespace."""
    stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if namespace is not None:
        stmt = stmt.where(ApiKey.namespace == namespace)
    return session.scalars(stmt).all()


def revoke_key(session: Session, handle: str) -> ApiKey:
    """Revoke the key whose prefix or id is ``handle`` (idempotent; flushed, not committed).

    Raises:
        NotFound: no key has that prefix or id.
    """
    row = session.scalars(
        select(ApiKey).where((ApiKey.key_prefix == handle) | (ApiKey.id == handle))
    ).first()
    if row is None:
        raise NotFound(f"no API key with prefix or id {handle!r}; list them with `slim keys list`")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def has_keys(session: Session) -> bool:
    """Whether any key, revoked or not, was ever created (false only on a fresh install)."""
    return session.scalars(select(ApiKey.id).limit(1)).first() is not None


def _scrypt(token: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        token.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r, p=p, maxmem=64 << 20, dklen=32
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)
