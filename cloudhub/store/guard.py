"""A sync store that vanished is refused, not silently started empty (issue 18, finding 10).

A hub that finds no store file (or a zero-length one: a restore gone wrong, a disk that filled
at the wrong moment, a volume mounted empty) would start with nothing owed to anyone: every
message accepted and not yet acknowledged would be gone without a word. The signs that this
data directory held a store before:

* the CA the hub generates at its first start is there (``<dataDir>/ca/rootCA.crt``), and
  ``cloudhub init`` creates the store together with it;
* a zero-length store file: SQLite never leaves one behind once it has written its schema.

``hub.store.allowEmpty: true`` starts anyway (for one start, then set it back).
"""

from __future__ import annotations

import os

from cloudhub.config import HubConfig
from cloudhub.store.interfaces import StoreError

__all__ = ["EmptyStoreRefused", "check_store_file", "has_run_before"]


class EmptyStoreRefused(StoreError):
    """The store file is missing or empty where a hub has run before."""


def has_run_before(config: HubConfig) -> bool:
    """Whether a hub (or ``cloudhub init``) has used this data directory: its generated CA."""
    return os.path.exists(config.data_path("ca", "rootCA.crt"))


def check_store_file(path: str, ran_before: bool) -> None:
    """Raise :class:`EmptyStoreRefused` for a store that should hold data and does not."""
    if path == ":memory:":
        return
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        if not ran_before:
            return  # a first start: the store is created
        problem = "is missing"
    else:
        if size:
            return
        if os.path.exists(path + "-wal") and os.stat(path + "-wal").st_size:
            return  # the data is still in the write-ahead log: SQLite recovers it
        problem = "is empty (0 bytes)"
    raise EmptyStoreRefused(
        f"sync store {path} {problem}, but this data directory has run a hub before (its CA "
        "is there): what was owed to nodes would be lost without a word. Restore the file from "
        "a backup, or set hub.store.allowEmpty: true for one start to begin with an empty store"
    )
