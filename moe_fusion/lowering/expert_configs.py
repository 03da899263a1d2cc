"""Tile configurations of the expert GEMMs, per (problem shape, M bucket, device).

A small tuned table ships beside this file (``expert_configs.json``); ``python -m
moe_fusion.lowering.tune_experts`` regenerates it by timing candidates on the GPU. Shapes or
devices missing from the table get a heuristic that keeps every SM streaming weights: at
decode the expert block is bound by reading expert weights, so the grid is sized by how many
weight tiles the active experts offer, not by how many tokens there are. A GPU built from the SMs
of a tuned one (``SAME_SMS_AS``) takes that GPU's entries until it has its own.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TABLE_PATH = os.path.join(os.path.dirname(__file__), "expert_configs.json")
FP8_GROUP = 128
# (device-name prefix, tuned device): the H200 is the H100's chip (132 SMs, the same caches and
# shared memory) with more and faster HBM. Its own measured entries, once tuned, take precedence.
SAME_SMS_AS = (("NVIDIA H200", "NVIDIA H100 80GB HBM3"),)


@dataclass(frozen=True)
class GemmTiles:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    programs_per_sm: int = 2  # persistent grid: at most this many programs per SM
    split_k: int = 1  # K split across programs (GEMM1: summed by gemm1_combine_kernel; GEMM2: by its fp32 sum)
    swap_ab: bool = False  # weights . tokens^T (expert_tiles.tile_dot): the wide MMA at small token tiles


@dataclass(frozen=True)
class ExpertConfig:
    block_m: int  # token tile; the alignment is padded to it
    gemm1: GemmTiles
    gemm2: GemmTiles

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ExpertConfig":
        return ExpertConfig(d["block_m"], GemmTiles(**d["gemm1"]), GemmTiles(**d["gemm2"]))


@dataclass(frozen=True)
class ProblemKey:
    """What a configuration depends on. ``experts`` is the local count, ``global_experts`` the
    router's: together with top_k they say how many local experts M tokens touch."""

    weight_dtype: str  # "bfloat16" | "float16" | "fp8"
    hidden: int
    inter: int
    experts: int
    global_experts: int
    top_k: int

    def name(self) -> str:
        return (f"{self.weight_dtype}-H{self.hidden}-I{self.inter}-E{self.experts}of{self.global_experts}"
                f"-k{self.top_k}")


def m_bucket(m: int) -> int:
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


@functools.lru_cache(maxsize=None)
def read_table(path: str) -> dict:
    """A shipped JSON table (this one or shared_plan's), read once per path; {} where it is missing."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def tuned_device(device_name: str, table: dict) -> str:
    """The device whose entries of ``table`` serve ``device_name``: its own, else those of the
    tuned GPU with its SMs (SAME_SMS_AS), else its own name (no entries)."""
    if device_name in table:
        return device_name
    return next((tuned for prefix, tuned in SAME_SMS_AS if device_name.startswith(prefix)), device_name)


def lookup(key: ProblemKey, m: int, device_name: str, num_sms: int) -> Tuple[ExpertConfig, str]:
    """The configuration for ``m`` tokens, and where it came from ("table" or "heuristic")."""
    table = read_table(TABLE_PATH)
    entry = table.get(tuned_device(device_name, table), {}).get(key.name(), {}).get(str(m_bucket(m)))
    if entry is not None:
        return ExpertConfig.from_dict(entry), "table"
    return heuristic(key, m, num_sms), "heuristic"


def expected_active_experts(key: ProblemKey, m: int) -> float:
    """Mean number of local experts hit by m tokens under uniform routing."""
    p_hit_per_token = min(1.0, key.top_k / key.global_experts)
    return key.experts * (1.0 - (1.0 - p_hit_per_token) ** m)


def heuristic(key: ProblemKey, m: int, num_sms: int) -> ExpertConfig:
    fp8 = key.weight_dtype == "fp8"
    active = max(1.0, expected_active_experts(key, m))
    pairs_per_expert = m * key.top_k * (key.experts / key.global_experts) / active
    block_m = 16 if pairs_per_expert <= 16 else (32 if pairs_per_expert <= 32 else 64)
    target = 2 * num_sms  # enough weight tiles that every SM has a couple to stream
    block_n1 = _largest_block_n(active * key.inter, target, (128, 64, 32, 16))
    block_n2 = _largest_block_n(active * key.hidden, target, (128, 64, 32))
    tiles2 = active * key.hidden / block_n2
    split_k = 1
    while tiles2 * split_k < target and key.inter // (split_k * 2) >= 256:
        split_k *= 2
    block_k = FP8_GROUP if fp8 else 128
    return ExpertConfig(
        block_m=block_m,
        gemm1=GemmTiles(block_n=block_n1, block_k=block_k, num_warps=4, num_stages=4),
        gemm2=GemmTiles(block_n=block_n2, block_k=block_k, num_warps=4, num_stages=4, split_k=split_k),
    )


def _largest_block_n(rows: float, target: int, choices) -> int:
    for bn in choices:
        if rows / bn >= target:
            return bn
    return choices[-1]


def validate(cfg: ExpertConfig, fp8: bool) -> Optional[str]:
    """Why a configuration cannot run, or None."""
    for name, g in (("gemm1", cfg.gemm1), ("gemm2", cfg.gemm2)):
        if fp8 and g.block_k % FP8_GROUP:
            return f"{name}.block_k must be a multiple of {FP8_GROUP} for fp8 (whole scale groups), got {g.block_k}"
        if g.block_n < 16 or g.block_k < 16 or cfg.block_m < 16:
            return f"{name}: tl.dot needs blocks of at least 16"
        if g.split_k < 1:
            return f"{name}.split_k must be >= 1"
    return None
