"""The registry client, shared by register, promote, predict and evaluate: where it points,
retrying a server that does not answer, the aliases, and looking versions up.

Connection errors are retried with exponential backoff (register.retries, register.backoff_s
in params.yaml); after that the caller gets RegistryUnavailable naming the tracking URI with
any password masked.
"""
from __future__ import annotations

import logging
import time

from components.common import tracking
from components.common.config import RegisterConfig

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous-champion"
MODEL_DESCRIPTION = (
    "Hybrid ConvNeXtV2 skin-lesion classifier (ISIC 2019, 8 classes). Research model, not a "
    "medical device. Aliases: `challenger` (latest registered), `champion` (promoted through "
    "the metric gate: `skinlesion promote`), `previous-champion`.")


def champion_uri(params_paths) -> str:
    """`models:/<register.model_name>@champion`: what predict and serve load by default."""
    return f"models:/{RegisterConfig.resolve(params_paths).model_name}@{CHAMPION}"


class RegistryUnavailable(RuntimeError):
    """The tracking / registry server could not be reached after the retries."""


def is_connection_error(err: BaseException) -> bool:
    """True for errors that a later retry can cure: the server not answering."""
    import requests

    if isinstance(err, (tracking.TrackingUnreachable, ConnectionError, TimeoutError,
                        requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    text = str(err)
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "ConnectionError",
                                   "Failed to establish a new connection", "Read timed out",
                                   "Connection aborted", "RemoteDisconnected"))


def with_retries(fn, uri: str, retries: int = 4, backoff_s: float = 2.0):
    """Call fn(); on a connection error wait backoff_s * 2**attempt and try again, `retries`
    times; then raise RegistryUnavailable naming the (redacted) URI."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below
            if not is_connection_error(err):
                raise
            if attempt == retries:
                raise RegistryUnavailable(tracking.scrub(
                    f"MLflow at {tracking.redact(uri)} did not answer after {retries + 1} "
                    f"attempts: {err}")) from None
            wait = backoff_s * 2 ** attempt
            log.warning("MLflow at %s unreachable (%s); retrying in %.1f s", tracking.redact(uri),
                        tracking.scrub(str(err).splitlines()[0][:200]), wait)
            time.sleep(wait)


def client_for(tracking_uri: str | None = None):
    """(MlflowClient, uri) for the given URI, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    import mlflow

    uri = tracking_uri or tracking.tracking_uri()
    tracking.use_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), uri


class BadName(ValueError):
    """A registered model name or alias that MLflow or this project's look-ups cannot take."""


def check_name(name: str, what: str = "registered model") -> str:
    """`name`, unless MLflow refuses it ('/', ':') or the search filters here (`name = '...'`)
    cannot quote it: without this check `promote --to "prod'env"` found no earlier copy and
    made a new one every time."""
    if not name.strip() or set(name) & set("/:'\"`\\") or not name.isprintable():
        raise BadName(f"{what} name {name[:100]!r} is not usable: it must be printable and "
                      f"must not contain / : ' \" ` or \\")
    return name


def check_alias(alias: str) -> str:
    """`alias`, unless MLflow's alias rules refuse it (its own validators, so the rules stay
    MLflow's: letters, digits, _ and -, not `latest`, not a version like v3)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import (_validate_model_alias_name,
                                         _validate_model_alias_name_reserved)

    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except MlflowException as err:
        raise BadName(f"alias {alias[:100]!r}: {err.message}") from None
    return alias


def _missing(err) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")) or \
        "not found" in str(err).lower()


def by_alias(client, name: str, alias: str):
    """The version behind `name@alias`, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if _missing(err):
            return None
        raise


def find_version(client, name: str, run_id: str | None, weights_hash: str | None):
    """The version of `name` registered from this run (or, untracked, these weights), or None."""
    from mlflow.exceptions import MlflowException

    key, value = ("source_run_id", run_id) if run_id else ("weights_hash", weights_hash)
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.{key} = '{value}'")
    except MlflowException as err:
        if _missing(err):
            return None
        raise
    return min(found, key=lambda v: int(v.version)) if found else None


def versions(client, name: str) -> list:
    """Every live version of `name` (none when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name = '{name}'"))
    except MlflowException as err:
        if _missing(err):
            return []
        raise


def aliases_of(client, name: str, version: str | int) -> list[str]:
    model = client.get_registered_model(name)
    return sorted(a for a, v in (model.aliases or {}).items() if str(v) == str(version))


def ensure_registered_model(client, name: str, description: str = MODEL_DESCRIPTION) -> None:
    """Create the registered model unless it exists (another process may create it meanwhile)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if not _missing(err):
            raise
        try:
            client.create_registered_model(name, description=description)
        except MlflowException as race:
            if "ALREADY_EXISTS" not in str(race.error_code):
                raise
