#!/usr/bin/env bash
# The one GPU script: versions, the GPU tests, then the decode-latency bench of every shape.
# Results go to $OUT (gpu_tests.log, bench.log, <date>_<gpu>.{json,md,txt,png}); the last thing
# printed is a compact summary table. Run from the repository root:
#   OUT=/tmp/out bash benchmarks/run_gpu.sh
# Environment overrides (defaults in brackets):
#   BENCH_SHAPES [dsv3,dsv3-ep8,qwen3-30b-a3b,mixtral]  BENCH_PARTS [preamble,experts,layer]
#   BENCH_M [1,2,4,8,16,32,64]  BENCH_VARIANTS [eager,inductor,moe_fusion]
#   BENCH_FP8_SHAPES [dsv3] and BENCH_FP8_PARTS [experts]: the fp8 pass (empty shapes: none)
#   BENCH_ARGS: extra flags for every bench call (e.g. "--variant-budget 30")
#   RUN_BUDGET_S [510]: wall seconds for the whole script; the bench calls are cut to fit and keep
#     what they finished (their JSON is rewritten after every part)
#   RUN_GPU_TESTS [1]: 0 skips the GPU tests; GPU_TESTS [tests/]: which test files; GPU_TESTS_S [a third
#     of RUN_BUDGET_S]: their seconds (the whole -m gpu set took ~450 s on the H100 on 2026-11-24; the layer's
#     GPU tests alone ~650 s in one process in session 18, 241 s on 3 workers); GPU_TEST_WORKERS [3]: pytest-xdist
#     workers where it is installed (8 ran the GPU out of memory with real-size layers), 0 for one process
#   RANDOM_S [0]: seconds for the randomized differential tests on the GPU (tests/test_bad_inputs.py,
#     tests/test_random_{preamble,experts}.py: not marked gpu, they run on CUDA where it exists),
#     MOE_FUSION_RANDOM_SCALE [20] times CI's cases; 0 skips them. RANDOM_FAMILIES: the -k filters run
#     side by side. Verbose logs: a run cut at RANDOM_S still counts what passed
#   E2E_S [0]: seconds for benchmarks/e2e_decode.py (HF DeepSeek-V3-style decode step), 0 skips it;
#     E2E_ARGS [--config real --layers 2 --batch 1,4,16]
#   OVERLAP_S [0]: seconds for benchmarks/gpu_overlap.py (shared expert vs preamble on two streams),
#     0 skips it; OVERLAP_ARGS: extra flags. Writes overlap.{json,md}, overlap_trace.json
#   ROUTING_S [0]: seconds for the expert-parallel layer over router seeds (benchmarks/routing_seeds.py: its
#     time at the routing it should expect, not one seed's), 0 skips it; ROUTING_SEEDS [0 1 2 3 4 5 6 7],
#     ROUTING_ARGS [--shape dsv3-ep8 --parts layer --m 1,4 --dtype fp8 --variants moe_fusion --sets 32].
#     Writes routing_seeds.md
#   BY_HITS_S [0]: seconds for benchmarks/gpu_layer_by_hits.py (the expert-parallel layer timed by local experts
#     hit, weighted by the expected routing's shares: the issue-6 dsv3-ep8 figures), 0 skips it; BY_HITS_ARGS
#     [--shape dsv3-ep8 --dtype fp8 --m 1,4 --seeds 0,1 --rounds 3]. Writes by_hits.{json,md}, the shares from 1000
#     routers (re-run --summarize on the CPU for the default 4000)
#   STREAM_PROBE_S [0]: seconds for benchmarks/gpu_stream_probe.py (one fp8 expert's GEMM1 weights
#     streamed in GEMM1's pattern without arithmetic, with dots, and GEMM1 itself), 0 skips it.
#     Writes stream_probe.json
#   EXPERTS_S [0]: seconds for benchmarks/gpu_experts.py (expert block: checks at real shapes, bench with
#     both launch modes), 0 skips it; EXPERTS_ARGS [--check --bench --shapes dsv3-ep8,dsv3]. Writes
#     experts.log, experts_bench.json
#   RELIABILITY_S [0]: seconds for benchmarks/gpu_reliability.py (compute-sanitizer over every kernel,
#     10k CUDA-graph replays of the dsv3 layer), 0 skips it; RELIABILITY_ARGS: extra flags (e.g.
#     "--replays 2000"). Writes reliability.{json,log}, sanitizer.log
#   (both log to bench.log; with BENCH_SHAPES and BENCH_FP8_SHAPES empty no bench runs)
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
SHAPES=${BENCH_SHAPES-dsv3,dsv3-ep8,qwen3-30b-a3b,mixtral}
PARTS=${BENCH_PARTS-preamble,experts,layer}
MS=${BENCH_M-1,2,4,8,16,32,64}
VARIANTS=${BENCH_VARIANTS-eager,inductor,moe_fusion}
FP8_SHAPES=${BENCH_FP8_SHAPES-dsv3}
FP8_PARTS=${BENCH_FP8_PARTS-experts}
EXTRA=${BENCH_ARGS-}
BUDGET=${RUN_BUDGET_S:-510}
FP8_SHARE=${BENCH_FP8_SHARE_S:-100}  # seconds kept back for the fp8 pass
MERGE_RESERVE=25                     # seconds kept back for merging and plotting

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//')
TAG="$(date -u +%Y-%m-%d)_${GPU:-gpu}"
PARTIAL=$(mktemp -d)

echo "== versions"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
$PY -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", triton.__version__, "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'

if [ "${RUN_GPU_TESTS:-1}" = 1 ]; then
  echo "== GPU tests (log: $OUT/gpu_tests.log)"
  WORKERS=${GPU_TEST_WORKERS:-3}
  XDIST=""
  [ "$WORKERS" -gt 0 ] && $PY -c "import xdist" 2>/dev/null && XDIST="-n $WORKERS"
  timeout -k 10 ${GPU_TESTS_S:-$(( $(left) / 3 ))} $PY -m pytest -v -m gpu $XDIST ${GPU_TESTS:-tests/} -p no:cacheprovider \
    >"$OUT/gpu_tests.log" 2>&1
  echo "pytest exit code $?"
  tail -n 15 "$OUT/gpu_tests.log"
fi

RANDOM_S=${RANDOM_S:-0}
if [ "$RANDOM_S" -gt 0 ]; then
  # One pytest process per family, all at once: the run is bound by Triton compiles on the host
  # (a new spec is a new specialisation), which a single process does one at a time.
  echo "== randomized differential tests x${MOE_FUSION_RANDOM_SCALE:-20}, families in parallel (up to ${RANDOM_S} s, log: $OUT/random_tests.log)"
  RDIR=$(mktemp -d)
  for fam in ${RANDOM_FAMILIES:-bad_inputs random_routing_kernel random_align_kernel random_fused_preamble random_expert_block random_layer}; do
    MOE_FUSION_RANDOM_SCALE=${MOE_FUSION_RANDOM_SCALE:-20} timeout -k 10 "$RANDOM_S" $PY -m pytest -v -p no:cacheprovider \
      tests/test_bad_inputs.py tests/test_random_preamble.py tests/test_random_experts.py -k "$fam" >"$RDIR/$fam.log" 2>&1 &
  done
  wait
  for log in "$RDIR"/*.log; do
    echo "$(basename "$log" .log): PASSED $(grep -c ' PASSED' "$log") FAILED $(grep -c ' FAILED' "$log") | $(tail -n 1 "$log")"
  done | tee "$OUT/random_summary.txt"
  cat "$RDIR"/*.log >"$OUT/random_tests.log"
  grep -E ' FAILED|^E  ' "$OUT/random_tests.log" | head -n 20
fi

bench() {  # bench SECONDS ARGS...: one bench call, cut at SECONDS, logged to bench.log
  local seconds=$1; shift
  echo "== moe-fusion bench $* (up to ${seconds} s)" | tee -a "$OUT/bench.log"
  timeout -k 10 "$seconds" $PY -m moe_fusion.tools.bench "$@" $EXTRA >>"$OUT/bench.log" 2>&1
  local rc=$?
  echo "exit code $rc$( [ $rc = 124 ] && echo ' (cut at its time limit: partial results kept)')" | tee -a "$OUT/bench.log"
  grep -E '^\[ *[0-9]+\].*(failed|skipped)' "$OUT/bench.log" | tail -n 5
}

E2E_S=${E2E_S:-0}
if [ "$E2E_S" -gt 0 ]; then
  echo "== e2e decode (up to ${E2E_S} s, log: $OUT/e2e.log)"
  timeout -k 10 "$E2E_S" $PY benchmarks/e2e_decode.py ${E2E_ARGS:---config real --layers 2 --batch 1,4,16} \
    --json "$OUT/e2e.json" 2>"$OUT/e2e.log" | tee "$OUT/e2e.md"
  tail -n 5 "$OUT/e2e.log"
fi

ROUTING_S=${ROUTING_S:-0}
if [ "$ROUTING_S" -gt 0 ]; then
  echo "== expert-parallel layer over router seeds (up to ${ROUTING_S} s): $OUT/routing_seeds.md" | tee -a "$OUT/bench.log"
  RSDIR=$(mktemp -d)
  ROUTING_END=$(( $(date +%s) + ROUTING_S ))
  for seed in ${ROUTING_SEEDS:-0 1 2 3 4 5 6 7}; do
    [ $(( ROUTING_END - $(date +%s) )) -gt 30 ] || break
    timeout -k 10 $(( ROUTING_END - $(date +%s) - 20 )) $PY -m moe_fusion.tools.bench \
      ${ROUTING_ARGS:---shape dsv3-ep8 --parts layer --m 1,4 --dtype fp8 --variants moe_fusion --sets 32} \
      --seed "$seed" --json "$RSDIR/seed$seed.json" >>"$OUT/bench.log" 2>&1
  done
  ls "$RSDIR"/seed*.json >/dev/null 2>&1 && $PY benchmarks/routing_seeds.py "$RSDIR"/seed*.json --markdown "$OUT/routing_seeds.md"
fi

BY_HITS_S=${BY_HITS_S:-0}
if [ "$BY_HITS_S" -gt 0 ]; then
  echo "== expert-parallel layer by local experts hit (up to ${BY_HITS_S} s): $OUT/by_hits.md" | tee -a "$OUT/bench.log"
  timeout -k 10 "$BY_HITS_S" $PY benchmarks/gpu_layer_by_hits.py --out "$OUT" \
    ${BY_HITS_ARGS:---shape dsv3-ep8 --dtype fp8 --m 1,4 --seeds 0,1 --rounds 3} >>"$OUT/bench.log" 2>&1
  echo "exit code $?"
  [ -s "$OUT/by_hits.json" ] && $PY benchmarks/gpu_layer_by_hits.py --summarize "$OUT/by_hits.json" --routers 1000 \
    --markdown "$OUT/by_hits.md"
fi

STREAM_PROBE_S=${STREAM_PROBE_S:-0}
if [ "$STREAM_PROBE_S" -gt 0 ]; then
  echo "== weight-stream probe (up to ${STREAM_PROBE_S} s): $OUT/stream_probe.json" | tee -a "$OUT/bench.log"
  timeout -k 10 "$STREAM_PROBE_S" $PY benchmarks/gpu_stream_probe.py --json "$OUT/stream_probe.json" 2>&1 | tee -a "$OUT/bench.log"
fi
OVERLAP_S=${OVERLAP_S:-0}
if [ "$OVERLAP_S" -gt 0 ]; then
  echo "== shared-expert overlap (up to ${OVERLAP_S} s): $OUT/overlap.{md,json}, overlap_trace.json" | tee -a "$OUT/bench.log"
  timeout -k 10 "$OVERLAP_S" $PY benchmarks/gpu_overlap.py --out "$OUT" ${OVERLAP_ARGS:-} >>"$OUT/bench.log" 2>&1
  echo "exit code $?"
  [ -s "$OUT/overlap.md" ] && sed -n '3,20p' "$OUT/overlap.md" | grep '^|'
fi

EXPERTS_S=${EXPERTS_S:-0}
if [ "$EXPERTS_S" -gt 0 ]; then
  echo "== expert block (up to ${EXPERTS_S} s): $OUT/experts.log, experts_bench.json"
  timeout -k 10 "$EXPERTS_S" $PY benchmarks/gpu_experts.py ${EXPERTS_ARGS:---check --bench --shapes dsv3-ep8,dsv3} \
    --out "$OUT" >"$OUT/experts.log" 2>&1
  echo "exit code $?"
  grep -E 'FAIL|^checks:' "$OUT/experts.log" | head -n 20
  sed -n '/^== expert block/,$p' "$OUT/experts.log"
fi

RELIABILITY_S=${RELIABILITY_S:-0}
if [ "$RELIABILITY_S" -gt 0 ]; then
  echo "== reliability (up to ${RELIABILITY_S} s): $OUT/reliability.{json,log}, sanitizer.log" | tee -a "$OUT/bench.log"
  timeout -k 10 "$RELIABILITY_S" $PY benchmarks/gpu_reliability.py --out "$OUT" --budget-s $(( RELIABILITY_S - 20 )) \
    ${RELIABILITY_ARGS:-} >>"$OUT/bench.log" 2>&1
  echo "exit code $?"
  [ -s "$OUT/reliability.log" ] && sed -n '/^summary:/,$p' "$OUT/reliability.log"
fi

if [ -z "$SHAPES$FP8_SHAPES" ]; then
  echo "(no bench requested; total $(( $(date +%s) - START )) s)"; exit 0
fi
JSONS=""
if [ -n "$SHAPES" ]; then
  T=$(( $(left) - MERGE_RESERVE - ( ${#FP8_SHAPES} > 0 ? FP8_SHARE : 0 ) ))
  bench "$T" --shape "$SHAPES" --parts "$PARTS" --m "$MS" --dtype bf16 --variants "$VARIANTS" --json "$PARTIAL/bf16.json"
  [ -s "$PARTIAL/bf16.json" ] && JSONS="$PARTIAL/bf16.json"
fi
if [ -n "$FP8_SHAPES" ] && [ -n "$FP8_PARTS" ]; then
  T=$(( $(left) - MERGE_RESERVE ))
  bench "$T" --shape "$FP8_SHAPES" --parts "$FP8_PARTS" --m "$MS" --dtype fp8 --variants "$VARIANTS" --json "$PARTIAL/fp8.json"
  [ -s "$PARTIAL/fp8.json" ] && JSONS="${JSONS:+$JSONS,}$PARTIAL/fp8.json"
fi

if [ -z "$JSONS" ]; then
  echo "no bench results: see $OUT/bench.log"; tail -n 30 "$OUT/bench.log"; exit 1
fi
echo "== results: $OUT/$TAG.{json,md,txt,png}"
$PY -m moe_fusion.tools.bench --from-json "$JSONS" --json "$OUT/$TAG.json" --markdown "$OUT/$TAG.md" \
  --plot "$OUT/$TAG.png" --summary-m 1,8,64 >"$OUT/$TAG.txt" 2>>"$OUT/bench.log"
# The full table is in $TAG.txt; the compact summary (its tail) goes last.
sed -n '/^summary:/,$p' "$OUT/$TAG.txt"
echo "(total $(( $(date +%s) - START )) s)"
