"""The routing half of a MoE layer, matched backwards from its top-k: router GEMM, scoring,
correction bias, group-limited selection, then forwards: routing weights, renormalisation,
scaling."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

import torch
from torch.fx import Node

from .graph_utils import (
    CAST_OPS, VIEW_OPS, BakedScalars, MatchFailure, aten, prims, check_region, dtype, forward_through, is_getitem,
    is_neg_inf, is_op, is_param, op_name, region_between, require, scalar_value, shape, strip, strip_upcasts,
)

STEP = "router"


@dataclass
class RouterMatch:
    topk: Node
    x: Node  # the hidden states the router reads (before views and casts)
    router_weight: Node
    ids: Node  # top-k expert ids [M, k]
    weights: Node  # routing weights: [M, k], or [M, E] with zeros off the top-k when ``dense``
    dense: bool
    fields: Dict[str, object]  # MoESpec fields of the routing part
    correction_bias: Optional[Node] = None
    region: Set[Node] = field(default_factory=set)
    baked: BakedScalars = field(default_factory=BakedScalars)
    blockers: List[MatchFailure] = field(default_factory=list)  # found, but not expressible as a MoESpec

    @property
    def num_experts(self) -> int:
        return self.fields["num_experts"]

    @property
    def hidden_size(self) -> int:
        return self.fields["hidden_size"]


def _topk_args(topk: Node):
    args = list(topk.args) + [None] * (5 - len(topk.args))
    k = args[1]
    dim = args[2] if args[2] is not None else topk.kwargs.get("dim", -1)
    largest = args[3] if args[3] is not None else topk.kwargs.get("largest", True)
    return k, dim, largest


def getitem_user(node: Node, index: int) -> Optional[Node]:
    return next((u for u in node.users if is_getitem(u, index)), None)


# --------------------------------------------------------------------------- backwards from the top-k
def _router_gemm(logits: Node, blockers: List[MatchFailure]):
    """logits = x @ W.T (mm with a permuted [E, H] weight); returns (x source, W, fp32, bias or None).

    A router bias (addmm) is a blocker rather than a failure, so the experts are still examined
    and the report says everything that keeps the layer from being fused."""
    mm = strip(logits)
    bias = None
    if is_op(mm, aten.addmm):
        blockers.append(MatchFailure(STEP, mm, "the router GEMM has a bias, which MoESpec cannot express"))
        bias = strip(mm.args[0])
        a, b = mm.args[1], mm.args[2]
    else:
        require(is_op(mm, aten.mm), STEP, mm,
                f"router logits come from {op_name(mm) if isinstance(mm, Node) else mm}, not a GEMM")
        a, b = mm.args
    wt = strip(b, casts=False)
    require(is_op(wt, aten.permute) and list(wt.args[1]) == [1, 0], STEP, wt, "router weight is not used transposed")
    w = strip(wt.args[0])
    require(is_param(w, 2), STEP, w, "router weight is not a 2-D model parameter")
    x = strip_upcasts(a)
    return x, w, dtype(mm) == torch.float32, bias


def _softmax_input(node: Node) -> Optional[Node]:
    """The logits of a softmax over the last dim, whether kept as one op, decomposed
    (exp(x - amax) / sum), or in the online form Inductor gives it on CUDA (its post-grad pass
    turns amax and sum into one prepare_softmax_online(x): exp(x - max) / sum)."""
    if is_op(node, aten._softmax, aten.softmax):
        return node.args[0]
    if not is_op(node, aten.div):
        return None
    num, den = strip(node.args[0]), strip(node.args[1])
    if not is_op(num, aten.exp):
        return None
    inner = strip(num.args[0])
    online = _online_softmax_of(den)
    if online is not None:
        subtracts_its_max = (is_op(inner, aten.sub) and strip(inner.args[0]) is strip(online.args[0])
                             and _online_softmax_of(inner.args[1], 0) is online)
        return inner.args[0] if subtracts_its_max else None
    if not (is_op(den, aten.sum) and strip(den.args[0]) is num):
        return None
    if is_op(inner, aten.sub) and is_op(strip(inner.args[1]), aten.amax):
        return inner.args[0]
    return inner


def _online_softmax_of(node, output: int = 1) -> Optional[Node]:
    """The prepare_softmax_online node over the last dim whose ``output`` (0: max, 1: sum) ``node``
    is (through views)."""
    node = strip(node, casts=False)
    if not (is_getitem(node, output) and is_op(node.args[0], prims.prepare_softmax_online)):
        return None
    online = node.args[0]
    return online if online.args[1] in (-1, len(shape(online.args[0])) - 1) else None


def _scores_of(node: Node):
    """(scoring, logits) for a score tensor; ('none', node) when it is the logits themselves."""
    node = strip(node)
    if is_op(node, aten.sigmoid):
        return "sigmoid", node.args[0]
    logits = _softmax_input(node)
    if logits is not None:
        return "softmax", logits
    return "none", node


def _flips_to_scatter(cond: Node):
    """Walk a boolean mask back to the scatter that built it; returns (scatter, number of negations)."""
    flips = 0
    node = cond
    while True:
        node = strip(node)
        if is_op(node, aten.bitwise_not, aten.logical_not):
            flips += 1
            node = node.args[0]
        elif is_op(node, aten.eq) and node.args[1] in (0, False):
            flips += 1
            node = node.args[0]
        elif is_op(node, aten.ne) and node.args[1] in (0, False):
            node = node.args[0]
        else:
            return node, flips


def _fill_value(base: Node):
    base = strip(base)
    if is_op(base, aten.full):
        return base.args[1]
    if is_op(base, aten.zeros_like, aten.zeros):
        return 0
    if is_op(base, aten.ones_like, aten.ones):
        return 1
    if is_op(base, aten.full_like):
        return base.args[1]
    raise MatchFailure(STEP, base, "group mask does not start from a constant fill")


def _constant(arg):
    if isinstance(arg, (int, float, bool)):
        return arg
    node = strip(arg)
    if is_op(node, aten.scalar_tensor):
        return node.args[0]
    if is_op(node, aten.full) and len(node.args[0]) == 0:
        return node.args[1]
    raise MatchFailure(STEP, node, "group mask values are not constants")


def _group_marks(mask: Node):
    """(value at chosen groups, value elsewhere, chosen-group ids) of a group mask built by
    scatter(fill, 1, ids, value), or by Inductor's one-hot rewrite of it for a single chosen
    group: where(ids.expand(M, G) == arange(G), value, fill)."""
    if is_op(mask, aten.scatter):
        require(mask.args[1] in (1, -1), STEP, mask, "group mask scatters along the wrong dim")
        return bool(mask.args[3]), bool(_fill_value(mask.args[0])), mask.args[2]
    if is_op(mask, aten.where) and is_op(strip(mask.args[0]), aten.eq):
        eq = strip(mask.args[0])
        a, b = strip(eq.args[0]), strip(eq.args[1])
        ids = a if is_op(b, prims.iota, aten.arange) else b
        return bool(_constant(mask.args[1])), bool(_constant(mask.args[2])), ids
    raise MatchFailure(STEP, mask, "group mask is not built by a scatter of the chosen groups")


def _group_limit(where: Node, fields: Dict[str, object]) -> Node:
    """Parse the group-limited mask around the final top-k; returns the un-masked choice scores."""
    cond, a, b = where.args
    if is_neg_inf(a):
        choice, masked_when_true = b, True
    elif is_neg_inf(b):
        choice, masked_when_true = a, False
    else:
        raise MatchFailure(STEP, where, "top-k input is a select without a -inf branch")
    scatter, flips = _flips_to_scatter(cond)
    marked, base, gidx = _group_marks(scatter)
    require(marked != base, STEP, scatter, "group mask marks nothing")
    # cond is true for chosen groups iff the scatter wrote "true" there and the negations cancel.
    true_means_kept = marked != bool(flips % 2)
    require(true_means_kept != masked_when_true, STEP, where, "the -inf mask hides the chosen groups instead of the others")

    require(is_getitem(gidx, 1) and is_op(gidx.args[0], aten.topk), STEP, gidx, "chosen groups do not come from a top-k")
    gtopk = gidx.args[0]
    topk_group, gdim, glargest = _topk_args(gtopk)
    require(glargest and gdim in (-1, 1), STEP, gtopk, "group top-k is not a largest-k over groups")
    group_scores = strip(gtopk.args[0])
    if is_op(group_scores, aten.sum):
        top2 = strip(group_scores.args[0], casts=False)
        require(is_getitem(top2, 0) and is_op(top2.args[0], aten.topk) and top2.args[0].args[1] == 2, STEP, top2,
                "group score is a sum but not of each group's top-2")
        grouped = top2.args[0].args[0]
        fields["group_score"] = "top2_sum"
    elif is_op(group_scores, aten.amax):
        grouped = group_scores.args[0]
        fields["group_score"] = "max"
    else:
        raise MatchFailure(STEP, group_scores, f"group score op {op_name(group_scores)} is neither top-2 sum nor max")
    require(strip(grouped) is strip(choice), STEP, grouped, "group scores are not computed from the choice scores")
    gshape = shape(grouped)
    require(len(gshape) == 3, STEP, grouped, "choice scores are not viewed as [tokens, groups, experts per group]")
    fields["n_group"] = int(gshape[1])
    fields["topk_group"] = int(topk_group)
    return choice


def _split_bias(choice: Node):
    """choice = scores + bias[E] (DeepSeek-V3's correction bias) or just scores."""
    node = strip(choice)
    if is_op(node, aten.add):
        for mine, other in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            bias = strip(other)
            if is_param(bias, 1):
                return mine, bias
    return choice, None


# --------------------------------------------------------------------------- forwards from the top-k
def _weights_chain(w: Node, fields: Dict[str, object], baked: BakedScalars) -> Node:
    """Follow renormalisation (w / (sum(w) [+ eps])), scaling (w * c) and casts; returns the final node."""
    fields.setdefault("renormalize", False)
    scaled = False
    while True:
        users = list(w.users)
        sums = [u for u in users if is_op(u, aten.sum) and _is_last_dim_keepdim(u)]
        divs = [u for u in users if is_op(u, aten.div) and u.args[0] is w and _denominator_of(u.args[1], sums)]
        if divs and not scaled and not fields["renormalize"] and len(users) == 2:
            div = divs[0]
            den = strip(div.args[1])
            eps = 0.0
            if is_op(den, aten.add):
                eps = scalar_value(den.args[1], STEP, baked, "renormalize_eps")
            fields["renormalize"], fields["renormalize_eps"] = True, eps
            w = div
            continue
        if len(users) != 1:
            return w
        user = users[0]
        if is_op(user, aten.mul) and user.args[0] is w and not isinstance(dtype_or_none(user.args[1]), torch.dtype):
            fields["routed_scaling_factor"] = scalar_value(user.args[1], STEP, baked, "routed_scaling_factor")
            scaled = True
            w = user
        elif is_op(user, aten.mul) and user.args[1] is w and not isinstance(dtype_or_none(user.args[0]), torch.dtype):
            fields["routed_scaling_factor"] = scalar_value(user.args[0], STEP, baked, "routed_scaling_factor")
            scaled = True
            w = user
        elif is_op(user, *CAST_OPS):
            w = user
        else:
            return w


def dtype_or_none(arg):
    """The dtype of a tensor-valued node with more than 0 dims (a per-element operand), else None."""
    if isinstance(arg, Node) and len(shape(arg)) > 0:
        return dtype(arg)
    return None


def _is_last_dim_keepdim(node: Node) -> bool:
    dims = node.args[1] if len(node.args) > 1 else None
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    nd = len(shape(node.args[0]))
    return keep and dims is not None and len(dims) == 1 and dims[0] in (-1, nd - 1)


def _denominator_of(den, sums) -> bool:
    den = strip(den)
    if den in sums:
        return True
    return is_op(den, aten.add) and strip(den.args[0]) in sums


def _dense_weights(values: Node, ids: Node, fields: Dict[str, object]):
    """Llama4: top-k on logits, chosen logits scattered into a -inf row, then sigmoid: a dense
    [M, E] weight that is zero off the top-k. Returns (scoring, weights node)."""
    for user in values.users:
        if is_op(user, aten.scatter) and user.args[2] is ids and user.args[3] is values \
                and _fill_value(user.args[0]) == float("-inf"):
            # In a bf16/fp16 model the sigmoid may run on an fp32 upcast of them.
            scored = [u for u in forward_through(user, views=False) if is_op(u, aten.sigmoid)]
            require(len(scored) == 1 and len(user.users) == 1, STEP, user, "scattered top-k logits are not scored by a sigmoid")
            return "sigmoid", scored[0], True
        if is_op(user, aten.sigmoid):
            return "sigmoid", user, False
    for node in _nodes_after(values, depth=4):
        if _softmax_input(node) is not None and strip(_softmax_input(node)) is values:
            return "softmax", node, False
    raise MatchFailure(STEP, values, "top-k on raw logits, but the chosen logits are never scored")


def _nodes_after(node: Node, depth: int):
    frontier, seen = [node], []
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        seen.extend(frontier)
    return seen


ALLOWED_OPS = (
    aten.mm, aten.addmm, aten.permute, aten.sigmoid, aten._softmax, aten.softmax, aten.amax, aten.sub, aten.exp, aten.sum,
    prims.prepare_softmax_online,
    aten.div, aten.add, aten.mul, aten.topk, aten.gather, aten.where, aten.full, aten.scatter, aten.bitwise_not,
    aten.logical_not, aten.eq, aten.ne, aten.scalar_tensor, aten.arange, prims.iota, aten.zeros_like, aten.ones_like, aten.full_like, aten.zeros, aten.ones,
) + VIEW_OPS + CAST_OPS


def _allowed(node: Node) -> bool:
    return is_getitem(node) or is_op(node, *ALLOWED_OPS)


def match_router(topk: Node) -> RouterMatch:
    k, dim, largest = _topk_args(topk)
    in_shape = shape(topk.args[0])
    require(largest and len(in_shape) == 2 and dim in (-1, 1), STEP, topk,
            "not a largest-k over the last dim of a [tokens, experts] tensor")
    ids = getitem_user(topk, 1)
    require(ids is not None, STEP, topk, "top-k indices are unused")
    fields: Dict[str, object] = {"top_k": int(k)}
    baked = BakedScalars()

    choice = strip(topk.args[0], casts=False)
    if is_op(choice, aten.where):
        choice = _group_limit(choice, fields)
    scores, bias = _split_bias(choice)
    scoring, logits = _scores_of(scores)
    blockers: List[MatchFailure] = []
    x, w, fp32, router_bias = _router_gemm(logits, blockers)
    E, H = shape(w)
    require(in_shape[1] == E, STEP, topk, f"top-k over {in_shape[1]} values but the router has {E} experts")
    fields.update(hidden_size=int(H), num_experts=int(E), router_fp32=fp32, correction_bias=bias is not None)
    require(k <= E, STEP, topk, "k exceeds the number of experts")

    dense = False
    if scoring == "none":
        values = getitem_user(topk, 0)
        require(values is not None, STEP, topk, "top-k on raw logits with unused values")
        scoring, weights, dense = _dense_weights(values, ids, fields)
        fields["score_before_topk"] = False
    else:
        fields["score_before_topk"] = True
        weights = _gathered_weights(topk, ids, scores, bias is not None or "n_group" in fields)
    fields["scoring"] = scoring
    weights = _weights_chain(weights, fields, baked)

    region = region_between([ids, weights], {x})
    allowed_inputs = {x, w} | {b for b in (bias, router_bias) if b is not None}
    check_region(region, allowed_inputs, _allowed, STEP)
    return RouterMatch(topk=topk, x=x, router_weight=w, ids=ids, weights=weights, dense=dense, fields=fields,
                       correction_bias=bias, region=region, baked=baked, blockers=blockers)


def _gathered_weights(topk: Node, ids: Node, scores: Node, choice_differs: bool) -> Node:
    """The routing weights of the chosen experts: the top-k values themselves when the top-k ran on
    the scores, else a gather of the scores at the chosen ids."""
    base = strip(scores)
    for user in ids.users:
        if is_op(user, aten.gather) and strip(user.args[0]) is base and user.args[1] in (1, -1):
            return user
    require(not choice_differs, STEP, topk,
            "top-k ran on biased or masked scores and the scores are never gathered at the chosen ids")
    values = getitem_user(topk, 0)
    require(values is not None, STEP, topk, "no routing weights: top-k values unused and no gather of the scores")
    return values
