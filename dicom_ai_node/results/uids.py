"""Deterministic UIDs for result objects, so a retried job re-sends the same instances.

A PACS treats an instance with a known SOP Instance UID as a resend of the same
object; a fresh random UID on every retry would file a duplicate result instead.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable

# Namespace of this project's name-based UUIDs (RFC 9562 version 5), drawn once at random;
# fixed forever, since changing it changes every derived UID.
_NAMESPACE = uuid.UUID("4a351aa3-99c3-46c5-88dd-35ab408be37a")


def derive_uid(
    kind: str,
    model_name: str,
    model_identity: str,
    source_sop_instance_uids: Iterable[str],
    extra: str = "",
) -> str:
    """A "2.25.<decimal UUID>" UID (PS3.5 B.2) that depends only on its inputs.

    `model_identity` tells apart models that write different objects under one name and version (other
    weights, other settings: `inference.model.result_identity`).

    The source UIDs are treated as a set (order and repeats do not matter), so the
    same series received in another order maps to the same result.  `kind` keeps
    the UIDs of different objects of one job apart (e.g. "seg-series", "sr-instance").

    Not `pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`: with
    prefix=None it ignores `entropy_srcs` and returns a random UID.
    """
    sources = sorted(set(source_sop_instance_uids))
    if not sources:
        raise ValueError("at least one source SOP Instance UID is required")
    return name_uid(kind, model_name, model_identity, extra, *sources)


def name_uid(*parts: str) -> str:
    """A "2.25." UID named by `parts` (in order), for identifiers that must be stable
    across runs, e.g. a segment's Tracking UID shared by the SEG and the SR."""
    # JSON keeps the parts apart: ("ab", "c") and ("a", "bc") must not collide.
    name = json.dumps(list(parts), separators=(",", ":"))
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
