"""Lookup HTTP function: the L2 cache API (``/l2cache/api/v1/...``).

Thin by design: adapt the Flask request, let ``l2cache.serve`` do the work.
"""

from __future__ import annotations

import functions_framework

from l2cache.serve import LookupService

_service: LookupService | None = None


def _get_service() -> LookupService:
    # Built on the first request, then reused by every request of this instance.
    global _service
    if _service is None:
        _service = LookupService.from_env()
    return _service


@functions_framework.http
def lookup(request):
    response = _get_service().handle(
        request.method, request.path, request.args, request.headers, request.get_data()
    )
    return response.body, response.status, response.headers
