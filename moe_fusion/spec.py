"""MoESpec: the one contract between ``passes/`` (graph → spec) and ``lowering/`` (spec → kernels).

Everything the kernels need to reproduce a matched MoE layer is a field here; nothing is
re-derived from the graph later. Weights are not part of the spec: they travel as op
arguments in a fixed canonical form (see ``MoEWeights``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Optional

import torch

SCORINGS = ("softmax", "sigmoid", "none")
GROUP_SCORES = ("top2_sum", "max")
WEIGHT_PLACEMENTS = ("output", "input")
QUANTIZATIONS = ("none", "fp8_block", "fp8_block_quantize")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_BLOCK = 128  # weight blocks are FP8_BLOCK x FP8_BLOCK, activation groups 1 x FP8_BLOCK


class SpecError(ValueError):
    """A MoESpec that no MoE layer can have."""


@dataclass(frozen=True)
class MoESpec:
    hidden_size: int
    num_experts: int  # routed experts, global (what the router scores)
    top_k: int
    intermediate_size: int  # width of one routed expert's gated MLP
    # Expert parallelism: experts on this rank; the op then gets an expert_map
    # (global id -> local id, or -1) and returns this rank's partial sum.
    num_local_experts: int = 0  # 0 means "all of them"

    # Normalisation in front of the router (fused into the preamble when present).
    rms_norm: bool = False
    rms_norm_eps: float = 1e-6

    # Router and scoring.
    router_fp32: bool = False  # router GEMM on fp32-upcast inputs (DeepSeek-V3) or in the model dtype
    scoring: str = "softmax"  # softmax | sigmoid | none (raw logits)
    score_before_topk: bool = True  # False: top-k on logits, scoring applied to the k chosen (Llama4)
    correction_bias: bool = False  # bias added to the scores for the choice only (DeepSeek-V3)
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"  # score of a group: sum of its top-2 experts, or its max
    renormalize: bool = False
    renormalize_eps: float = 0.0  # added to the denominator (DeepSeek-V3 adds 1e-20)
    routed_scaling_factor: float = 1.0
    weight_on: str = "output"  # routing weight multiplies the expert output, or its input (Llama4)

    # Shared experts, always selected; HF merges n shared experts into one MLP of n*I width.
    shared_intermediate_size: int = 0
    shared_gate: bool = False  # shared output scaled by sigmoid(x @ shared_expert_gate.T) (Qwen2-MoE)

    # Types.
    dtype: str = "bfloat16"  # activations and non-quantized weights
    # none | fp8_block: e4m3 weights in 128x128 blocks, activations in 1x128 groups |
    # fp8_block_quantize: weights in the model dtype, computed as fp8_block from their block
    # quantisation (reference.quantize_fp8_blocks), made once (the backend's fp8_experts option)
    quant: str = "none"

    def __post_init__(self):
        if self.num_local_experts == 0:
            object.__setattr__(self, "num_local_experts", self.num_experts)
        _validate(self)
        # Serialised once: to_json() is called inside traced code, where json is not traceable.
        object.__setattr__(self, "_json", json.dumps(dataclasses.asdict(self), sort_keys=True))

    # ---- derived facts the kernels use ----
    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.n_group

    @property
    def grouped(self) -> bool:
        return self.n_group > 1

    @property
    def expert_parallel(self) -> bool:
        return self.num_local_experts != self.num_experts

    @property
    def has_shared_experts(self) -> bool:
        return self.shared_intermediate_size > 0

    @property
    def fp8(self) -> bool:
        """The expert weights come as e4m3 blocks with their scales."""
        return self.quant == "fp8_block"

    @property
    def quantizes_experts(self) -> bool:
        """The expert weights come in the model dtype and run as fp8_block (quant fp8_block_quantize)."""
        return self.quant == "fp8_block_quantize"

    def as_run(self) -> "MoESpec":
        """The layer the kernels run: fp8_block_quantize runs as fp8_block."""
        return self.replace(quant="fp8_block") if self.quantizes_experts else self

    # ---- transport through a custom op's string argument ----
    def to_json(self) -> str:
        return self._json

    @staticmethod
    def from_json(text: str) -> "MoESpec":
        return _spec_from_json(text)

    def replace(self, **changes) -> "MoESpec":
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=None)
def _spec_from_json(text: str) -> MoESpec:
    return MoESpec(**json.loads(text))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SpecError(message)


def _validate(s: MoESpec) -> None:
    for name in ("hidden_size", "num_experts", "top_k", "intermediate_size", "n_group", "topk_group"):
        _require(getattr(s, name) >= 1, f"{name} must be >= 1, got {getattr(s, name)}")
    _require(s.shared_intermediate_size >= 0, "shared_intermediate_size must be >= 0")
    _require(s.scoring in SCORINGS, f"unknown scoring {s.scoring!r}; expected one of {SCORINGS}")
    _require(s.group_score in GROUP_SCORES, f"unknown group_score {s.group_score!r}; expected one of {GROUP_SCORES}")
    _require(s.weight_on in WEIGHT_PLACEMENTS, f"unknown weight_on {s.weight_on!r}; expected one of {WEIGHT_PLACEMENTS}")
    _require(s.quant in QUANTIZATIONS, f"unknown quant {s.quant!r}; expected one of {QUANTIZATIONS}")
    _require(s.dtype in DTYPES, f"unknown dtype {s.dtype!r}; expected one of {tuple(DTYPES)}")
    _require(
        1 <= s.num_local_experts <= s.num_experts,
        f"num_local_experts must be in [1, num_experts={s.num_experts}], got {s.num_local_experts}",
    )
    _require(
        s.num_experts % s.n_group == 0,
        f"num_experts={s.num_experts} is not divisible by n_group={s.n_group}",
    )
    _require(s.topk_group <= s.n_group, f"topk_group={s.topk_group} exceeds n_group={s.n_group}")
    if s.grouped and s.group_score == "top2_sum":
        _require(
            s.experts_per_group >= 2,
            f"group_score top2_sum needs >= 2 experts per group, got {s.experts_per_group}",
        )
    kept = s.topk_group * s.experts_per_group
    _require(
        s.top_k <= kept,
        f"top_k={s.top_k} exceeds the {kept} experts in the topk_group={s.topk_group} kept groups",
    )
    _require(s.renormalize_eps >= 0.0, f"renormalize_eps must be >= 0, got {s.renormalize_eps}")
    _require(s.rms_norm_eps >= 0.0, f"rms_norm_eps must be >= 0, got {s.rms_norm_eps}")
    _require(
        s.score_before_topk or not s.correction_bias,
        "a correction bias only exists for scores computed before the top-k",
    )
    _require(
        s.score_before_topk or not s.grouped,
        "group-limited routing is only defined on scores computed before the top-k",
    )
    _require(not (s.shared_gate and not s.has_shared_experts), "shared_gate without shared experts")


@dataclass
class MoEWeights:
    """The tensors of one MoE layer in the canonical form every op and kernel takes.

    Shapes (E = local experts, H = hidden, I = intermediate, Is = shared intermediate);
    any strides are allowed, so the pass can hand over views of the model's own parameters:
      router_weight [num_experts, H], correction_bias [num_experts] (fp32 or model dtype),
      norm_weight [H], w_gate / w_up [E, I, H], w_down [E, H, I],
      fp8 scales: w_gate_scale / w_up_scale [E, ceil(I/128), ceil(H/128)], w_down_scale [E, ceil(H/128), ceil(I/128)],
      shared_gate / shared_up [Is, H], shared_down [H, Is], shared_expert_gate [1, H],
      expert_map [num_experts] int32: local expert id, or -1 for experts of other ranks.
    """

    router_weight: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    norm_weight: Optional[torch.Tensor] = None
    correction_bias: Optional[torch.Tensor] = None
    w_gate_scale: Optional[torch.Tensor] = None
    w_up_scale: Optional[torch.Tensor] = None
    w_down_scale: Optional[torch.Tensor] = None
    shared_gate: Optional[torch.Tensor] = None
    shared_up: Optional[torch.Tensor] = None
    shared_down: Optional[torch.Tensor] = None
    shared_expert_gate: Optional[torch.Tensor] = None
    expert_map: Optional[torch.Tensor] = None

    def check(self, spec: MoESpec) -> None:
        """Raise a clear error when these tensors cannot belong to ``spec``."""
        check_weights(spec, self)


def _shape_is(name: str, t: Optional[torch.Tensor], shape: tuple) -> None:
    _require(t is not None, f"{name} is required by the spec")
    _require(tuple(t.shape) == tuple(shape), f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_weights(spec: MoESpec, w: MoEWeights) -> None:
    E, H, I, Is = spec.num_local_experts, spec.hidden_size, spec.intermediate_size, spec.shared_intermediate_size
    _shape_is("router_weight", w.router_weight, (spec.num_experts, H))
    _shape_is("w_gate", w.w_gate, (E, I, H))
    _shape_is("w_up", w.w_up, (E, I, H))
    _shape_is("w_down", w.w_down, (E, H, I))
    if spec.rms_norm:
        _shape_is("norm_weight", w.norm_weight, (H,))
    if spec.correction_bias:
        _shape_is("correction_bias", w.correction_bias, (spec.num_experts,))
    if spec.fp8:
        cdiv = lambda a: -(-a // FP8_BLOCK)  # noqa: E731
        for name in ("w_gate", "w_up", "w_down"):
            _require(getattr(w, name).dtype == FP8_DTYPE, f"{name} must be {FP8_DTYPE} for quant=fp8_block")
        _shape_is("w_gate_scale", w.w_gate_scale, (E, cdiv(I), cdiv(H)))
        _shape_is("w_up_scale", w.w_up_scale, (E, cdiv(I), cdiv(H)))
        _shape_is("w_down_scale", w.w_down_scale, (E, cdiv(H), cdiv(I)))
    if spec.has_shared_experts:
        _shape_is("shared_gate", w.shared_gate, (Is, H))
        _shape_is("shared_up", w.shared_up, (Is, H))
        _shape_is("shared_down", w.shared_down, (H, Is))
    if spec.shared_gate:
        _shape_is("shared_expert_gate", w.shared_expert_gate, (1, H))
    if spec.expert_parallel:
        _shape_is("expert_map", w.expert_map, (spec.num_experts,))
