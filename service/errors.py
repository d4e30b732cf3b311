"""Errors are data: every failure is {"error": {"code": ..., "message": ...}} with a stable code.

Codes: bad_request, malformed_json, validation_error, question_empty, question_too_long, empty_upload,
invalid_multipart, missing_file, unauthorized, not_found, method_not_allowed, cors_rejected, video_failed,
payload_too_large, unsupported_media_type, multipart_required, upload_timeout, storage_full,
redis_unavailable, no_workers, queue_unavailable, invalid_token, invalid_range, range_not_satisfiable,
conversation_mismatch, url_forbidden, url_unreachable, url_too_large, url_timeout, unsupported_media,
internal_error; under /v1 also invalid_purpose, invalid_messages, video_required, too_many_videos,
invalid_data_url, model_not_found, answer_timeout.

Under /v1 (the OpenAI-compatible API) the same errors take OpenAI's shape, {"error": {"message", "type",
"param", "code"}}, with the statuses OpenAI uses (a request that fails validation is a 400), so the `openai`
SDKs raise their usual exception classes.
"""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from service.openai_schemas import OpenAIErrorBody
from service.schemas import ErrorBody

log = logging.getLogger(__name__)

_CODE_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    503: "unavailable",
}


OPENAI_PREFIX = "/v1/"
_OPENAI_TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                          429: "rate_limit_error"}  # fmt: skip


class APIError(Exception):
    """Raise anywhere in a request: becomes the JSON error body with this status and code (and, under /v1,
    `param`: the request field at fault)."""

    def __init__(
        self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None,
        param: str | None = None,
    ):  # fmt: skip
        super().__init__(message)
        self.status_code, self.code, self.message, self.headers = status_code, code, message, headers
        self.param = param


def not_found(what: str) -> APIError:
    # The same answer whether the thing does not exist or belongs to another tenant: ids never leak.
    return APIError(404, "not_found", f"{what} not found")


def is_openai(path: str) -> bool:
    """Whether a request path belongs to the OpenAI-compatible API, whose errors take OpenAI's shape."""
    return path.startswith(OPENAI_PREFIX)


def error_response(
    status_code: int, code: str, message: str, headers: dict | None = None, *, path: str = "",
    param: str | None = None,
) -> JSONResponse:  # fmt: skip
    """The error body for a request to `path`: ours, or OpenAI's shape under /v1."""
    if is_openai(path):
        status_code = 400 if status_code == 422 else status_code  # OpenAI's status for a bad parameter
        kind = _OPENAI_TYPE_BY_STATUS.get(status_code, "server_error" if status_code >= 500 else
                                          "invalid_request_error")  # fmt: skip
        error = {"message": message, "type": kind, "param": param, "code": code}
        return JSONResponse(OpenAIErrorBody.model_validate({"error": error}).model_dump(),
                            status_code=status_code, headers=headers)  # fmt: skip
    body = ErrorBody.model_validate({"error": {"code": code, "message": message}})
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def responses(*status_codes: int) -> dict[int | str, dict]:
    """OpenAPI `responses=` entries documenting the error body for these statuses."""
    return {status: {"model": ErrorBody} for status in status_codes}


def openai_responses(*status_codes: int) -> dict[int | str, dict]:
    """`responses` for the /v1 routes: OpenAI's error body."""
    return {status: {"model": OpenAIErrorBody} for status in status_codes}


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    return f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", "invalid")


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status_code, exc.code, exc.message, exc.headers, path=request.url.path,
                          param=exc.param)  # fmt: skip


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors, path = exc.errors(), request.url.path
    if any(error.get("type") == "json_invalid" for error in errors):
        return error_response(400, "malformed_json", "the request body is not valid JSON", path=path)
    param = ".".join(str(part) for part in errors[0].get("loc", ()) if part != "body") if errors else ""
    message = "; ".join(_describe(error) for error in errors)
    return error_response(422, "validation_error", message, path=path, param=param or None)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 405:  # Starlette's Allow names the methods of the first route that matched only
        allow = ", ".join(allowed_methods(request.app, request.scope))
        message = f"{request.method} is not allowed here; allowed: {allow}"
        return error_response(405, "method_not_allowed", message, {"Allow": allow}, path=request.url.path)
    code = _CODE_BY_STATUS.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, getattr(exc, "headers", None),
                          path=request.url.path)  # fmt: skip


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at this path (HEAD wherever GET is: service/http.py), sorted. Asked of
    each route through `matches`, which sees through included routers."""
    allowed = [
        method
        for method in _METHODS
        if any(route.matches({**scope, "type": "http", "method": method})[0] == Match.FULL
               for route in app.router.routes)
    ]  # fmt: skip
    return sorted({*allowed, "HEAD"} if "GET" in allowed else allowed)


_METHODS = ("DELETE", "GET", "OPTIONS", "PATCH", "POST", "PUT")


async def _redis_refused(request: Request, exc: redis.ResponseError) -> JSONResponse:
    """Redis answered but cannot take writes now (a full disk under its AOF, maxmemory, a read-only
    replica): unavailable, like Redis down. Any other ResponseError is a bug: a 500, logged."""
    reply = str(exc).rpartition("caused error: ")[2]  # a pipeline names the command before the reply
    if reply.startswith(_REDIS_UNAVAILABLE_REPLIES) or isinstance(exc, redis.exceptions.ReadOnlyError):
        return await _redis_down(request, exc)
    return await _unexpected(request, exc)


_REDIS_UNAVAILABLE_REPLIES = ("MISCONF", "OOM", "READONLY", "LOADING", "MASTERDOWN", "NOREPLICAS")


async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
    log.warning("redis error on %s %s: %s", request.method, request.url.path, exc)
    message = "the job store is unavailable; retry later"
    return error_response(503, "redis_unavailable", message, {"Retry-After": "5"}, path=request.url.path)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal error", path=request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error with ErrorBody, and say so in the OpenAPI document."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(redis.ConnectionError, _redis_down)
    app.add_exception_handler(redis.TimeoutError, _redis_down)
    app.add_exception_handler(redis.ResponseError, _redis_refused)
    app.add_exception_handler(Exception, _unexpected)
    app.openapi = lambda: _openapi_with_error_body(app)


def _openapi_with_error_body(app: FastAPI) -> dict:
    """FastAPI documents its own 422 body (HTTPValidationError); ours is ErrorBody: point there instead."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        schemas = document.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        _document_limits(schemas, app.state.settings)
        for path, operations in document["paths"].items():
            if is_openai(path):  # answered with 400 there (documented by each route)
                for operation in operations.values():
                    operation["responses"].pop("422", None)
        app.openapi_schema = _replace_refs(document, "#/components/schemas/HTTPValidationError",
                                           "#/components/schemas/ErrorBody")  # fmt: skip
    return app.openapi_schema


def _document_limits(schemas: dict, settings) -> None:
    """The configured question limits, which the ask route checks itself (to answer with its own codes)."""
    ask = schemas.get("AskCreate", {}).get("properties", {})
    if "question" in ask:
        ask["question"].update(minLength=1, maxLength=settings.max_question_chars)
    if "max_new_tokens" in ask:
        ask["max_new_tokens"]["maximum"] = settings.max_new_tokens_limit


def _replace_refs(node, old: str, new: str):
    if isinstance(node, dict):
        return {key: new if key == "$ref" and value == old else _replace_refs(value, old, new)
                for key, value in node.items()}  # fmt: skip
    if isinstance(node, list):
        return [_replace_refs(item, old, new) for item in node]
    return node
