"""Typed errors shared by server and client. Each carries a gRPC status name; the servicer
maps them to statuses in one place and the client maps statuses back."""

from __future__ import annotations


class CkptError(Exception):
    code = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CkptError):
    code = "INVALID_ARGUMENT"


class NotFound(CkptError):
    code = "NOT_FOUND"


class AlreadyExists(CkptError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(CkptError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(CkptError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(CkptError):
    code = "UNAVAILABLE"


class DeadlineExceeded(CkptError):
    code = "DEADLINE_EXCEEDED"


class Aborted(CkptError):
    code = "ABORTED"


class Unimplemented(CkptError):
    code = "UNIMPLEMENTED"


class Internal(CkptError):
    code = "INTERNAL"


class Unauthenticated(CkptError):
    code = "UNAUTHENTICATED"


class PermissionDenied(CkptError):
    code = "PERMISSION_DENIED"


class DataLoss(CkptError):
    """Bytes are not what they must be (a short read, a delta that does not apply)."""

    code = "DATA_LOSS"


BY_CODE: dict[str, type[CkptError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Aborted,
        Unimplemented,
        Internal,
        Unauthenticated,
        PermissionDenied,
        DataLoss,
    )
}


def error_for(code: str, message: str) -> CkptError:
    return BY_CODE.get(code, CkptError)(message)
