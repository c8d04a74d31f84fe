"""l2cache operations: what an operator runs against a deployment, never deployed.

Ingest planning, status, cost, SLOs, QC, releases and rollback. It imports the cloud
core (``l2cache``) and is imported by the dev tools (``l2cache_tools``), never the
other way round; no function archive contains it.
"""
