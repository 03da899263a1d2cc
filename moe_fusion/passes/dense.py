"""The dense parts around the routed experts: the shared expert (a gated-SiLU MLP on the same
input, optionally scaled by sigmoid(x @ gate.T)) joined to the routed output by an add, and
the RMSNorm in front of the layer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Set

from torch.fx import Node

from .experts import is_silu_of
from .graph_utils import (
    CAST_OPS, VIEW_OPS, BakedScalars, aten, check_region, forward_through, is_op, is_param, region_between, require, scalar_value,
    shape, strip, strip_upcasts,
)


@dataclass
class SharedMatch:
    out: Node  # routed + shared
    gate: Node
    up: Node
    down: Node
    expert_gate: Optional[Node]
    region: Set[Node] = field(default_factory=set)

    @property
    def intermediate_size(self) -> int:
        return int(shape(self.gate)[0])


def _linear_weight(node: Node, x: Node) -> Optional[Node]:
    """W when node is x @ W.T for a 2-D parameter W (views and casts allowed), else None."""
    mm = strip(node)
    if not is_op(mm, aten.mm) or strip_upcasts(mm.args[0]) is not x:
        return None
    wt = strip(mm.args[1], casts=False)
    if not (is_op(wt, aten.permute) and list(wt.args[1]) == [1, 0]):
        return None
    w = strip(wt.args[0])
    return w if is_param(w, 2) else None


def _gated_mlp(node: Node, x: Node):
    """(gate, up, down) weights when node = (silu(x Wg.T) * (x Wu.T)) Wd.T, else None."""
    mm = strip(node)
    if not is_op(mm, aten.mm):
        return None
    return _gated_mlp_parts(mm.args[0], mm.args[1], x)


def _gated_mlp_parts(prod_arg: Node, down_arg: Node, x: Node):
    wt = strip(down_arg, casts=False)
    if not (is_op(wt, aten.permute) and list(wt.args[1]) == [1, 0] and is_param(strip(wt.args[0]), 2)):
        return None
    down = strip(wt.args[0])
    prod = strip(prod_arg)
    if not is_op(prod, aten.mul):
        return None
    for act, lin in ((prod.args[0], prod.args[1]), (prod.args[1], prod.args[0])):
        up = _linear_weight(lin, x)
        if up is None:
            continue
        act_s = strip(act)
        for candidate in (act_s.args[0] if is_op(act_s, aten.silu) else None,
                          *(a for a in act_s.args if isinstance(a, Node))):
            if candidate is None:
                continue
            gate_lin = strip(candidate)
            gate = _linear_weight(gate_lin, x)
            if gate is not None and is_silu_of(act, gate_lin):
                return gate, up, down
    return None


def _sigmoid_gated(node: Node, x: Node):
    """(mlp node, expert gate weight [1, H]) when node = sigmoid(x Wsg.T) * mlp."""
    mul = strip(node)
    if not is_op(mul, aten.mul):
        return None
    for sig, mlp in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
        s = strip(sig)
        if is_op(s, aten.sigmoid):
            w = _linear_weight(s.args[0], x)
            if w is not None and shape(w)[0] == 1:
                return mlp, w
    return None


SHARED_OPS = (aten.mm, aten.permute, aten.mul, aten.silu, aten.sigmoid, aten.neg, aten.exp, aten.add, aten.div) \
    + VIEW_OPS + CAST_OPS


def match_shared(routed_out: Node, x: Node) -> Optional[SharedMatch]:
    """routed + shared(x), where shared is a gated MLP of x (optionally sigmoid-gated)."""
    for add in forward_through(routed_out):
        if is_op(add, aten.addmm) and strip(add.args[0]) is strip(routed_out):
            # Inductor folds "routed + shared_down(h)" into addmm(routed, h, W.T).
            mlp = _gated_mlp_parts(add.args[1], add.args[2], x)
            if mlp is not None:
                region = region_between([add.args[1], add.args[2]], {x})
                check_region(region, {x, *mlp}, lambda n: is_op(n, *SHARED_OPS), "shared expert")
                return SharedMatch(out=add, gate=mlp[0], up=mlp[1], down=mlp[2], expert_gate=None, region=region)
            continue
        if not is_op(add, aten.add) or len(add.args) != 2:
            continue
        for mine, other in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
            if strip(mine) is not strip(routed_out):
                continue
            expert_gate = None
            branch = other
            gated = _sigmoid_gated(other, x)
            if gated is not None:
                branch, expert_gate = gated
            mlp = _gated_mlp(branch, x)
            if mlp is None:
                continue
            region = region_between([other], {x})
            params = {x, *mlp} | ({expert_gate} if expert_gate is not None else set())
            check_region(region, params, lambda n: is_op(n, *SHARED_OPS), "shared expert")
            return SharedMatch(out=add, gate=mlp[0], up=mlp[1], down=mlp[2], expert_gate=expert_gate, region=region)
    return None


@dataclass
class NormMatch:
    input: Node  # pre-norm hidden states
    weight: Node
    eps: float
    region: Set[Node] = field(default_factory=set)
    baked: BakedScalars = field(default_factory=BakedScalars)


def match_rms_norm(out: Node) -> Optional[NormMatch]:
    """out = w * (h * rsqrt(mean(h^2, -1, keepdim) + eps)) with fp32 statistics (HF and nn.RMSNorm forms)."""
    top = out
    out = strip(out, casts=False)
    if is_op(out, *CAST_OPS):  # nn.RMSNorm scales in fp32 and casts last; HF casts, then scales
        out = strip(out.args[0], casts=False)
    if not is_op(out, aten.mul):
        return None
    for w_arg, n_arg in ((out.args[0], out.args[1]), (out.args[1], out.args[0])):
        w = strip(w_arg)
        if not is_param(w, 1):
            continue
        normed = strip(n_arg)
        if not is_op(normed, aten.mul):
            continue
        for h_arg, r_arg in ((normed.args[0], normed.args[1]), (normed.args[1], normed.args[0])):
            rs = strip(r_arg)
            if not is_op(rs, aten.rsqrt):
                continue
            add = strip(rs.args[0])
            if not is_op(add, aten.add):
                continue
            mean = strip(add.args[0])
            if not is_op(mean, aten.mean):
                continue
            sq = strip(mean.args[0], casts=False)
            h = strip(h_arg)
            if not (is_op(sq, aten.pow) and sq.args[1] == 2 and strip(sq.args[0]) is h) and not (
                    is_op(sq, aten.mul) and strip(sq.args[0]) is h and strip(sq.args[1]) is h):
                continue
            baked = BakedScalars()
            eps = scalar_value(add.args[1], "norm", baked, "rms_norm_eps")
            require(shape(w)[0] == shape(h)[-1], "norm", w, "norm weight does not match the hidden size")
            region = region_between([top], {h})
            check_region(region, {w, h}, lambda n: is_op(n, aten.mul, aten.rsqrt, aten.add, aten.mean, aten.pow,
                                                       *VIEW_OPS, *CAST_OPS), "norm")
            return NormMatch(input=h, weight=w, eps=eps, region=region, baked=baked)
    return None
