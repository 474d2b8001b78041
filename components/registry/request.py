"""What the guard of `skinlesion serve` (scoring_app.py) and the served model (serving.py), in
the worker thread that predicts, share about one request: whether it is gone, the model's
refusal of it, and the serving limits' environment settings.

Outside `skinlesion serve` (MLflow's scoring server alone, `skinlesion predict`, a notebook)
there is no current request: the model works as before, without the guard's extras.
"""
from __future__ import annotations

import os
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field

REFUSED = "request refused: "  # a whole request's error: a fixed sentence follows, no user data


@dataclass
class RequestState:
    """One request: set `gone` when the client left or the answer was sent (the 504 included),
    checked by the model between rows; `refusal` the model's sentence for a refused request."""
    gone: threading.Event = field(default_factory=threading.Event)
    refusal: str = ""


# Set by the guard for each request; asyncio.to_thread carries it into the thread that predicts.
CURRENT_REQUEST: ContextVar[RequestState | None] = ContextVar("skinlesion_request", default=None)


class RequestGone(RuntimeError):
    """The client of the request being predicted is gone: nobody will read the answer."""


def limit(name: str, default: int) -> int:
    """A serving limit: SKINLESION_SERVING_<name> from the environment, else `default`."""
    return int(os.environ.get(f"SKINLESION_SERVING_{name}", default))


def refused(reason: str):
    """The HTTP 400 error of a whole request, `reason` a fixed sentence without user data.
    MLflow's scoring server prefixes the rows to its text; the guard answers with the reason
    alone."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    if (request := CURRENT_REQUEST.get()) is not None:
        request.refusal = REFUSED + reason
    return MlflowException(REFUSED + reason, error_code=INVALID_PARAMETER_VALUE)
