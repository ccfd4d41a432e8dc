"""Access control and request-size limits: the optional API key and a cap on request bodies."""

from __future__ import annotations

import json
import secrets

from fastapi import HTTPException, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer


KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="the service's API key")
BEARER = HTTPBearer(auto_error=False, description="the service's API key as a Bearer token")


def api_key_dependency(api_key: str | None):
    """A FastAPI dependency: with a key configured, the request must carry it (Bearer token or X-API-Key). Both
    ways are declared as security schemes in the OpenAPI document."""

    async def require_api_key(header: str | None = Security(KEY_HEADER),
                              bearer: HTTPAuthorizationCredentials | None = Security(BEARER)) -> None:
        if api_key is None:
            return
        given = header if header is not None else bearer.credentials if bearer is not None else None
        if given is None or not secrets.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, "this endpoint needs the API key: 'Authorization: Bearer <key>' or "
                                     "'X-API-Key: <key>'", headers={"WWW-Authenticate": "Bearer"})

    return require_api_key


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413, whether or not it declares its length."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = f"request body too large: at most {self.max_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            body = json.dumps({"detail": too_large}).encode()
            await send({"type": "http.response.start", "status": 413, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body})
        seen = 0

        async def counted_receive():  # a body without a (truthful) length: stop reading past the limit
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, too_large)  # FastAPI answers it while reading the body
            return message

        await self.app(scope, counted_receive, send)


async def one_error_shape(request, error: RequestValidationError) -> JSONResponse:
    """Malformed input answers like every other error: 422 with `detail` a sentence (where and what), not a list."""
    problems = [f"{'.'.join(str(part) for part in problem['loc'] if part != 'body') or 'body'}: {problem['msg']}"
                for problem in error.errors()]
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)
