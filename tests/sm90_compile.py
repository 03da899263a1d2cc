"""Triton's sm_90 compile of the fp8 expert GEMMs, without a GPU (Triton ships ptxas), for
test_sm_residency.py:

    python tests/sm90_compile.py '[[gemm1, block_m, {GemmTiles fields}], ...]'

prints a JSON list of each compile's shared memory per program (bytes). The launch-time specialisations
are a decode call's: unit K strides, sizes and pointers divisible by 16, M = 1."""
import json
import os
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_fusion.lowering import expert_tiles  # noqa: E402
from moe_fusion.lowering.expert_gemm1_kernel import expert_gemm1_kernel  # noqa: E402
from moe_fusion.lowering.expert_gemm2_kernel import expert_gemm2_kernel  # noqa: E402

FP8_POINTERS = {"x_ptr", "wg_ptr", "wu_ptr", "swg_ptr", "swu_ptr", "hq_ptr", "wd_ptr", "swd_ptr"}
INT32_POINTERS = {"sorted_pair_ids_ptr", "tile_expert_ptr", "num_tiles_ptr", "ticket_ptr"}
# Integers that are not multiples of 16 at dsv3 sizes (scale strides of 56 groups, counts).
NOT_DIVISIBLE = {"stride_xsm", "stride_sgn", "stride_sun", "stride_ssgn", "stride_ssun", "stride_sn", "stride_ssn",
                 "stride_hsm", "split_k", "top_k", "num_pairs", "gate_parts"}


def constants(gemm1: bool, block_m: int, t: dict, names: list) -> dict:
    const = dict(BLOCK_M=block_m, BLOCK_N=t["block_n"], BLOCK_K=t["block_k"], SUB_K=expert_tiles.FP8_GROUP,
                 SWAP_AB=t["swap_ab"], A_MODE=expert_tiles.A_FP8.value, N_SHARED=0, SHARED_GATE=False, EVEN_N=True,
                 EVEN_K=True, DENSE_ALIGNMENT=False, LAUNCH_DEPENDENTS=True, M=1)
    if gemm1:
        const.update(WEIGHT_ON_INPUT=False, QUANT_H=False, SPLIT_OUT=t["split_k"] > 1, ZERO_BLOCK=1024)
    else:
        const.update(APPLY_WEIGHT=True, DETERMINISTIC=False, GATE_PARTS=1, MODEL_DTYPE=tl.bfloat16, USE_PDL=False)
    const.update({k: 1 for k in names if k.startswith("stride_") and k.endswith("k")})
    return const


def argument_type(name: str, gemm1: bool, const: dict) -> str:
    if name in const:
        return "constexpr"
    if not name.endswith("_ptr"):
        return "i32"
    if name in FP8_POINTERS or (name == "h_ptr" and not gemm1):
        return "*fp8e4nv"
    if name in INT32_POINTERS:
        return "*i32"
    return "*bf16" if name in ("h_ptr", "gx_ptr") else "*fp32"


def shared_bytes(gemm1: bool, block_m: int, t: dict) -> int:
    fn = expert_gemm1_kernel if gemm1 else expert_gemm2_kernel
    names = list(fn.arg_names)
    const = constants(gemm1, block_m, t, names)
    signature = {k: argument_type(k, gemm1, const) for k in names}
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in names
             if signature[k] != "constexpr" and k not in NOT_DIVISIBLE}
    compiled = triton.compile(ASTSource(fn, signature, const, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=t["num_warps"], num_stages=t["num_stages"]))
    return compiled.metadata.shared


if __name__ == "__main__":
    print(json.dumps([shared_bytes(gemm1, block_m, t) for gemm1, block_m, t in json.loads(sys.argv[1])]))
