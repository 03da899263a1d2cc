"""The Inductor post-grad pass that rewrites MoE layers into moe_fusion ops.

Each routing top-k is a candidate layer. The router, the routed experts, the shared expert and
the RMSNorm in front are matched on dataflow (router.py, experts.py, dense.py); the nodes that
compute the layer output from its input are then replaced by one ``moe_fusion::moe_layer`` call
(or, when only the routing is understood, by ``moe_fusion::moe_preamble``). Anything the match
does not fully explain is left untouched, with the reason in the report."""
from __future__ import annotations

import hashlib
import pathlib
from typing import List, Optional, Set

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph, Node

from ..spec import MoESpec, SpecError
from .dense import NormMatch, SharedMatch, match_rms_norm, match_shared
from .experts import ExpertsMatch, WeightRef, match_experts
from .graph_utils import (
    BakedScalars, CAST_OPS, VIEW_OPS, MatchFailure, aten, dtype, forward_through, is_op, is_param, is_sym_arith, op_name, prims,
    region_between, shape, topo_sorted, users_breadth_first, val,
)
from .report import MATCHED, NOT_MATCHED, PARTIAL, GraphRecord, LayerRecord, MatchReport, publish
from .router import RouterMatch, match_router

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _source_hash() -> str:
    """Hash of the pass's own sources, so Inductor's FX graph cache misses when the pass changes."""
    digest = hashlib.sha256()
    for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


_SOURCE_HASH = _source_hash()


class MoEFusionPass(CustomGraphPass):
    """Post-grad pass: rewrites every MoE layer it recognizes; records each attempt in ``report``."""

    def __init__(self, report: Optional[MatchReport] = None, keep_graphs: bool = False, fp8_experts: bool = False):
        self.report = report if report is not None else MatchReport()
        self.keep_graphs = keep_graphs
        # Layers with bf16/fp16 experts run them in fp8 (quant fp8_block_quantize: 128x128 blocks
        # made once from the model's weights): the backend's fp8_experts option.
        self.fp8_experts = fp8_experts

    def __call__(self, graph: Graph) -> None:
        record = self.report.new_graph()
        before = _signature(graph)
        record.nodes_before = len(before)
        rewrite_moe_layers(graph, record, self.keep_graphs, self.fp8_experts)
        after = _signature(graph)
        record.nodes_after, record.changed = len(after), after != before
        publish(record)

    def uuid(self) -> str:
        return _SOURCE_HASH + ("-fp8-experts" if self.fp8_experts else "")


def _signature(graph: Graph) -> List[str]:
    return [n.format_node() or n.name for n in graph.nodes]


# --------------------------------------------------------------------------- candidates
def _reaches(start: Node, predicate, max_depth: int = 12, through=lambda n: True) -> bool:
    return any(predicate(n) for n in users_breadth_first(start, max_depth, through))


def _selects_experts(topk: Node) -> bool:
    """Whether a top-k's outputs reach a [E, ., .] parameter (an expert weight) within a few ops."""
    def reads_expert_weight(node: Node) -> bool:
        return any(is_param(_weight_source(i), 3) for i in node.all_input_nodes)

    return _reaches(topk, reads_expert_weight)


def _weight_source(node: Node) -> Node:
    while is_op(node, *VIEW_OPS, *CAST_OPS, aten.permute, aten.transpose, aten.slice):
        node = node.args[0]
    return node


def routing_candidates(graph: Graph) -> List[Node]:
    """Top-k nodes that do not feed another top-k without a GEMM in between (a group selection
    is part of its router; the next layer's router is behind GEMMs)."""
    topks = [n for n in graph.nodes if is_op(n, aten.topk)]

    def no_gemm(n: Node) -> bool:
        return not (is_op(n, aten.mm, aten.addmm, aten.bmm, aten._grouped_mm) or "grouped_mm" in op_name(n))

    return [t for t in topks
            if not _reaches(t, lambda n: is_op(n, aten.topk) and n is not t, max_depth=30, through=no_gemm)]


# --------------------------------------------------------------------------- the pass
def rewrite_moe_layers(graph: Graph, record: GraphRecord, keep_graphs: bool = False, fp8_experts: bool = False) -> None:
    candidates = routing_candidates(graph)
    if not candidates:
        record.note = "no top-k in the graph: nothing routes tokens to experts"
        return
    for topk in candidates:
        if topk.graph is not graph or topk not in graph.nodes:
            continue  # removed with an earlier layer
        layer = LayerRecord(status=NOT_MATCHED, anchor=topk.name, graph=record.index)
        record.layers.append(layer)
        try:
            _match_and_rewrite(graph, topk, layer, keep_graphs, fp8_experts)
        except MatchFailure as failure:
            layer.failures.append({"step": failure.step, "node": failure.node, "reason": failure.reason})
    if all(layer.status == NOT_MATCHED for layer in record.layers):
        record.note = "no MoE layer recognized; graph unchanged"


def _match_and_rewrite(graph: Graph, topk: Node, layer: LayerRecord, keep_graphs: bool, fp8_experts: bool) -> None:
    try:
        router = match_router(topk)
    except MatchFailure as failure:
        if not _selects_experts(topk):
            raise MatchFailure("routing", topk, "this top-k is not MoE routing: its results never select expert "
                                                  f"weights ({failure})") from None
        raise
    layer.baked.update(router.baked)
    if not _selects_experts(topk):
        raise MatchFailure("routing", topk, "this top-k is not MoE routing: its results never select expert weights "
                                            "(no [num_experts, ., .] parameter is read with them)")
    try:
        experts = match_experts(router)
    except MatchFailure as failure:
        layer.failures.append({"step": failure.step, "node": failure.node, "reason": failure.reason})
        experts = None
    if router.blockers:
        layer.failures[:0] = [{"step": b.step, "node": b.node, "reason": b.reason} for b in router.blockers]
        return
    if experts is None:
        _rewrite_preamble(graph, router, layer, keep_graphs)
        return
    _rewrite_layer(graph, router, experts, layer, keep_graphs, fp8_experts)


def _dtype_name(node: Node, step: str) -> str:
    dt = dtype(node)
    if dt not in DTYPE_NAMES:
        raise MatchFailure(step, node, f"hidden states are {dt}; MoESpec supports {sorted(DTYPE_NAMES.values())}")
    return DTYPE_NAMES[dt]


def _spec(step: str, node: Node, **fields) -> MoESpec:
    try:
        return MoESpec(**fields)
    except SpecError as err:
        raise MatchFailure(step, node, f"the matched layer is not a valid MoESpec: {err}") from None


def _layer_output(experts: ExpertsMatch, shared: Optional[SharedMatch]) -> Node:
    out = shared.out if shared is not None else experts.out
    # Follow the cast back to the model dtype (HF sums in fp32, then casts) and pure reshapes.
    while len(out.users) == 1 and is_op(next(iter(out.users)), *CAST_OPS):
        out = next(iter(out.users))
    return out


def _foldable_norm(router: RouterMatch, covered: Set[Node]) -> Optional[NormMatch]:
    """The RMSNorm in front of the layer, when its output feeds nothing but this layer."""
    norm = match_rms_norm(router.x)
    if norm is None:
        return None
    for user in forward_through(router.x):
        if user not in covered:
            return None
    for n in norm.region:
        if any(u not in covered and u not in norm.region for u in n.users) and n is not router.x:
            return None
    return norm


def _glue(node: Node, shared: Optional[SharedMatch]) -> bool:
    """Nodes allowed between the matched parts: reshapes, casts and the routed + shared add."""
    return is_op(node, *VIEW_OPS, *CAST_OPS) or (shared is not None and node is shared.out)



def _rewrite_layer(graph: Graph, router: RouterMatch, experts: ExpertsMatch, layer: LayerRecord,
                   keep_graphs: bool, fp8_experts: bool) -> None:
    shared = match_shared(experts.out, router.x)
    out = _layer_output(experts, shared)
    parts = router.region | experts.region | (shared.region if shared else set())
    covered = region_between([out], {router.x})
    unexplained = [n for n in covered - parts if not _glue(n, shared)]
    if unexplained:
        raise MatchFailure("layer", unexplained[0], "the layer output also depends on ops outside the matched "
                                                    f"router/experts/shared expert: {[n.name for n in unexplained[:5]]}")
    norm = _foldable_norm(router, covered)
    layer_input = router.x
    if norm is not None:
        layer_input = norm.input
        covered = region_between([out], {norm.input})
        layer.baked.update(norm.baked)

    fields = dict(router.fields)
    fields.update(intermediate_size=experts.intermediate_size, weight_on=experts.weight_on,
                  dtype=_dtype_name(router.x, "layer"))
    if shared is not None:
        fields.update(shared_intermediate_size=shared.intermediate_size, shared_gate=shared.expert_gate is not None)
    if norm is not None:
        fields.update(rms_norm=True, rms_norm_eps=norm.eps)
    if fp8_experts:
        fields.update(quant="fp8_block_quantize")
    spec = _spec("layer", router.topk, **fields)

    before = _format(covered) if keep_graphs else None
    with _Inserter(graph, out) as ins:
        x2d = ins.call(aten.view.default, layer_input, [-1, spec.hidden_size])
        args = [
            x2d, spec.to_json(), *_scalar_args(router.baked, norm.baked if norm else None), router.router_weight,
            ins.weight(experts.w_gate), ins.weight(experts.w_up), ins.weight(experts.w_down),
            norm.weight if norm else None, router.correction_bias, None, None, None,
            shared.gate if shared else None, shared.up if shared else None, shared.down if shared else None,
            shared.expert_gate if shared else None, None,
        ]
        result = ins.call(torch.ops.moe_fusion.moe_layer.default, *args)
        if dtype(out) != dtype(x2d):
            result = ins.call(prims.convert_element_type.default, result, dtype(out))
        result = ins.call(aten.view.default, result, _shape_args(ins, out, [layer_input, router.x]))
    out.replace_all_uses_with(result)
    removed, kept = _erase_dead(graph, covered)

    layer.status = MATCHED
    layer.spec = _spec_dict(spec)
    layer.implementation = experts.implementation
    layer.weights = {
        "router_weight": router.router_weight.name, "w_gate": experts.w_gate.describe(),
        "w_up": experts.w_up.describe(), "w_down": experts.w_down.describe(),
    }
    if router.correction_bias is not None:
        layer.weights["correction_bias"] = router.correction_bias.name
    if norm is not None:
        layer.weights["norm_weight"] = norm.weight.name
    if shared is not None:
        layer.weights.update(shared_gate=shared.gate.name, shared_up=shared.up.name, shared_down=shared.down.name)
        if shared.expert_gate is not None:
            layer.weights["shared_expert_gate"] = shared.expert_gate.name
    layer.removed, layer.kept = removed, kept
    layer.added = [f"{n.name}: {op_name(n)}" for n in ins.added]
    if keep_graphs:
        layer.before, layer.after = before, _format(ins.added)


def _scalar_args(*baked: Optional[BakedScalars]) -> list:
    """The ops' (scalar_inputs, scalar_fields) for floats that are graph inputs."""
    inputs = {}
    for b in baked:
        if b is not None:
            inputs.update(b.inputs)
    return [list(inputs.values()), ",".join(inputs)]


def _rewrite_preamble(graph: Graph, router: RouterMatch, layer: LayerRecord, keep_graphs: bool) -> None:
    """Experts not understood: fuse the routing alone, hand the experts ids and weights as before."""
    fields = dict(router.fields)
    # The preamble op never reads the expert shape; 1 marks it unknown.
    fields.update(intermediate_size=1, dtype=_dtype_name(router.x, "router"))
    spec = _spec("router", router.topk, **fields)
    covered = set(router.region)
    before = _format(covered) if keep_graphs else None
    anchor = min((u for n in (router.ids, router.weights) for u in n.users), key=_position)
    with _Inserter(graph, anchor) as ins:
        x2d = ins.call(aten.view.default, router.x, [-1, spec.hidden_size])
        pre = ins.call(torch.ops.moe_fusion.moe_preamble.default, x2d, spec.to_json(), *_scalar_args(router.baked),
                       router.router_weight, None, router.correction_bias)
        ids32 = ins.getitem(pre, 3)
        weights = ins.getitem(pre, 4)
        ids = ins.call(prims.convert_element_type.default, ids32, dtype(router.ids))
        if router.dense:
            tokens = ins.call(aten.sym_size.int, x2d, 0) if not isinstance(shape(x2d)[0], int) else shape(x2d)[0]
            zeros = ins.call(aten.full.default, [tokens, spec.num_experts], 0.0, dtype=torch.float32,
                             device=val(x2d).device, pin_memory=False)
            weights = ins.call(aten.scatter.src, zeros, 1, ids, weights)
        weights = ins.call(prims.convert_element_type.default, weights, dtype(router.weights))
    router.ids.replace_all_uses_with(ids)
    router.weights.replace_all_uses_with(weights)
    removed, kept = _erase_dead(graph, covered | {router.ids, router.weights})
    layer.status = PARTIAL
    layer.spec = _spec_dict(spec)
    layer.weights = {"router_weight": router.router_weight.name}
    if router.correction_bias is not None:
        layer.weights["correction_bias"] = router.correction_bias.name
    layer.notes.append("routing fused into moe_preamble; the experts run as in the model")
    layer.removed, layer.kept = removed, kept
    layer.added = [f"{n.name}: {op_name(n)}" for n in ins.added]
    if keep_graphs:
        layer.before, layer.after = before, _format(ins.added)


# --------------------------------------------------------------------------- graph surgery
def _position(node: Node) -> int:
    return list(node.graph.nodes).index(node)


class _Inserter:
    """Inserts nodes before ``anchor`` and gives each one its FakeTensor value."""

    def __init__(self, graph: Graph, anchor: Node):
        self.graph, self.anchor = graph, anchor
        self.added: List[Node] = []
        self.fake_mode = torch._guards.detect_fake_mode(
            [v for v in (n.meta.get("val") for n in graph.nodes) if isinstance(v, torch.Tensor)])

    def __enter__(self):
        self._ctx = self.graph.inserting_before(self.anchor)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def call(self, target, *args, **kwargs) -> Node:
        node = self.graph.call_function(target, tuple(args), kwargs)
        fake = lambda a: a.meta["val"] if isinstance(a, Node) else a  # noqa: E731
        fargs = torch.fx.node.map_aggregate(args, fake)
        fkwargs = torch.fx.node.map_aggregate(kwargs, fake)
        with self.fake_mode:
            node.meta["val"] = target(*fargs, **fkwargs)
        self.added.append(node)
        return node

    def getitem(self, node: Node, index: int) -> Node:
        import operator

        item = self.graph.call_function(operator.getitem, (node, index))
        item.meta["val"] = node.meta["val"][index]
        self.added.append(item)
        return item

    def weight(self, ref: WeightRef) -> Node:
        """The canonical [E, N, K] view of an expert weight parameter (no copy)."""
        node = ref.param
        if ref.transposed:
            node = self.call(aten.permute.default, node, [0, 2, 1])
        if ref.rows is not None:
            node = self.call(aten.slice.Tensor, node, 1, ref.rows[0], ref.rows[1])
        return node


def _shape_args(ins: _Inserter, like: Node, sources: List[Node]) -> list:
    """A view size for ``like``'s shape: ints, -1 for one symbolic dim, sym_size nodes otherwise."""
    dims = list(shape(like))
    symbolic = [i for i, d in enumerate(dims) if not isinstance(d, int)]
    if len(symbolic) <= 1:
        return [-1 if i in symbolic else int(d) for i, d in enumerate(dims)]
    for src in sources:
        if [str(d) for d in shape(src)] == [str(d) for d in dims]:
            return [ins.call(aten.sym_size.int, src, i) if i in symbolic else int(d) for i, d in enumerate(dims)]
    raise MatchFailure("rewrite", like, "cannot rebuild the layer output shape")


def _erase_dead(graph: Graph, covered: Set[Node]):
    removed, kept = [], []
    for node in reversed(topo_sorted(covered)):
        if node.users:
            if not is_sym_arith(node):
                kept.append(node.name)
        else:
            removed.append(f"{node.name}: {op_name(node)}")
            graph.erase_node(node)
    return list(reversed(removed)), kept


def _format(nodes) -> str:
    return "\n".join(n.format_node() or "" for n in topo_sorted(nodes))


def _spec_dict(spec: MoESpec) -> dict:
    import dataclasses

    return dataclasses.asdict(spec)
