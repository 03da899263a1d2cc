"""Small dataflow helpers over post-grad ATen FX graphs: op tests, looking through views and
casts, scalar constants, and the region of nodes between a layer's inputs and its outputs."""
from __future__ import annotations

import contextvars
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch._inductor.inductor_prims  # noqa: F401  (registers prims.prepare_softmax_online)
from torch.fx import Node

aten = torch.ops.aten
prims = torch.ops.prims


class MatchFailure(Exception):
    """A pattern step that did not hold: which step, on which node, why."""

    def __init__(self, step: str, node: Optional[Node], reason: str):
        super().__init__(f"{step}: {reason}" + (f" (at node {node.name})" if node is not None else ""))
        self.step = step
        self.node = node.name if isinstance(node, Node) else None
        self.reason = reason


def require(ok: bool, step: str, node: Optional[Node], reason: str) -> None:
    if not ok:
        raise MatchFailure(step, node, reason)


# --------------------------------------------------------------------------- op tests
def _packet(target):
    return getattr(target, "overloadpacket", target)


def is_op(node, *packets) -> bool:
    """True when ``node`` calls one of the given ATen/prims op packets (any overload)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    target = _packet(node.target)
    return any(target is p for p in packets)


def op_name(node: Node) -> str:
    """'aten.mm', 'transformers.grouped_mm_fallback', 'getitem', ... (namespace.name of the op)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    return getattr(target, "__name__", str(target))


def is_getitem(node, index: Optional[int] = None) -> bool:
    import operator

    return (
        isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem
        and (index is None or node.args[1] == index)
    )


VIEW_OPS = (aten.view, aten._unsafe_view, aten.reshape, aten.unsqueeze, aten.squeeze, aten.clone,
            aten.alias, aten.contiguous, aten.expand)
CAST_OPS = (prims.convert_element_type, aten._to_copy)


def val(node):
    """The FakeTensor (or SymInt) a node produces, or None."""
    return node.meta.get("val") if isinstance(node, Node) else None


def shape(node) -> tuple:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def same_size(a, b) -> bool:
    """Sizes equal for every value of their symbols (never adds a guard, safe on unbacked sizes)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(a == b)


def same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def dtype(node) -> Optional[torch.dtype]:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def strip(node, views: bool = True, casts: bool = True):
    """Walk back through shape-only ops and dtype casts to the producing node."""
    while isinstance(node, Node):
        if (views and is_op(node, *VIEW_OPS)) or (casts and is_op(node, *CAST_OPS)):
            node = node.args[0]
        else:
            return node
    return node


def strip_upcasts(node):
    """Walk back through shape-only ops and casts to a wider float type (a router's .float()),
    but not through a cast down to the model dtype, which is part of the value."""
    while isinstance(node, Node):
        if is_op(node, *VIEW_OPS):
            node = node.args[0]
        elif is_op(node, *CAST_OPS) and _widens(node.args[0], node):
            node = node.args[0]
        else:
            return node
    return node


def _widens(src, dst) -> bool:
    a, b = dtype(src), dtype(dst)
    return a == b or (a is not None and b is not None and a.is_floating_point and b.is_floating_point
                      and torch.finfo(b).bits > torch.finfo(a).bits)


def strip_layout(node):
    """Walk back through views, casts and permutes: the same values in another layout."""
    while isinstance(node, Node) and is_op(node, *VIEW_OPS, *CAST_OPS, aten.permute, aten.transpose):
        node = node.args[0]
    return node


def users_breadth_first(start: Node, max_depth: int, expand: Callable[[Node], bool] = lambda n: True):
    """Yield the nodes reached forward from ``start`` (each once, nearest first) up to ``max_depth``
    user hops; the walk goes on past a node only where ``expand(node)`` holds."""
    frontier, seen = [start], {start}
    for _ in range(max_depth):
        following = []
        for n in frontier:
            for user in n.users:
                if user in seen:
                    continue
                seen.add(user)
                yield user
                if expand(user):
                    following.append(user)
        frontier = following


def forward_through(node: Node, views: bool = True, casts: bool = True, permutes: bool = False) -> List[Node]:
    """The users of ``node`` reached through shape-only ops, casts and masks that never apply
    (masked_value): the first non-transparent ones."""
    out, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if ((views and is_op(user, *VIEW_OPS)) or (casts and is_op(user, *CAST_OPS))
                    or (permutes and is_op(user, aten.permute, aten.transpose)) or masked_value(user) is n):
                stack.append(user)
            else:
                out.append(user)
    return out


# --------------------------------------------------------------------------- masks that never apply
def index_range(node) -> Optional[Tuple[int, int]]:
    """[low, high): where an integer tensor's values lie by how they are computed. The indices of
    a top-k over a dimension of size n lie in [0, n); views, integer casts, sorting and gathering
    keep the range, a clamp narrows it. None where it is not known."""
    if is_getitem(node, 1) and is_op(node.args[0], aten.topk):
        topk = node.args[0]
        dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
        size = shape(topk.args[0])[dim] if shape(topk.args[0]) else None
        return (0, size) if isinstance(size, int) else None
    if is_getitem(node, 0) and is_op(node.args[0], aten.sort):
        return index_range(node.args[0].args[0])
    if not (_is_integer(node) and isinstance(node.args[0], Node) and _is_integer(node.args[0])):
        return None
    if is_op(node, *VIEW_OPS, *CAST_OPS, aten.index, aten.gather, aten.index_select):
        return index_range(node.args[0])
    if is_op(node, aten.clamp, aten.clamp_min, aten.clamp_max):
        return _clamped(index_range(node.args[0]), node)
    return None


def _clamped(values: Optional[Tuple[int, int]], clamp: Node) -> Optional[Tuple[int, int]]:
    """The range of ``clamp``'s output when its input lies in ``values`` (None if either is unknown)."""
    limits = _clamp_limits(clamp)
    if values is None or not all(v is None or isinstance(v, int) for v in limits):
        return None
    return _clip(values[0], limits), _clip(values[1] - 1, limits) + 1


def _is_integer(node: Node) -> bool:
    kind = dtype(node)
    return kind is not None and not kind.is_floating_point and not kind.is_complex and kind != torch.bool


def _clamp_limits(node: Node) -> tuple:
    """(min, max) of a clamp / clamp_min / clamp_max (None where that side is open)."""
    if is_op(node, aten.clamp_min):
        return node.args[1], None
    if is_op(node, aten.clamp_max):
        return None, node.args[1]
    low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    return low, high


def _clip(value: int, limits: tuple) -> int:
    low, high = limits
    value = value if low is None else max(value, low)
    return value if high is None else min(value, high)


def is_idle_clamp(node) -> bool:
    """A clamp whose range holds every value of its input's index_range (transformers 5.17 clamps
    top-k expert ids into [0, num_experts - 1] whether or not any is a sentinel)."""
    if not is_op(node, aten.clamp, aten.clamp_min, aten.clamp_max):
        return False
    values = index_range(node.args[0])
    return values is not None and _clamped(values, node) == values


def is_never_true(cond) -> bool:
    """A boolean tensor that is False everywhere by construction: ``ids >= c`` (or ``ids > c``) on
    ids whose index_range lies below that, through views."""
    cond = strip(cond, casts=False)
    if not is_op(cond, aten.ge, aten.gt) or not isinstance(cond.args[1], int):
        return False
    values = index_range(cond.args[0])
    limit = cond.args[1] + (1 if is_op(cond, aten.gt) else 0)
    return values is not None and values[1] <= limit


def masked_value(node) -> Optional[Node]:
    """x for ``where(cond, other, x)`` whose condition is_never_true (so it returns x, same shape
    and dtype), else None. transformers 5.17's grouped-GEMM experts mask "sentinel" expert ids
    (>= num_experts, only there under expert parallelism) this way around both GEMMs."""
    if not is_op(node, aten.where) or len(node.args) != 3 or not isinstance(node.args[2], Node):
        return None
    x = node.args[2]
    if not is_never_true(node.args[0]) or not same_shape(shape(node), shape(x)) or dtype(node) != dtype(x):
        return None
    return x


def single_user(node: Node) -> Optional[Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


# --------------------------------------------------------------------------- scalars
# Under dynamic=True Dynamo turns float attributes (an RMSNorm eps, a routed scaling factor)
# into 0-d graph inputs; the backend hands the pass their compile-time values through this.
_scalar_inputs: contextvars.ContextVar[Optional[Sequence]] = contextvars.ContextVar("moe_fusion_inputs", default=None)


def set_example_inputs(inputs: Optional[Sequence]):
    return _scalar_inputs.set(inputs)


def reset_example_inputs(token) -> None:
    _scalar_inputs.reset(token)


class BakedScalars(dict):
    """Spec field -> compile-time value of a float that reached the graph as an input. ``inputs``
    keeps each one's placeholder: the rewritten graph hands it to the op, which computes with the
    value of each call, so a float the model changes later (no recompile) is never stale."""

    def __init__(self):
        super().__init__()
        self.inputs: Dict[str, Node] = {}


def placeholder_index(node: Node) -> int:
    return [n for n in node.graph.nodes if n.op == "placeholder"].index(node)


def scalar_value(arg, step: str, baked: Optional[BakedScalars] = None, name: str = "") -> float:
    """A Python number for a scalar argument: a literal, a 0-d constant, or a 0-d graph input whose
    compile-time value the backend knows (recorded in ``baked`` with its input)."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    node = strip(arg) if isinstance(arg, Node) else None
    require(node is not None, step, None, f"scalar {name or arg!r} is not a constant")
    if is_op(node, aten.full) and len(node.args[0]) == 0:
        return float(node.args[1])
    if is_op(node, aten.scalar_tensor):
        return float(node.args[0])
    if node.op == "placeholder":
        v = val(node)
        require(isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point(), step, node,
                f"scalar {name} comes from a graph input that is not a 0-d float")
        inputs = _scalar_inputs.get()
        index = placeholder_index(node)
        require(inputs is not None and index < len(inputs), step, node,
                f"{name} is an unspecialized float graph input with no compile-time value here; use "
                "backend='moe_fusion' or set torch._dynamo.config.specialize_float=True")
        real = inputs[index]
        require(isinstance(real, torch.Tensor) and real.dim() == 0 and not isinstance(
            real, torch._subclasses.FakeTensor), step, node, f"{name}: the compile-time input is not a real 0-d tensor")
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # the pass runs under Inductor's fake mode
            value = float(real.item())
        if baked is not None:
            baked[name] = value
            baked.inputs[name] = node
        return value
    raise MatchFailure(step, node, f"scalar {name} is computed ({op_name(node)}), not a constant")


def is_neg_inf(arg) -> bool:
    if isinstance(arg, float):
        return arg == float("-inf")
    node = strip(arg) if isinstance(arg, Node) else None
    return is_op(node, aten.full) and len(node.args[0]) == 0 and node.args[1] == float("-inf")


def is_param(node, ndim: Optional[int] = None) -> bool:
    """A graph input holding a tensor (parameters are graph inputs after Dynamo lifts them)."""
    v = val(node)
    return (isinstance(node, Node) and node.op == "placeholder" and isinstance(v, torch.Tensor)
            and (ndim is None or v.dim() == ndim))


def is_sym_arith(node: Node) -> bool:
    """Size arithmetic on SymInts (e.g. tokens * top_k), not tensor compute."""
    return isinstance(val(node), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def is_constant_leaf(node: Node) -> bool:
    """A node that needs no tensor input: fills, ranges, empties, sym-int arithmetic, 0-d scalars."""
    if node.op == "placeholder":
        v = val(node)
        return not isinstance(v, torch.Tensor) or v.dim() == 0
    if node.op == "get_attr":
        return True
    return not any(isinstance(a, Node) and isinstance(val(a), torch.Tensor)
                   for a in node.all_input_nodes)


# --------------------------------------------------------------------------- regions
def region_between(sinks: Iterable[Node], sources: Set[Node]) -> Set[Node]:
    """The nodes computing ``sinks`` from ``sources``: ancestors of sinks, stopping at sources and
    graph inputs (neither included)."""
    region: Set[Node] = set()
    stack = [s for s in sinks if s not in sources]
    while stack:
        n = stack.pop()
        if n in region or n in sources or n.op == "placeholder":
            continue
        region.add(n)
        stack.extend(n.all_input_nodes)
    return region


def region_inputs(region: Set[Node]) -> Set[Node]:
    return {i for n in region for i in n.all_input_nodes if i not in region}


def check_region(region: Set[Node], allowed_inputs: Set[Node], allowed_ops: Callable[[Node], bool],
                 step: str) -> None:
    """Every input of the region is expected and every op in it is of a known kind."""
    for inp in region_inputs(region):
        if inp in allowed_inputs or is_constant_leaf(inp):
            continue
        raise MatchFailure(step, inp, f"the {step} depends on an unexpected value {inp.name} ({op_name(inp) if inp.op == 'call_function' else inp.op})")
    for n in region:
        if n.op == "call_function" and not is_sym_arith(n) and not allowed_ops(n):
            raise MatchFailure(step, n, f"op {op_name(n)} is not part of any known {step} form")


def topo_sorted(nodes: Iterable[Node]) -> List[Node]:
    nodes = set(nodes)
    if not nodes:
        return []
    graph = next(iter(nodes)).graph
    return [n for n in graph.nodes if n in nodes]
