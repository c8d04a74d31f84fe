"""compute_chunk HTTP function, called by Cloud Tasks with one task per region/batch.

Thin by design: parse, let ``l2cache.worker`` do the work, answer with its status.
"""

from __future__ import annotations

import json

import functions_framework

from l2cache.config import load_config
from l2cache.worker import handle_task

_config = None


@functions_framework.http
def compute_chunk(request):
    global _config
    if _config is None:
        _config = load_config()
    status, summary = handle_task(_config, request.get_data(), request.headers)
    return json.dumps(summary), status, {"Content-Type": "application/json"}
