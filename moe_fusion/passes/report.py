"""What the pass did, per MoE layer: matched / partial / not matched, the MoESpec, the nodes it
removed and added, or which step failed on which node. Kept in Python (``MatchReport``), logged
to the ``moe_fusion`` logger and emitted as a structured-trace artifact (tlparse shows it)."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

log = logging.getLogger("moe_fusion")

MATCHED, PARTIAL, NOT_MATCHED = "matched", "partial", "not matched"
TRACE_ARTIFACT = "moe_fusion_match_report"


@dataclass
class LayerRecord:
    status: str
    anchor: str  # the routing top-k node the match started from
    spec: Optional[Dict] = None
    implementation: str = ""  # how the experts were computed in the model (the first expert GEMM op)
    weights: Dict[str, str] = field(default_factory=dict)  # op argument -> which graph input (and view) feeds it
    removed: List[str] = field(default_factory=list)
    added: List[str] = field(default_factory=list)
    kept: List[str] = field(default_factory=list)  # covered nodes left in place: used outside the layer
    failures: List[Dict[str, Optional[str]]] = field(default_factory=list)  # {step, node, reason}
    baked: Dict[str, float] = field(default_factory=dict)  # float graph inputs: compile-time values (the op reads each call's)
    notes: List[str] = field(default_factory=list)
    extra_memory_bytes: int = 0  # weights re-laid out for the kernels (none: the op reads the parameters)
    graph: int = 0
    before: Optional[str] = None  # FX code of the replaced nodes (inspection mode)
    after: Optional[str] = None

    @property
    def reason(self) -> str:
        return "; ".join(
            f"{f['step']}: {f['reason']}" + (f" (node {f['node']})" if f.get("node") else "") for f in self.failures)

    def to_dict(self) -> Dict:
        return asdict(self)


@dataclass
class GraphRecord:
    index: int
    layers: List[LayerRecord] = field(default_factory=list)
    note: str = ""  # why a graph has no layer record at all (e.g. no top-k)
    nodes_before: int = 0
    nodes_after: int = 0
    changed: bool = False  # whether the node list differs after the pass

    def to_dict(self) -> Dict:
        return asdict(self)


class MatchReport:
    """All graphs the pass has seen (one per Inductor compile), in order."""

    def __init__(self):
        self.graphs: List[GraphRecord] = []

    def clear(self) -> None:
        self.graphs.clear()

    def new_graph(self) -> GraphRecord:
        record = GraphRecord(index=len(self.graphs))
        self.graphs.append(record)
        return record

    @property
    def layers(self) -> List[LayerRecord]:
        return [layer for g in self.graphs for layer in g.layers]

    def count(self, status: str) -> int:
        return sum(1 for layer in self.layers if layer.status == status)

    @property
    def matched(self) -> int:
        return self.count(MATCHED)

    def specs(self) -> List[Dict]:
        return [layer.spec for layer in self.layers if layer.spec is not None]

    def to_dict(self) -> Dict:
        return {
            "matched": self.matched, "partial": self.count(PARTIAL), "not_matched": self.count(NOT_MATCHED),
            "graphs": [g.to_dict() for g in self.graphs],
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def format_text(self, graphs: bool = False) -> str:
        lines = [f"moe_fusion: {self.matched} layer(s) matched, {self.count(PARTIAL)} partial, "
                 f"{self.count(NOT_MATCHED)} not matched, in {len(self.graphs)} graph(s)"]
        for g in self.graphs:
            lines.append(f"graph {g.index}: {g.nodes_before} nodes -> {g.nodes_after} nodes" + (f"; {g.note}" if g.note else ""))
            for i, layer in enumerate(g.layers):
                lines.extend(format_layer(i, layer, graphs))
        return "\n".join(lines)


def format_layer(i: int, layer: LayerRecord, graphs: bool = False) -> List[str]:
    lines = [f"  layer {i} [{layer.status}] at {layer.anchor}" + (f" ({layer.implementation})" if layer.implementation else "")]
    if layer.spec:
        spec = ", ".join(f"{k}={v}" for k, v in sorted(layer.spec.items()))
        lines.append(f"    spec: {spec}")
    if layer.weights:
        lines.append("    weights: " + ", ".join(f"{k}={v}" for k, v in layer.weights.items()))
    if layer.baked:
        lines.append("    float graph inputs (read per call; at compile time): " + ", ".join(f"{k}={v}" for k, v in layer.baked.items()))
    if layer.removed:
        lines.append(f"    replaced {len(layer.removed)} nodes with {len(layer.added)}: "
                     + ", ".join(layer.added))
    if layer.kept:
        lines.append("    kept (used outside the layer): " + ", ".join(layer.kept))
    if layer.failures:
        lines.append(f"    reason: {layer.reason}")
    for note in layer.notes:
        lines.append(f"    note: {note}")
    if graphs and layer.before is not None:
        lines.append("    before:")
        lines.extend("      " + s for s in layer.before.splitlines())
        lines.append("    after:")
        lines.extend("      " + s for s in (layer.after or "").splitlines())
    return lines


def publish(record: GraphRecord) -> None:
    """Log a graph's layer records and emit them as a structured-trace artifact."""
    if not record.layers:
        log.info("moe_fusion graph %d: no MoE layer (%s)", record.index, record.note)
    for i, layer in enumerate(record.layers):
        log.info("moe_fusion graph %d layer %d: %s%s", record.index, i, layer.status,
                 f" ({layer.reason})" if layer.failures else "")
        log.debug("%s", "\n".join(format_layer(i, layer)))
    try:
        from torch._logging import trace_structured

        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": TRACE_ARTIFACT, "encoding": "json"},
            payload_fn=lambda: json.dumps(record.to_dict(), default=str),
        )
    except ImportError:  # structured tracing is optional for the report
        pass
