"""Copies of expert_configs.json with one GEMM's tiles changed, for A/Bs through
--variant NAME:expert_configs.TABLE_PATH=<copy> (the table is read per lookup, cached per path).

    python variant_tables.py OUT_DIR    writes OUT_DIR/<variant>.json for each variant below

Session 28's question: at dsv3-ep8 fp8 with the fp8 shared expert ("stream-late"), the shared GEMM2 runs
beside the routed GEMM2. Their programs need 2 x (72.5 + 1) KB and 2 x (40 + 1) KB of shared memory per SM
at M = 1, more than the SM's 228 KB: the routed GEMM2's second program on an SM waits for the shared
GEMM2's programs to end. Each variant makes room in one of the two launches.
"""
import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TABLE = os.path.join(HERE, "..", "..", "..", "moe_fusion", "lowering", "expert_configs.json")
DEVICE = "NVIDIA H100 80GB HBM3"
ROUTED = "fp8-H7168-I2048-E32of256-k8"
SHARED = "fp8-H7168-I2048-E1of1-k1"

# variant -> [(problem, M bucket, gemm, changes)]: the two that call 1 ran
VARIANTS = {
    "r2s3": [(ROUTED, "1", "gemm2", dict(num_stages=3)), (ROUTED, "4", "gemm2", dict(block_k=128, num_stages=3))],
    "sh2s3": [(SHARED, "1", "gemm2", dict(num_stages=3)), (SHARED, "4", "gemm2", dict(num_stages=3))],
}


def main(out_dir: str) -> None:
    with open(TABLE) as f:
        table = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    for name, changes in VARIANTS.items():
        t = copy.deepcopy(table)
        for problem, bucket, gemm, fields in changes:
            t[DEVICE][problem][bucket][gemm].update(fields)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(t, f, indent=1)
        print(name, changes)


if __name__ == "__main__":
    main(sys.argv[1])
