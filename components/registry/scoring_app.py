"""The ASGI app `skinlesion serve` runs: MLflow's scoring server (mlflow.pyfunc.scoring_server,
what `mlflow models serve` runs) behind a guard for what MLflow's own request handling lacks.

MLflow parses the request before the model sees it, and none of this can be configured there:
JSON nested 100k deep or a 5,000-digit integer raise out of its json.loads (HTTP 500); its 400
answers repeat the request ("Failed to predict data '<the rows>'", "Input: <the body>") or
carry a stack trace; the body has no size limit; and a request it gave up on (504 after
MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, 60 s) goes on running in its thread. For
POST /invocations the guard
- takes application/json only (415), a body of at most MAX_REQUEST_BYTES (413, read no
  further), with at most 8 brackets, braces and commas per allowed row plus 64 (a request
  needs a few per row: this bounds what parsing allocates), then parses it itself once,
  refusing nesting past Python's recursion limit and integers over MAX_DIGITS digits (400);
- replaces the text of every error answer with a fixed sentence, keeping only the reason the
  served model itself gave for refusing the request (request.refused);
- marks the request gone, which the model checks between rows, when the client disconnects
  or the answer has been sent (the 504 included).
Everything else (loading the model, /ping, /version, the timeout) is MLflow's.
"""
from __future__ import annotations

import asyncio
import json
import os

from components.registry.request import CURRENT_REQUEST, REFUSED, RequestState, limit

MODEL_ENV = "SKINLESION_SERVE_MODEL"   # the model URI create_app loads
MAX_REQUEST_BYTES = 64 * 2**20        # 256 HAM10000 JPEGs in base64 are about 25 MB
MAX_DIGITS = 20                       # longer integers parse in quadratic time; none is needed
MAX_NESTING = 16                      # a dataframe_split request nests 4 deep
USAGE = ('send {"dataframe_split": {"columns": ["image"], "data": [["<base64 image>"], ...]}, '
         '"params": {"batch_size": 32}} as application/json')
FIXED_ANSWERS = {
    400: ("BAD_REQUEST", f"{REFUSED}not a request this model takes; {USAGE}"),
    413: ("REQUEST_LIMIT_EXCEEDED", f"{REFUSED}the body is over the server's limit"),
    415: ("BAD_REQUEST", f"{REFUSED}{USAGE}"),
    504: ("DEADLINE_EXCEEDED", f"{REFUSED}it took longer than the server's time limit"),
    500: ("INTERNAL_ERROR", "the server failed on this request; its log has the details"),
}


class _LongNumber(ValueError):
    pass


def _nesting(value) -> int:
    """How deep lists and dicts nest in a parsed JSON value (iterative: no recursion limit;
    the values are few, the token count bounded them)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict)
                                                  else item))
    return deepest


def _short_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_DIGITS:
        raise _LongNumber
    return int(digits)


class RequestGuard:
    """ASGI middleware around MLflow's scoring app (see the module docstring)."""

    def __init__(self, app, max_bytes: int, max_rows: int):
        self.app = app
        self.max_bytes = max_bytes
        self.max_rows = max_rows
        self.max_tokens = 8 * max_rows + 64
        self.too_large = f"{REFUSED}the body is over {max_bytes:,} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" \
                or scope["path"].rstrip("/") != "/invocations":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            return await self._answer(send, 415)
        if int(headers.get(b"content-length", b"0") or 0) > self.max_bytes:
            return await self._answer(send, 413, self.too_large)
        body = await self._read_body(receive)
        if body is None:
            return await self._answer(send, 413, self.too_large)
        problem = self._json_problem(body)
        if problem:
            return await self._answer(send, 400, f"{REFUSED}{problem}")
        state, disconnected = RequestState(), asyncio.Event()
        token = CURRENT_REQUEST.set(state)
        watcher = asyncio.ensure_future(self._watch_disconnect(receive, state, disconnected))
        try:
            await self.app(scope, self._replay(body, disconnected),
                           self._clean_errors(send, state))
        finally:
            state.gone.set()
            watcher.cancel()
            CURRENT_REQUEST.reset(token)

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None when it is over the limit or the client left."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return None
            if not message.get("more_body"):
                return b"".join(chunks)

    def _json_problem(self, body: bytes) -> str:
        if body.count(b"[") + body.count(b"{") + body.count(b",") > self.max_tokens:
            return f"the JSON holds more values than {self.max_rows} rows need"
        try:
            parsed = json.loads(body, parse_int=_short_int)
        except RecursionError:  # deeper than this process's recursion limit
            return "the JSON nests too deep"
        except _LongNumber:
            return f"a number in the JSON has over {MAX_DIGITS} digits"
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            return "the body is not valid JSON"
        # The recursion limit differs between processes (a library may raise it): the depth
        # is checked on its own, so MLflow's parser never gets a structure no request has.
        return "the JSON nests too deep" if _nesting(parsed) > MAX_NESTING else ""

    @staticmethod
    async def _watch_disconnect(receive, state: RequestState, disconnected: asyncio.Event):
        # After the body, uvicorn's receive() returns only when the client disconnects (or the
        # answer is complete).
        while (await receive())["type"] != "http.disconnect":
            pass
        state.gone.set()
        disconnected.set()

    @staticmethod
    def _replay(body: bytes, disconnected: asyncio.Event):
        """The app's receive: the body read already, then the client's disconnect."""
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if pending:
                return pending.pop()
            await disconnected.wait()
            return {"type": "http.disconnect"}
        return receive

    def _clean_errors(self, send, state: RequestState):
        """The app's send: answers under 400 pass; an error's text becomes a fixed sentence."""
        status = 200

        async def clean_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            if status < 400:
                return await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                await self._answer(send, status, state.refusal if status == 400 else "")
        return clean_send

    async def _answer(self, send, status: int, message: str = "") -> None:
        code, default = FIXED_ANSWERS.get(status, FIXED_ANSWERS[500 if status >= 500 else 400])
        body = json.dumps({"error_code": code, "message": message or default}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app():
    """uvicorn's app factory: the model named by SKINLESION_SERVE_MODEL in MLflow's scoring
    server, behind the guard."""
    import mlflow
    from mlflow.pyfunc import scoring_server

    from components.registry import serving

    app = scoring_server.init(mlflow.pyfunc.load_model(os.environ[MODEL_ENV]))
    return RequestGuard(app, limit("MAX_REQUEST_BYTES", MAX_REQUEST_BYTES),
                        limit("MAX_ROWS", serving.MAX_ROWS))
