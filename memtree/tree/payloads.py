"""The memory tree's job payloads and their dedupe keys.

Each class serialises to exactly the JSON shape the original crate's serde types
write (optional fields present as ``null``, tagged unions under ``"kind"``) and
builds the same dedupe key, so a Rust producer and a Python producer share one
table and suppress each other's duplicates. ``from_wire`` parses the shape back
for handlers. :class:`~memtree.types.Payload`, the base class, is the core's (re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias

from memtree.errors import InvalidJobError
from memtree.types import Payload

__all__ = [
    "AppendBufferPayload",
    "AppendTarget",
    "ExtractChunkPayload",
    "FlushStalePayload",
    "Leaf",
    "NodeRef",
    "Payload",
    "ReembedBackfillPayload",
    "SealDocumentPayload",
    "SealPayload",
    "SourceTarget",
    "Summary",
    "TopicTarget",
    "flush_stale_block",
]


def _text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidJobError(f"{name} must be a non-empty string, not {value!r}")
    return value


def _optional_int(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidJobError(f"{name} must be an integer or None, not {value!r}")
    return value


def _field(data: object, name: str) -> Any:
    if not isinstance(data, dict):
        raise InvalidJobError(f"payload must be a JSON object, not {type(data).__name__}")
    if name not in data:
        raise InvalidJobError(f"payload is missing {name!r}")
    return data[name]


# -- node and target references ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Leaf:
    """A leaf chunk of a tree."""

    chunk_id: str

    def __post_init__(self) -> None:
        _text("chunk_id", self.chunk_id)

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "leaf", "chunk_id": self.chunk_id}

    def dedupe_fragment(self) -> str:
        return f"leaf:{self.chunk_id}"


@dataclass(frozen=True, slots=True)
class Summary:
    """A sealed summary node of a tree."""

    summary_id: str

    def __post_init__(self) -> None:
        _text("summary_id", self.summary_id)

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "summary", "summary_id": self.summary_id}

    def dedupe_fragment(self) -> str:
        return f"summary:{self.summary_id}"


NodeRef: TypeAlias = Leaf | Summary


def node_from_wire(data: object) -> NodeRef:
    tag = _field(data, "kind")
    if tag == "leaf":
        return Leaf(_field(data, "chunk_id"))
    if tag == "summary":
        return Summary(_field(data, "summary_id"))
    raise InvalidJobError(f"unknown node kind {tag!r}")


@dataclass(frozen=True, slots=True)
class SourceTarget:
    """The source tree of one logical source."""

    source_id: str

    def __post_init__(self) -> None:
        _text("source_id", self.source_id)

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "source", "source_id": self.source_id}

    def dedupe_fragment(self) -> str:
        return f"source:{self.source_id}"


@dataclass(frozen=True, slots=True)
class TopicTarget:
    """A topic tree, by its physical tree id."""

    tree_id: str

    def __post_init__(self) -> None:
        _text("tree_id", self.tree_id)

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "topic", "tree_id": self.tree_id}

    def dedupe_fragment(self) -> str:
        return f"topic:{self.tree_id}"


AppendTarget: TypeAlias = SourceTarget | TopicTarget


def target_from_wire(data: object) -> AppendTarget:
    tag = _field(data, "kind")
    if tag == "source":
        return SourceTarget(_field(data, "source_id"))
    if tag == "topic":
        return TopicTarget(_field(data, "tree_id"))
    raise InvalidJobError(f"unknown append target kind {tag!r}")


# -- payloads --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExtractChunkPayload(Payload):
    """Extract entities from one chunk and decide its admission."""

    chunk_id: str

    def __post_init__(self) -> None:
        _text("chunk_id", self.chunk_id)

    def to_wire(self) -> dict[str, Any]:
        return {"chunk_id": self.chunk_id}

    def dedupe_key(self) -> str:
        return f"extract:{self.chunk_id}"

    @classmethod
    def from_wire(cls, data: object) -> ExtractChunkPayload:
        return cls(_field(data, "chunk_id"))


@dataclass(frozen=True, slots=True)
class AppendBufferPayload(Payload):
    """Push a leaf or summary into a tree's buffer."""

    node: NodeRef
    target: AppendTarget

    def __post_init__(self) -> None:
        if not isinstance(self.node, Leaf | Summary):
            raise InvalidJobError("node must be a Leaf or a Summary")
        if not isinstance(self.target, SourceTarget | TopicTarget):
            raise InvalidJobError("target must be a SourceTarget or a TopicTarget")

    def to_wire(self) -> dict[str, Any]:
        return {"node": self.node.to_wire(), "target": self.target.to_wire()}

    def dedupe_key(self) -> str:
        return f"append:{self.target.dedupe_fragment()}:{self.node.dedupe_fragment()}"

    @classmethod
    def from_wire(cls, data: object) -> AppendBufferPayload:
        return cls(node_from_wire(_field(data, "node")), target_from_wire(_field(data, "target")))


@dataclass(frozen=True, slots=True)
class SealPayload(Payload):
    """Seal one buffer level of a tree; ``force_now_ms`` forces it at that instant."""

    tree_id: str
    level: int
    force_now_ms: int | None = None

    def __post_init__(self) -> None:
        _text("tree_id", self.tree_id)
        level = _optional_int("level", self.level)
        if level is None or level < 0:
            raise InvalidJobError(f"level must be a non-negative integer, not {self.level!r}")
        _optional_int("force_now_ms", self.force_now_ms)

    def to_wire(self) -> dict[str, Any]:
        return {"tree_id": self.tree_id, "level": self.level, "force_now_ms": self.force_now_ms}

    def dedupe_key(self) -> str:
        return f"seal:{self.tree_id}:{self.level}"

    @classmethod
    def from_wire(cls, data: object) -> SealPayload:
        force = data.get("force_now_ms") if isinstance(data, dict) else None
        return cls(_field(data, "tree_id"), _field(data, "level"), force)


def flush_stale_block(now_ms: int) -> tuple[str, int]:
    """The UTC date (``YYYY-MM-DD``) and 3-hour block (0-7) that ``now_ms`` falls in.

    Both come from one reading so the key cannot disagree with itself at a boundary.
    """
    moment = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%d"), moment.hour // 3


@dataclass(frozen=True, slots=True)
class FlushStalePayload(Payload):
    """Seal buffers left open longer than ``max_age_secs`` (or the tree's default)."""

    max_age_secs: int | None = None

    def __post_init__(self) -> None:
        _optional_int("max_age_secs", self.max_age_secs)

    def to_wire(self) -> dict[str, Any]:
        return {"max_age_secs": self.max_age_secs}

    def dedupe_key(self) -> str:
        # The key names the 3-hour block the job is scheduled in, not the payload.
        raise InvalidJobError("a flush_stale key needs a time: use dedupe_key_at(now_ms)")

    def dedupe_key_at(self, now_ms: int) -> str:
        date_iso, block = flush_stale_block(now_ms)
        return f"flush_stale:{date_iso}-h{block}"

    @classmethod
    def from_wire(cls, data: object) -> FlushStalePayload:
        return cls(data.get("max_age_secs") if isinstance(data, dict) else None)


@dataclass(frozen=True, slots=True)
class ReembedBackfillPayload(Payload):
    """Re-embed rows that lack a vector for the named embedding signature."""

    signature: str

    def __post_init__(self) -> None:
        _text("signature", self.signature)

    def to_wire(self) -> dict[str, Any]:
        return {"signature": self.signature}

    def dedupe_key(self) -> str:
        return f"reembed_backfill:{self.signature}"

    @classmethod
    def from_wire(cls, data: object) -> ReembedBackfillPayload:
        return cls(_field(data, "signature"))


@dataclass(frozen=True, slots=True)
class SealDocumentPayload(Payload):
    """Build one document version's subtree and merge it into its connection tree."""

    tree_scope: str
    doc_id: str
    version_ms: int | None
    chunk_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        _text("tree_scope", self.tree_scope)
        _text("doc_id", self.doc_id)
        _optional_int("version_ms", self.version_ms)
        object.__setattr__(self, "chunk_ids", tuple(self.chunk_ids))
        for chunk_id in self.chunk_ids:
            _text("chunk_id", chunk_id)

    def to_wire(self) -> dict[str, Any]:
        return {
            "tree_scope": self.tree_scope,
            "doc_id": self.doc_id,
            "version_ms": self.version_ms,
            "chunk_ids": list(self.chunk_ids),
        }

    def dedupe_key(self) -> str:
        if self.version_ms is None:
            return f"seal_doc:{self.doc_id}"
        return f"seal_doc:{self.doc_id}@{self.version_ms}"

    @classmethod
    def from_wire(cls, data: object) -> SealDocumentPayload:
        version = data.get("version_ms") if isinstance(data, dict) else None
        return cls(
            _field(data, "tree_scope"),
            _field(data, "doc_id"),
            version,
            tuple(_field(data, "chunk_ids")),
        )
