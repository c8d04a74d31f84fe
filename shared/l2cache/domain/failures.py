"""The failure contract: every error is permanent or transient, and that decides its fate.

One mechanism for every entry point (compute_chunk tasks, split tasks, on_edit
messages, the CLI):

============================  =========================  ==============================
failure                       Cloud Tasks                Pub/Sub (on_edit)
============================  =========================  ==============================
permanent (bad input, outside 2xx, recorded with the     ack; dead-lettered with the
the volume, corrupt/missing   reason (ledger ``failed``) reason
input, unknown dataset/run)
transient (anything else:     5xx, retried with backoff  5xx, redelivered with backoff
Bigtable, storage, network)   (ledger ``retrying``)
retries exhausted             2xx on the last attempt,   ack on the last delivery,
                              ledger ``failed: gave up   dead-lettered "gave up after
                              after N attempts: ...``    N attempts: ..."
============================  =========================  ==============================

A permanent error is raised as a :class:`PermanentError` (or a subclass) where it is
detected; everything else is transient by default, because retrying an unknown error a
bounded number of times is safe and recording it as permanent could lose work. The
"last attempt" is known from the configured maximum and a count of attempts: Cloud
Tasks' retry-count header for a task; for a message, the per-event delivery count the
ledger keeps (functions-framework drops Pub/Sub's ``deliveryAttempt`` from the
CloudEvent, so on_edit cannot read it). So every run ends: no chunk or message stays
"retrying" after its queue has given up.
"""

from __future__ import annotations

PERMANENT = "permanent"
TRANSIENT = "transient"


class PermanentError(ValueError):
    """Retrying cannot help: record the reason and stop."""


class BadRequest(PermanentError):
    """A task or message that is malformed or names something that does not exist."""


class OutsideVolume(PermanentError):
    """A chunk (or an L2 id's chunk) that lies outside the dataset's volume."""


class MissingInput(PermanentError):
    """Segmentation data absent where the graph says there are supervoxels."""


class CorruptInput(PermanentError):
    """Segmentation data present but undecodable."""


class InconsistentInput(PermanentError):
    """Supervoxels and the graph disagree (no L2 parent, a parent in another chunk, or
    supervoxels the graph has that the segmentation lacks). ``counts`` (orphan_sv,
    stray_ids, ghost_sv) go into the ledger row with the reason."""

    def __init__(self, message: str, **counts: int) -> None:
        super().__init__(message)
        self.counts = counts


class GeometryMismatch(InconsistentInput):
    """Labels right, geometry wrong: supervoxels the graph joins to a neighbouring chunk
    across a face are not on that face (a mirrored or transposed chunk file). ``counts``
    (misplaced_sv, face_sv) go into the ledger row with the reason."""


class RevisionMismatch(PermanentError):
    """A run pinned to one code revision, reached by a worker running another."""


class RunClosed(PermanentError):
    """A write for a run that was closed (fenced by ``runs rollback``): refused for good,
    so a late worker never puts back cells the rollback removed."""


def classify(exc: BaseException) -> str:
    """``"permanent"`` or ``"transient"`` for any exception.

    Besides :class:`PermanentError`, Google API answers that no retry can change are
    permanent: a missing table (NOT_FOUND: the cache, runs or graph table alike), a
    refused grant (PERMISSION_DENIED) and a malformed request (INVALID_ARGUMENT), whether
    raised directly, as the cause of another exception, or as every row code of a
    failed checked write.
    """
    if isinstance(exc, PermanentError):
        return PERMANENT
    from google.api_core import exceptions as api

    final = (api.NotFound, api.PermissionDenied, api.InvalidArgument)
    if isinstance(exc, final) or isinstance(exc.__cause__, final):
        return PERMANENT
    codes = getattr(exc, "codes", None)  # a WriteError: per-row status codes
    if codes and all(code in FINAL_ROW_CODES for code in codes):
        return PERMANENT
    return TRANSIENT


# gRPC status codes of a row that no retry can change: INVALID_ARGUMENT, NOT_FOUND,
# PERMISSION_DENIED
FINAL_ROW_CODES = frozenset({3, 5, 7})
# Pub/Sub attribute limits: at most 100 attributes, values at most 1024 bytes.
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_BYTES = 1024


def dead_letter_attributes(attributes: dict, reason: str, message_id: str) -> dict[str, str]:
    """The original attributes plus the reason, within Pub/Sub's limits.

    A dead-letter publish that Pub/Sub refuses would turn a recorded permanent failure
    into a 5xx loop, so the reason is cut to 1,024 UTF-8 bytes and the copied
    attributes to what fits beside the two added ones.
    """
    out = {str(k)[:256]: _cut(str(v)) for k, v in list(attributes.items())[: MAX_ATTRIBUTES - 2]}
    out["dead_letter_reason"] = _cut(reason)
    out["original_message_id"] = _cut(message_id)
    return out


def _cut(text: str, limit: int = MAX_ATTRIBUTE_BYTES) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[:limit].decode(errors="ignore")


def describe(exc: BaseException) -> str:
    """A one-line reason for the ledger and dead letters (type name kept for transients)."""
    if isinstance(exc, PermanentError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def is_last_attempt(attempt: int, max_attempts: int | None) -> bool:
    """Whether ``attempt`` (1-based) is the last one the transport will make."""
    return max_attempts is not None and max_attempts > 0 and attempt >= max_attempts


def gave_up(attempt: int, exc: BaseException) -> str:
    """The recorded reason when the last attempt fails transiently."""
    return f"gave up after {attempt} attempts: {describe(exc)}"
