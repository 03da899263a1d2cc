"""The routed-expert half of a MoE layer, matched forwards from the routing result.

Implementations differ in how tokens reach the experts (sort + grouped GEMM, repeat + weights
gathered per pair + bmm, every expert on every token), so the match looks for what they share:
a first expert GEMM on the hidden states against a [E, ., .] parameter, a gated SiLU, a second
expert GEMM, the routing weight, and a reduction back to [tokens, hidden]. The region between
those ends must contain nothing but index plumbing and those ops."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import List, Optional, Set, Tuple

from torch.fx import Node

from .graph_utils import (
    CAST_OPS, VIEW_OPS, MatchFailure, aten, check_region, forward_through, is_getitem, is_idle_clamp, is_never_true,
    is_op, is_param, masked_value, op_name, prims, region_between, require, same_shape, same_size, shape,
    strip_layout, users_breadth_first,
)
from .router import RouterMatch

STEP = "experts"
GROUPED_GEMMS = ("aten._grouped_mm", "transformers.grouped_mm_fallback", "aten.grouped_mm")


@dataclass
class WeightRef:
    """An expert weight as the canonical [E, N, K] tensor: a model parameter, maybe transposed
    ([E, K, N] storage), maybe a row range of a fused gate_up parameter."""

    param: Node
    transposed: bool
    rows: Optional[Tuple[int, int]] = None  # [start, end) along N of the canonical view

    def describe(self) -> str:
        s = self.param.name + (".transpose(1, 2)" if self.transposed else "")
        return s + (f"[:, {self.rows[0]}:{self.rows[1]}]" if self.rows else "")


@dataclass
class ExpertsMatch:
    out: Node  # [tokens, hidden] result of the routed experts
    w_gate: WeightRef
    w_up: WeightRef
    w_down: WeightRef
    intermediate_size: int
    weight_on: str
    region: Set[Node] = field(default_factory=set)
    implementation: str = ""


def _is_gemm(node) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and (
        op_name(node) in GROUPED_GEMMS or is_op(node, aten.bmm, aten.mm))


# --------------------------------------------------------------------------- weight operands
def _trace_weight(operand: Node, roles: Tuple[int, int], num_experts: int) -> Optional[Tuple[Node, bool]]:
    """Follow a GEMM's weight operand back to a [E, a, b] parameter.

    ``roles`` are the operand dims holding (N, K): output features and contraction. Views that
    only change leading dims, permutes, and a gather of experts by id (index on dim 0) keep track
    of them. Returns (parameter, transposed) or None when the operand is not an expert weight."""
    node, (n_dim, k_dim) = operand, roles
    while True:
        nd = len(shape(node))
        if is_param(node, 3):
            if shape(node)[0] != num_experts or {n_dim, k_dim} != {1, 2}:
                return None
            return node, k_dim == 1
        if not isinstance(node, Node) or node.op != "call_function":
            return None
        if is_op(node, aten.permute):
            perm = list(node.args[1])
            n_dim, k_dim = perm[n_dim], perm[k_dim]
            node = node.args[0]
        elif is_op(node, aten.transpose):
            a, b = (d % nd for d in node.args[1:3])
            swap = {a: b, b: a}
            n_dim, k_dim = swap.get(n_dim, n_dim), swap.get(k_dim, k_dim)
            node = node.args[0]
        elif is_op(node, aten.index) and len(node.args[1]) == 1 and node.args[1][0] is not None:
            src = node.args[0]
            lead = len(shape(node.args[1][0]))
            n_dim, k_dim = n_dim - lead + 1, k_dim - lead + 1
            if min(n_dim, k_dim) < 1:
                return None
            node = src
        elif is_op(node, *VIEW_OPS, *CAST_OPS):
            src = node.args[0]
            mapped = _view_source_dims(shape(src), shape(node), n_dim, k_dim)
            if mapped is None:
                return None
            n_dim, k_dim = mapped
            node = src
        else:
            return None


def _view_source_dims(src_shape: tuple, out_shape: tuple, n_dim: int, k_dim: int):
    """Where the N and K dims of a view's output come from in its input. Dims are paired from
    the right; an output dim that merges several input dims maps to the innermost one, which
    is allowed for N (gpt-fast's einsum folds the top-k slot into N) but not for K."""
    groups = {}
    i, j = len(src_shape) - 1, len(out_shape) - 1
    while j >= min(n_dim, k_dim) and i >= 0:
        if same_size(src_shape[i], out_shape[j]):
            groups[j], i, j = (i, 1), i - 1, j - 1
            continue
        if not all(isinstance(d, int) for d in (src_shape[i], out_shape[j])):
            return None
        product, inner, count = src_shape[i], i, 1
        while product < out_shape[j] and i > 0 and isinstance(src_shape[i - 1], int):
            i -= 1
            product, count = product * src_shape[i], count + 1
        if product != out_shape[j]:
            return None
        groups[j], i, j = (inner, count), i - 1, j - 1
    if n_dim not in groups or k_dim not in groups or groups[k_dim][1] != 1:
        return None
    return groups[n_dim][0], groups[k_dim][0]


def _gemm_weight(gemm: Node, num_experts: int):
    """(data operand, WeightRef-ish (param, transposed)) of an expert GEMM, or None."""
    name = op_name(gemm)
    a, b = gemm.args[0], gemm.args[1]
    if name in GROUPED_GEMMS:
        found = _trace_weight(b, (2, 1), num_experts)
        return (a, found) if found else None
    if is_op(gemm, aten.bmm):
        found = _trace_weight(b, (2, 1), num_experts)
        if found:
            return a, found
        found = _trace_weight(a, (1, 2), num_experts)
        return (b, found) if found else None
    return None


def _expert_gemms_from(start: Node, num_experts: int, max_depth: int = 12) -> List[Tuple[Node, Node, Tuple[Node, bool]]]:
    """Expert GEMMs whose data operand is reached forward from ``start`` (the walk stops at them)."""
    def expert_gemm(n: Node):
        return _gemm_weight(n, num_experts) if _is_gemm(n) else None

    found = []
    for n in users_breadth_first(start, max_depth, lambda n: expert_gemm(n) is None):
        weight = expert_gemm(n)
        if weight is not None:
            found.append((n, weight[0], weight[1]))
    return found

# --------------------------------------------------------------------------- the gated activation
def is_silu_of(node: Node, x: Node) -> bool:
    """node computes silu(x): silu, x * sigmoid(x), or x / (1 + exp(-x)), with casts and views anywhere."""
    node, x = strip_layout(node), strip_layout(x)
    if is_op(node, aten.silu):
        return strip_layout(node.args[0]) is x
    if is_op(node, aten.mul):
        a, b = (strip_layout(arg) for arg in node.args)
        return (a is x and is_op(b, aten.sigmoid) and strip_layout(b.args[0]) is x) or (
            b is x and is_op(a, aten.sigmoid) and strip_layout(a.args[0]) is x)
    if is_op(node, aten.div):
        num, den = strip_layout(node.args[0]), strip_layout(node.args[1])
        if num is not x or not is_op(den, aten.add):
            return False
        e, one = strip_layout(den.args[0]), den.args[1]
        if one != 1 or not is_op(e, aten.exp):
            return False
        neg = strip_layout(e.args[0])
        return is_op(neg, aten.neg) and strip_layout(neg.args[0]) is x
    return False


def _halves(gemm_out: Node):
    """The two halves of a fused gate_up GEMM output along the last dim: {node: (start, end)}."""
    halves = {}
    for user in forward_through(gemm_out):
        width = shape(user.args[0])[-1] if user.args and isinstance(user.args[0], Node) else None
        last = len(shape(user.args[0])) - 1 if width is not None else None
        if is_op(user, aten.split) and user.args[2] in (-1, last) and user.args[1] * 2 == width:
            size = user.args[1]
            for g in user.users:
                if is_getitem(g):
                    halves[g] = (g.args[1] * size, (g.args[1] + 1) * size)
        elif is_op(user, aten.slice) and user.args[1] in (-1, last):
            step = user.args[4] if len(user.args) > 4 else 1
            start, end = user.args[2], min(user.args[3], width)
            if step == 1 and end - start == width // 2 and start in (0, width // 2):
                halves[user] = (start, end)
    return halves


def _consumers(node: Node) -> str:
    return ", ".join(sorted({op_name(u) for u in forward_through(node)})) or "nothing"


def _gate_product(g1_list, num_experts: int):
    """Find silu(gate) * up among the first-GEMM outputs. Returns (product, gate, up) as
    (node, (gemm, weight, rows)) pairs, fused (one GEMM, halves) or separate (two GEMMs)."""
    if len(g1_list) == 1:
        gemm, weight = g1_list[0][0], g1_list[0][2]
        halves = _halves(gemm)
        require(len(halves) == 2, STEP, gemm, "the first expert GEMM output is not split into gate and up halves "
                f"(it feeds {_consumers(gemm)}): not a bias-free gated-SiLU expert")
        (h0, r0), (h1, r1) = halves.items()
        for (ga, ra), (ua, ru) in (((h0, r0), (h1, r1)), ((h1, r1), (h0, r0))):
            for prod in _products_of(ga, ua):
                return prod, (weight, ra), (weight, ru)
        raise MatchFailure(STEP, gemm, "expert activation is not a gated SiLU (silu(gate) * up)")
    require(len(g1_list) == 2, STEP, g1_list[0][0] if g1_list else None,
            f"found {len(g1_list)} first expert GEMMs on the hidden states; expected 1 (fused gate_up) or 2 (w1, w3)")
    (ga, _, wa), (gb, _, wb) = g1_list
    for (gate, wg), (up, wu) in (((ga, wa), (gb, wb)), ((gb, wb), (ga, wa))):
        for prod in _products_of(gate, up):
            return prod, (wg, None), (wu, None)
    raise MatchFailure(STEP, ga, "expert activation is not a gated SiLU (silu(x W1) * (x W3))")


def _products_of(gate: Node, up: Node):
    """mul nodes computing silu(gate) * up (either operand order, casts and views allowed)."""
    for user in _mul_users(up):
        a, b = user.args
        other = b if strip_layout(a) is strip_layout(up) else a
        if is_silu_of(other, gate):
            yield user


def _mul_users(node: Node) -> List[Node]:
    return [u for u in forward_through(node, permutes=True) if is_op(u, aten.mul)]

# --------------------------------------------------------------------------- the whole block
ALLOWED_OPS = (
    aten.index, aten.gather, aten.sort, aten.argsort, aten.div, aten.floor_divide, aten.histc, aten.bincount,
    aten.cumsum, aten._grouped_mm, aten.bmm, aten.mm, aten.split, aten.split_with_sizes, aten.slice, aten.silu,
    aten.sigmoid, aten.neg, aten.exp, aten.add, aten.mul, aten.sum, aten.index_put, aten.index_put_,
    aten.arange, aten.empty, aten.full, aten.zeros, aten.repeat, aten.repeat_interleave, aten.index_add,
    aten.scatter_add, aten.permute, aten.transpose, aten.new_zeros, aten.copy, aten.squeeze, aten.empty_like,
    aten.zeros_like, aten.index_select, prims.iota, aten.sym_size,
) + VIEW_OPS + CAST_OPS


def _allowed(node: Node) -> bool:
    return (is_getitem(node) or is_op(node, *ALLOWED_OPS) or op_name(node) in GROUPED_GEMMS
            or node.target in (operator.mul, operator.add, operator.floordiv, operator.sub)
            or masked_value(node) is not None or is_never_true(node) or is_idle_clamp(node))


def _output_candidates(g2: Node, tokens_shape: tuple):
    """Nodes after the second expert GEMM that are back at [tokens, hidden], nearest first."""
    frontier, seen = [g2], {g2}
    for _ in range(16):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user in seen or not _allowed(user):
                    continue
                seen.add(user)
                if same_shape(shape(user), tokens_shape) and not same_shape(shape(n), tokens_shape):
                    yield user
                nxt.append(user)
        frontier = nxt


def _hidden_2d(router: RouterMatch) -> tuple:
    xs = shape(router.ids)
    return (xs[0], router.hidden_size)


def match_experts(router: RouterMatch) -> ExpertsMatch:
    E, H = router.num_experts, router.hidden_size
    g1_all = _expert_gemms_from(router.x, E)
    # First GEMMs contract over the hidden size; a second GEMM reachable from x (through the first)
    # contracts over the intermediate size and is found from the gated product instead.
    g1_list = [g for g in g1_all if _contraction(g[2]) == H and _is_direct(g, g1_all)]
    require(g1_list, STEP, router.x, "the hidden states reach no GEMM against a [num_experts, ., .] parameter")
    product, (gate_w, gate_rows), (up_w, up_rows) = _gate_product(g1_list, E)

    g2_list = [g for g in _expert_gemms_from(product, E, max_depth=6)]
    require(len(g2_list) == 1, STEP, product,
            f"the gated product feeds {len(g2_list)} expert GEMMs; expected exactly one down projection")
    g2, g2_data, down_w = g2_list[0]
    I = _contraction(down_w)
    require(shape(down_w[0])[0] == E, STEP, g2, "down projection does not have one matrix per expert")

    sources = {router.x, router.ids, router.weights}
    params = {gate_w[0], up_w[0], down_w[0]} | sources
    failure = MatchFailure(STEP, g2, "the expert outputs are never reduced back to one row per token")
    for out in _output_candidates(g2, _hidden_2d(router)):
        region = region_between([out], sources)
        try:
            check_region(region, params, _allowed, STEP)
            inputs = {i for n in region for i in n.all_input_nodes}
            require(router.weights in inputs, STEP, out, "the routing weights are not applied to the expert outputs")
            require(router.dense or router.ids in inputs, STEP, out, "the experts do not use the chosen expert ids")
            _check_hidden_feeds_only_experts(region, router.x, [g[1] for g in g1_list])
            break
        except MatchFailure as err:
            failure = err
    else:
        raise failure
    weight_on = "input" if _depends_on(g1_list[0][1], router.weights, sources) else "output"

    gate = _weight_ref(gate_w, gate_rows)
    up = _weight_ref(up_w, up_rows)
    down = _weight_ref(down_w, None)
    for ref, rows_expected in ((gate, I), (up, I)):
        n_size = _canonical_shape(ref)[1]
        require(n_size == rows_expected, STEP, ref.param,
                f"gate/up projection has {n_size} output features, the down projection reads {rows_expected}")
    require(_canonical_shape(down)[1:] == (H, I), STEP, down.param, "down projection is not [E, hidden, intermediate]")
    impl = op_name(g1_list[0][0])
    return ExpertsMatch(out=out, w_gate=gate, w_up=up, w_down=down, intermediate_size=int(I), weight_on=weight_on,
                        region=region, implementation=impl)


def _check_hidden_feeds_only_experts(region: Set[Node], x: Node, g1_data: List[Node]) -> None:
    """The hidden states may only reach the block output through the first expert GEMMs (a
    residual add of x would otherwise be swallowed into the layer)."""
    feeding = set(g1_data)
    for data in g1_data:
        feeding |= region_between([data], {x})
    for n in region:
        if x in n.all_input_nodes and n not in feeding:
            raise MatchFailure(STEP, n, f"the hidden states reach the expert output through {op_name(n)}, "
                                        "not only through the expert GEMMs")


def _depends_on(node: Node, source: Node, sources: Set[Node]) -> bool:
    if node is source:
        return True
    return any(source in n.all_input_nodes for n in region_between([node], sources))


def _is_direct(g, all_gemms) -> bool:
    """A first GEMM is not downstream of another expert GEMM."""
    others = {o[0] for o in all_gemms if o[0] is not g[0]}
    return not (region_between([g[1]], set()) & others)


def _contraction(found) -> int:
    """K of an expert GEMM, from its (parameter, transposed) weight."""
    return _canonical_shape(WeightRef(param=found[0], transposed=found[1]))[2]


def _weight_ref(found, rows) -> WeightRef:
    param, transposed = found
    return WeightRef(param=param, transposed=transposed, rows=rows)


def _canonical_shape(ref: WeightRef) -> tuple:
    E, a, b = shape(ref.param)
    n, k = (b, a) if ref.transposed else (a, b)
    if ref.rows:
        n = ref.rows[1] - ref.rows[0]
    return (E, n, k)
