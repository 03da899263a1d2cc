#!/usr/bin/env bash
# Session 16, call 5 (the command as sent, on commit 32e6361): the dsv3-ep8 fp8 layer's graph timeline with the fp8 shared
# expert on its stream (issue 6), then the bench's dsv3 preamble part (issue 4).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; MOE_FUSION_SHARED_FP8=1 timeout -k 5 70 python benchmarks/gpu_layer_timeline.py --part layer --shape dsv3-ep8 --dtype fp8 --m 1,4 > $OUT/layer_timeline.txt 2>&1; echo "timeline $?"; timeout -k 5 50 python -m moe_fusion.tools.bench --shape dsv3 --parts preamble --m 1,2,4,8,16,32,64 --variants moe_fusion --markdown $OUT/preamble_bench.md > $OUT/preamble_bench.log 2>&1; echo "bench $?"; grep "^| dsv3" $OUT/preamble_bench.md; grep -v Warn $OUT/layer_timeline.txt | head -40
