"""One promote at a time per registered model: a lock kept in the registry itself.

MLflow has no transactions and no compare-and-delete. What it does atomically is number the
versions of a registered model, and a number is never used twice (a deleted version stays in
the database, marked deleted). So the lock of model NAME is the registered model
`NAME.promotion-lock`, taking it is creating a version of it (tags: who, where, which process,
since when, and the promote's token), and the holder is its lowest live version:

- a later taker sees every lower version (created before its own) and either waits for
  nothing (it is lowest: it holds the lock) or gives its own version back and reports busy;
- a stale holder (its process gone from this host, or older than STALE_S) is broken by
  deleting that version by number. Several promotes breaking one stale lock at once delete
  the same version (the others find it gone), and a number names one holder forever, so none
  can delete the lock a newer promote took meanwhile;
- a promote that retries after an outage finds its own version (same token) and goes on;
- `promote --break_lock --reason TEXT` deletes the holder whatever its age.

Every break is recorded on NAME's tag `promotion_lock_broken` (when, by whom, why, whose lock).
"""
from __future__ import annotations

import contextlib
import getpass
import logging
import os
import socket
import time
from datetime import datetime, timezone

from components.registry.client import ensure_registered_model, versions

log = logging.getLogger(__name__)

SUFFIX, STALE_S = ".promotion-lock", 600
BROKEN_TAG = "promotion_lock_broken"
SOURCE = "skinlesion-lock:///promotion"  # holds no model; a server refuses local paths


class Busy(RuntimeError):
    """Another promote of the same registered model holds the lock."""


def user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "unknown"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def held(client, name: str, token: str):
    """Hold the promotion lock of `name` while the block runs (Busy when another holds it).
    `token` names one promote: a retry of that promote (same token) takes its own lock back."""
    lock = name + SUFFIX
    mine = take(client, name, token)
    try:
        yield
    finally:
        _release(client, lock, mine)


def _release(client, lock: str, version: str) -> None:
    """Give the lock back. A failure here (the server went away after the promotion was done)
    must not make the caller retry a promotion that already happened and then report that it
    lost: it is a warning, and the lock left behind is broken as stale once this process has
    ended (same host) or after STALE_S."""
    try:
        _delete(client, lock, version)
    except Exception as err:  # noqa: BLE001 - the work under the lock is done either way
        log.warning("could not give back the promotion lock %s version %s (%s); it is broken "
                    "as stale once this process ends", lock, version,
                    str(err).splitlines()[0][:200] if str(err) else type(err).__name__)


def take(client, name: str, token: str) -> str:
    """Take the lock of `name`; returns the lock version that holds it."""
    lock = name + SUFFIX
    ensure_registered_model(client, lock, f"held while promoting {name}")
    mine = next((str(v.version) for v in _live(client, lock) if v.tags.get("token") == token), None)
    if mine is None:
        mine = str(client.create_model_version(lock, SOURCE, tags={
            "holder": f"{user()}@{socket.gethostname()} pid {os.getpid()}",
            "host": socket.gethostname(), "pid": str(os.getpid()), "since": str(time.time()),
            "token": token}).version)
    for other in _live(client, lock):
        if int(other.version) >= int(mine):
            return mine
        if why := stale(other):
            log.warning("breaking the promotion lock of %s: %s", name, why)
            _break(client, name, other, why)
            continue
        _delete(client, lock, mine)
        age = time.time() - float(other.tags.get("since") or 0)
        raise Busy(f"another promote of {name} is running ({other.tags.get('holder')}, for "
                   f"{age:.0f} s); nothing was changed (if it is gone: skinlesion promote "
                   f"--break_lock --reason TEXT)")
    return mine


def stale(version) -> str | None:
    """Why a lock version's holder is gone, or None while it may still be running."""
    age = time.time() - float(version.tags.get("since") or 0)
    if age >= STALE_S:
        return f"{version.tags.get('holder')} took it {age:.0f} s ago (stale after {STALE_S} s)"
    if version.tags.get("host") == socket.gethostname():
        try:
            os.kill(int(version.tags.get("pid") or 0), 0)
        except ProcessLookupError:
            return f"{version.tags.get('holder')} is no longer running"
        except (OSError, ValueError):  # another user's process (alive) or no pid: age rule
            return None
    return None


def break_lock(client, name: str, reason: str) -> list[str]:
    """`promote --break_lock`: delete every live version of `name`'s lock; returns who held."""
    holders = []
    for version in _live(client, name + SUFFIX):
        _break(client, name, version, f"--break_lock: {reason}")
        holders.append(version.tags.get("holder") or "?")
    return holders


def _break(client, name: str, version, why: str) -> None:
    if not _delete(client, name + SUFFIX, str(version.version)):
        return  # another promote broke it first, and records it
    record = (f"{now()} {user()}@{socket.gethostname()} broke the lock of "
              f"{version.tags.get('holder')} (since {version.tags.get('since')}): {why}")
    history = client.get_registered_model(name).tags.get(BROKEN_TAG)
    client.set_registered_model_tag(name, BROKEN_TAG,
                                    "\n".join(filter(None, [history, record]))[-5000:])


def _live(client, lock: str) -> list:
    return sorted(versions(client, lock), key=lambda v: int(v.version))


def _delete(client, lock: str, version: str) -> bool:
    """Delete a lock version; False when it was already gone (another breaker was first)."""
    from mlflow.exceptions import MlflowException

    try:
        client.delete_model_version(lock, version)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" not in str(err.error_code):
            raise
        return False
    return True
