"""
The one kind of refusal every part raises and the HTTP API answers as it is:
a status and a stable code, as C{{"error": {"code", "message"}}}.
"""

from __future__ import annotations


class ApiError(Exception):
    """
    An answer other than success, with its status and a stable error code.
    Raised by the API's routes and by what they call (the media streams, the
    recorder), so a refusal reads the same wherever it is decided.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, str]:
        """The C{error} object of the answer."""
        return {"code": self.code, "message": self.message}
