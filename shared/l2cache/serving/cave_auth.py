"""CAVE auth in the lookup path, with the real ``middle-auth-client`` library.

The existing L2 cache guards ``/table/<table>/attributes`` with
``auth_requires_permission("view")`` and its API index with ``auth_required``; this
module runs those same decorators around a no-op, inside the Flask request
functions-framework gives us, so every rule is the library's own: the token comes from
the ``Authorization: Bearer`` header, the ``middle_auth_token`` cookie or query
parameter; no token -> 401 (programmatic clients) or a redirect to the login page
(browsers); no ``view`` on the table's dataset -> 403; user lookups are cached per
token (``TOKEN_CACHE_TTL`` s, default 300, ``TOKEN_CACHE_MAXSIZE`` tokens).

The library reads its settings (``AUTH_URL`` etc.) from the environment when it is
imported; :func:`configure_library` puts the dataset map's ``auth`` section there
first, and refuses a conflicting environment rather than guessing which one wins.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import orjson

from l2cache.config import AuthConfig, ConfigError
from l2cache.serving.api import Response

if TYPE_CHECKING:
    import flask

SERVICE_TOKEN_ENV = "AUTH_TOKEN"
_PASSED = object()


def configure_library(cfg: AuthConfig) -> None:
    """Export the map's auth settings as the library's environment, before its import."""
    wanted = {"AUTH_URL": cfg.url}
    if cfg.sticky_url:
        wanted["STICKY_AUTH_URL"] = cfg.sticky_url
    for key, value in wanted.items():
        have = os.environ.get(key)
        if have is not None and have != value:
            raise ConfigError(
                f"auth: the dataset map says {key}={value!r}, the environment {have!r}"
            )
    imported = sys.modules.get("middle_auth_client.decorators")
    if imported is not None and imported.AUTH_URL != cfg.url:
        raise ConfigError("auth: middle_auth_client was imported before it was configured")
    os.environ.update(wanted)
    os.environ.setdefault("AUTH_URI", cfg.url)  # where the library mounts its retries


class CaveAuth:
    """An authorizer for :meth:`l2cache.serving.api.LookupService.handle`."""

    def __init__(self, cfg: AuthConfig, service_token: str | None = None) -> None:
        configure_library(cfg)
        import middle_auth_client  # noqa: F401 - imported after configuration on purpose

        self.cfg = cfg
        # A service account token for the table -> dataset lookup (the existing
        # service's AUTH_TOKEN); else the user's own token is used for it.
        self.service_token = service_token or os.environ.get(SERVICE_TOKEN_ENV) or None

    def __call__(
        self, table_id: str | None, permission: str | None, auth_dataset: str | None
    ) -> Response | None:
        """None when the request may go on, else the library's refusal (401/403/302/400)."""
        from middle_auth_client import auth_required, auth_requires_permission

        def passed() -> object:
            return _PASSED

        if permission is None:
            guarded = auth_required(passed)
        else:
            guarded = auth_requires_permission(
                permission,
                table_id=table_id,
                dataset=auth_dataset,
                resource_namespace=self.cfg.service_namespace,
                service_token=self.service_token,
            )(passed)
        outcome = guarded()
        return None if outcome is _PASSED else _as_response(outcome)


def _as_response(flask_response: flask.Response) -> Response:
    """The library's Flask response, with ``code`` added to its JSON error body.

    Its body is ``{"error": "no_token", "message": ..., "data": ...}``; keeping it and
    adding ``code`` gives clients both the library's fields and our error contract.
    """
    body = flask_response.get_data()
    status = flask_response.status_code
    if flask_response.mimetype == "application/json":
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        if isinstance(payload, dict):
            payload.setdefault("code", status)
            payload.setdefault("message", str(payload.get("error", "")))
            body = orjson.dumps(payload) + b"\n"
    headers = {k: v for k, v in flask_response.headers.items() if k.lower() != "content-length"}
    return Response(status, body, headers)
