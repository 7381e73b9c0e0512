"""Node ids: what a node may be called (issue 18, finding 9).

A node id names a Kubernetes node, so it must be a valid Kubernetes node name: an RFC 1123
subdomain (``metadata.name`` of a Node): lowercase ASCII letters, digits, ``-`` and ``.``,
starting and ending with a letter or digit, at most :data:`MAX_NODE_ID_LENGTH` (253)
characters, and no dot-separated label longer than :data:`MAX_LABEL_LENGTH` (63), as DNS
requires of a host name (Kubernetes' own subdomain check does not bound the labels).

:func:`validate_node_id` answers with the problem (text fit for an HTTP reason, a close
reason or a log line: it never repeats the id itself, which may be 100 KB of anything) or
``None`` for a valid id; :func:`check_node_id` raises :class:`ValueError` with the same text.
Both are pure functions of a ``str``; decoding bytes (UTF-8, strictly) is the caller's job.
"""

from __future__ import annotations

import re

__all__ = ["MAX_LABEL_LENGTH", "MAX_NODE_ID_LENGTH", "check_node_id", "validate_node_id"]

MAX_NODE_ID_LENGTH = 253
MAX_LABEL_LENGTH = 63

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?", re.ASCII)
_ALLOWED = re.compile(r"[a-z0-9.-]*", re.ASCII)


def validate_node_id(value: str) -> str | None:
    """``None`` if ``value`` is a valid node id, else what is wrong with it (one line)."""
    if not value:
        return "node id is empty"
    if len(value) > MAX_NODE_ID_LENGTH:
        return f"node id is longer than {MAX_NODE_ID_LENGTH} characters"
    if _ALLOWED.fullmatch(value) is None:
        return "node id must consist of lower case alphanumeric characters, '-' or '.'"
    for label in value.split("."):
        if not label:
            return "node id must not start or end with '.' nor contain '..'"
        if len(label) > MAX_LABEL_LENGTH:
            return f"node id has a label longer than {MAX_LABEL_LENGTH} characters"
        if _LABEL.fullmatch(label) is None:
            return "node id labels must start and end with an alphanumeric character"
    return None


def check_node_id(value: str) -> str:
    """``value`` if it is a valid node id; else :class:`ValueError` with the problem."""
    problem = validate_node_id(value)
    if problem is not None:
        raise ValueError(problem)
    return value
