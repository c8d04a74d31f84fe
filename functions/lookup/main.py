"""Lookup HTTP function: the L2 cache API (``/l2cache/api/v1/...``).

Thin by design: ``l2cache.lookup_http`` adds CORS and CAVE auth, ``l2cache.serve``
does the work.
"""

from __future__ import annotations

import functions_framework

from l2cache.lookup_http import handle


@functions_framework.http
def lookup(request):
    return handle(request)
