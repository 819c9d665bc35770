"""A DICOMweb request refused as a whole, and the JSON answer its caller gets."""

from __future__ import annotations

from starlette.responses import JSONResponse, Response


class HTTPProblem(Exception):
    """A request refused as a whole, with the HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def problem_response(exc: HTTPProblem) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)
