"""GPU reliability of the kernels (issue 8): the sanitizers over every kernel, and long CUDA-graph
replay of the real dsv3 layer.

    python benchmarks/gpu_reliability.py --out DIR [--replays 10000] [--tools memcheck,racecheck,...]
                                         [--budget-s 230] [--skip-replays] [--skip-sanitizer] [--smoke]

1. Replays: the dsv3 layer (H 7168, E 256, top-8, I 2048, one shared expert, bf16) at M tokens is
   captured in a CUDA graph, shared expert on the side stream, once deterministic and once with
   atomics, and replayed --replays times in --phases phases. Each phase refreshes the input in place,
   replays once, checks that replay against the float64 expected output (the routing it chose) and
   the preamble against the reference, then compares every further replay with that first one, part
   by part (preamble outputs, routed experts, shared expert, output), inside a second CUDA graph so
   the replays never wait for the host. The expert block alone is also replayed on the phase's fixed
   routing. torch.cuda.memory_allocated/reserved after the first phase and at the end must be equal.
   Verdicts: deterministic mode promises bitwise replays of every part (its router has no split-K
   atomics, its expert block reduces in a fixed order); atomic mode only that each part stays
   within ATOL_REL of the first replay.
2. Sanitizers: benchmarks/kernel_driver.py (every Triton kernel, small shapes, checked against the
   reference) runs once plainly, which fills Triton's cache, then under compute-sanitizer with each
   tool, PyTorch's caching allocator off so every tensor is its own allocation (memcheck and
   initcheck then see tensor bounds, not the allocator's blocks). CUDA API errors are not reported
   (--report-api-errors no): the library probes return codes on purpose, and our launches fail
   loudly in Python anyway. A tool passes when its summary says 0 errors, the driver exited 0 and
   printed "DRIVER OK".

Writes DIR/reliability.json, DIR/reliability.log (this script's output) and DIR/sanitizer.log (the
driver's plain run and each tool's output); the summary is printed last. Exit status 1 when any
check failed or a requested tool did not run. --smoke: a tiny layer, eager calls instead of graphs,
through the Triton interpreter where there is no GPU, and no sanitizer (it needs a GPU).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

if not torch.cuda.is_available():  # before the kernel modules are imported (triton.jit reads it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, os.path.join(ROOT, "tests"), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import triton  # noqa: E402

from layer_cases import expected_output, layer_options, layer_weights, recorded_parts, rel_err  # noqa: E402
from moe_fusion.lowering import experts, layer, preamble  # noqa: E402
from moe_fusion.spec import MoESpec, MoEWeights  # noqa: E402
from moe_fusion.tools.bench_layers import SHAPES  # noqa: E402
from kernel_driver import KERNELS  # noqa: E402
from preamble_checks import check_preamble  # noqa: E402

DRIVER = os.path.join(HERE, "kernel_driver.py")
TOOLS = ("memcheck", "initcheck", "synccheck", "racecheck")  # racecheck, the slowest, gets what is left
EXPECTED_TOL = {"bfloat16": 1e-2, "float16": 2e-3}  # vs float64, as tests/test_layer.py
ATOL_REL = 1e-2  # largest normwise change of a float part between replays of one input
DETERMINISTIC_PARTS = ("normed", "x_fp8", "x_scale", "topk_ids", "topk_weights", "sorted_pair_ids", "tile_expert",
                       "num_tiles", "routed", "shared", "output", "experts_alone")  # bitwise in deterministic mode
SANITIZER_LOG_LINES = 120  # per tool: the head and tail kept in sanitizer.log

_log_path: Optional[str] = None


def log(message: str) -> None:
    print(message, flush=True)
    if _log_path:
        with open(_log_path, "a") as f:
            f.write(message + "\n")


# ----------------------------------------------------------------------------- graphs or calls
class Captured:
    """fn() -> {name: tensor} as a replayable step: a CUDA graph whose outputs are static tensors
    on the GPU; on the CPU (smoke) a plain call whose results are copied into static tensors."""

    def __init__(self, fn: Callable[[], Dict[str, torch.Tensor]], device: torch.device):
        if device.type != "cuda":
            self.outputs = {k: v.clone() for k, v in fn().items()}
            self._fn = fn
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: compiles, cuBLAS workspaces, side stream
            fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn()

    def replay(self) -> None:
        if hasattr(self, "graph"):
            self.graph.replay()
        else:
            for k, v in self._fn().items():
                self.outputs[k].copy_(v)


def layer_step(spec: MoESpec, x: torch.Tensor, w: MoEWeights) -> Callable[[], Dict[str, torch.Tensor]]:
    """One layer.moe_layer call, returning its parts (layer_cases.recorded_parts) and output."""
    def step():
        with recorded_parts() as parts:
            out = layer.moe_layer(spec, x, w)
        pre = parts["preamble"]
        named = dict(normed=pre.normed, topk_ids=pre.topk_ids, topk_weights=pre.topk_weights,
                     sorted_pair_ids=pre.sorted_pair_ids, tile_expert=pre.tile_expert, num_tiles=pre.num_tiles,
                     routed=parts["routed"], shared=parts["shared"], output=out)
        if spec.fp8:  # compared as bytes: torch has no != for e4m3
            named.update(x_fp8=pre.x_fp8.view(torch.uint8), x_scale=pre.x_scale)
        return named
    return step


def experts_step(spec: MoESpec, w: MoEWeights, fixed: Dict[str, torch.Tensor], deterministic: bool, config):
    """The expert block alone on fixed routing (static copies of a layer replay's preamble outputs)."""
    def step():
        quantized = {}
        if spec.fp8:
            quantized = dict(x_fp8=fixed["x_fp8"].view(torch.float8_e4m3fn), x_scale=fixed["x_scale"])
        out = experts.fused_experts(
            spec, fixed["normed"], fixed["topk_ids"], fixed["topk_weights"], w, **quantized,
            alignment=(fixed["sorted_pair_ids"], fixed["tile_expert"], fixed["num_tiles"]),
            deterministic=deterministic, config=config)
        return {"experts_alone": out}
    return step


class ReplayChecker:
    """Per part: how many replays differed from the phase's first (any element not bitwise equal)
    and the largest normwise relative change of a float part; captured like the layer, so the
    comparisons run on the device between replays without a host round trip."""

    def __init__(self, outputs: Dict[str, torch.Tensor], device: torch.device):
        self.names = list(outputs)
        self.first = {k: v.clone() for k, v in outputs.items()}
        self.differing = torch.zeros(len(self.names), dtype=torch.int64, device=device)
        self.max_change = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self.compare = Captured(lambda: self._compare(outputs), device)

    def _compare(self, outputs) -> Dict[str, torch.Tensor]:
        for i, name in enumerate(self.names):
            now, first = outputs[name], self.first[name]
            self.differing[i] += (now != first).any()  # NaN != NaN: a NaN counts as a difference
            if now.is_floating_point():
                change = (now.double() - first.double()).norm() / first.double().norm().clamp(min=1e-300)
                self.max_change[i] = torch.maximum(self.max_change[i], change)
        return {}

    def new_phase(self, outputs: Dict[str, torch.Tensor]) -> None:
        for name in self.names:
            self.first[name].copy_(outputs[name])

    def summary(self, compared: int) -> Dict[str, dict]:
        differing, change = self.differing.tolist(), self.max_change.tolist()
        return {name: dict(replays_compared=compared, replays_differing=differing[i],
                           bitwise=differing[i] == 0, max_rel_change=change[i])
                for i, name in enumerate(self.names)}


def memory() -> Dict[str, int]:
    if not torch.cuda.is_available():
        return dict(allocated=0, reserved=0)
    torch.cuda.synchronize()
    return dict(allocated=torch.cuda.memory_allocated(), reserved=torch.cuda.memory_reserved())


def replay_mode(spec: MoESpec, w: MoEWeights, M: int, deterministic: bool, replays: int, phases: int,
                device: torch.device) -> dict:
    """One mode of part 1 (see the module doc); returns its record, with "failures" listing what failed.

    Every tensor the replay loop uses is made before it (inputs of all phases, the copies of each
    phase's first replay), so any change of allocated or reserved memory across it is the replays'."""
    t0 = time.time()
    g = torch.Generator(device=device).manual_seed(1234 + deterministic)
    inputs = torch.randn(phases, M, spec.hidden_size, generator=g, device=device, dtype=spec.torch_dtype)
    x = inputs[0].clone()
    shared = "stream" if device.type == "cuda" else "inline"
    plan = layer.plan_layer(spec, M, device)
    with layer_options(deterministic, shared):
        layer_graph = Captured(layer_step(spec, x, w), device)
        fixed = {k: v.clone() for k, v in layer_graph.outputs.items()}
        experts_graph = Captured(experts_step(spec, w, fixed, deterministic, plan.expert_config), device)
    layer_check = ReplayChecker(layer_graph.outputs, device)
    experts_check = ReplayChecker(experts_graph.outputs, device)
    firsts = {k: v.new_empty((phases, *v.shape)) for k, v in layer_graph.outputs.items()}
    per_phase = max(2, replays // phases)
    experts_per_phase = max(2, per_phase // 4)
    memory_before = memory()
    for phase in range(phases):
        x.copy_(inputs[phase])  # a new input at the captured address
        layer_graph.replay()
        for k, v in layer_graph.outputs.items():
            firsts[k][phase].copy_(v)
            fixed[k].copy_(v)
        layer_check.new_phase(layer_graph.outputs)
        for _ in range(per_phase - 1):
            layer_graph.replay()
            layer_check.compare.replay()
        experts_graph.replay()
        experts_check.new_phase(experts_graph.outputs)
        for _ in range(experts_per_phase - 1):
            experts_graph.replay()
            experts_check.compare.replay()
    mem = dict(before_replays=memory_before, after_replays=memory())
    replay_s = time.time() - t0
    failures: List[str] = []
    errors = []
    for phase in range(phases):
        first = {k: v[phase] for k, v in firsts.items()}
        errors.append(rel_err(first["output"], expected_output(spec, w, first["normed"], first["topk_ids"],
                                                               first["topk_weights"])))
        try:
            check_preamble(spec, inputs[phase], w, _preamble_view(first), plan.expert_config.block_m)
        except AssertionError as e:
            failures.append(f"phase {phase}: preamble differs from the reference: {e}")
    parts = layer_check.summary(phases * (per_phase - 1))
    parts.update(experts_check.summary(phases * (experts_per_phase - 1)))
    tol = EXPECTED_TOL[spec.dtype]
    if not max(errors) < tol:
        failures.append(f"output vs float64 expected: rel err {max(errors):.2e} >= {tol}")
    if mem["after_replays"] != mem["before_replays"]:
        failures.append(f"memory changed over the replays: {mem}")
    for name, p in parts.items():
        if deterministic and name in DETERMINISTIC_PARTS and not p["bitwise"]:
            failures.append(f"{name}: {p['replays_differing']} of {p['replays_compared']} replays not bitwise equal")
        if not p["max_rel_change"] <= ATOL_REL:  # also catches NaN
            failures.append(f"{name}: changed by {p['max_rel_change']:.2e} (relative) between replays of one input")
    return dict(deterministic=deterministic, M=M, shared_expert=shared, graphs=device.type == "cuda",
                layer_replays=phases * per_phase, experts_alone_replays=phases * experts_per_phase, phases=phases,
                rel_err_vs_float64=errors, expected_tol=tol, memory=mem, parts=parts, failures=failures,
                replay_seconds=round(replay_s, 1), seconds=round(time.time() - t0, 1))


def _preamble_view(out: Dict[str, torch.Tensor]) -> preamble.PreambleOut:
    empty = out["normed"].new_empty((0,))
    return preamble.PreambleOut(out["normed"], out["x_fp8"].view(torch.float8_e4m3fn) if "x_fp8" in out else empty,
                                out.get("x_scale", empty), out["topk_ids"], out["topk_weights"],
                                out["sorted_pair_ids"], out["tile_expert"], out["num_tiles"])


def run_replays(args, device: torch.device) -> dict:
    spec = SHAPES["tiny"] if args.smoke else SHAPES["dsv3"]
    if device.type != "cuda":  # the interpreter's bf16 dot is wrong; fp16 stands in
        spec = spec.replace(dtype="float16")
    w = layer_weights(spec, device, seed=0)
    result = {"spec": spec.to_json(), "modes": {}}
    for deterministic in (True, False):
        mode = "deterministic" if deterministic else "atomic"
        r = replay_mode(spec, w, args.m, deterministic, args.replays, args.phases, device)
        result["modes"][mode] = r
        log(f"[replays] {mode}: {r['layer_replays']} layer + {r['experts_alone_replays']} expert-block replays "
            f"in {r['seconds']} s; max rel err vs float64 {max(r['rel_err_vs_float64']):.2e}; "
            f"memory {r['memory']['after_replays']}; failures: {r['failures'] or 'none'}")
        for name, p in r["parts"].items():
            log(f"    {name:16s} bitwise {str(p['bitwise']):5s} differing {p['replays_differing']:6d}/"
                f"{p['replays_compared']:<6d} max rel change {p['max_rel_change']:.2e}")
    return result


# ----------------------------------------------------------------------------- sanitizers
def parse_sanitizer_log(tool: str, text: str) -> dict:
    """Error and warning counts from compute-sanitizer's summary lines (racecheck has its own), and
    the reports per kernel (the "at KERNEL+0xOFFSET" line each report starts with), split into the
    project's kernels (kernel_driver.KERNELS) and the others (PyTorch's, cuBLAS's)."""
    races = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    summaries = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) errors?", text)]
    if tool == "racecheck" and races:
        errors, warnings = sum(int(r[1]) for r in races), sum(int(r[2]) for r in races)
    else:
        errors, warnings = sum(summaries), 0
    located = collections.Counter(re.sub(r"\+0x[0-9a-f]+$", "", m.strip())
                                  for m in re.findall(r"^=+\s+at (.+)$", text, re.M))
    ours = {k: n for k, n in located.items() if any(name in k for name in KERNELS)}
    return dict(summary_found=bool(races or summaries), errors=errors, warnings=warnings,
                driver_ok="DRIVER OK" in text, reports_in_project_kernels=ours,
                reports_elsewhere={k[:160]: n for k, n in located.items() if k not in ours})


def sanitizer_verdict(tool: str, parsed: dict, returncode: Optional[int]) -> Optional[str]:
    """Why the tool's run does not count as clean, or None.

    initcheck only: reports in kernels that are not the project's do not fail the run, when every
    error was printed and attributed. On the H100 initcheck flags PyTorch's SiLU/mul reading the
    output of cuBLAS's (nvjet) GEMMs in the shared expert: the values are right (the driver checks
    the layer against float64), so the GEMM's writes are ones initcheck does not track (its TMA
    stores, we believe); the project cannot change either library."""
    if returncode is None:
        return "timed out"
    if not parsed["summary_found"]:
        return "no summary line: the sanitizer did not finish"
    if returncode != 0 or not parsed["driver_ok"]:
        return f"the driver failed (exit status {returncode})"
    if not parsed["errors"]:
        return None
    attributed = sum(parsed["reports_in_project_kernels"].values()) + sum(parsed["reports_elsewhere"].values())
    if tool != "initcheck" or parsed["reports_in_project_kernels"] or attributed < parsed["errors"]:
        return f"{parsed['errors']} errors"
    return None


def sanitizer_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def _start(cmd: List[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _run(cmd: List[str], env: dict, timeout_s: float):
    return _finish(_start(cmd, env), timeout_s)


def _finish(proc: subprocess.Popen, timeout_s: float):
    """(exit status or None on timeout, output); a timed-out run's process group is ended."""
    try:
        out, _ = proc.communicate(timeout=max(timeout_s, 1))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def _trimmed(text: str) -> str:
    lines = text.splitlines()
    if len(lines) <= 2 * SANITIZER_LOG_LINES:
        return text
    return "\n".join(lines[:SANITIZER_LOG_LINES] + [f"... {len(lines) - 2 * SANITIZER_LOG_LINES} lines ..."]
                     + lines[-SANITIZER_LOG_LINES:])


def sanitizer_binary() -> Optional[str]:
    return shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)


def start_plain_driver() -> subprocess.Popen:
    """The driver without a sanitizer: it compiles every kernel into Triton's cache, which the
    instrumented runs then load (compiling under a sanitizer is slow). main starts it before the
    replays, so the compiles overlap them."""
    return _start([sys.executable, DRIVER], sanitizer_env())


def run_sanitizers(tools: List[str], out_dir: str, deadline: float, plain: subprocess.Popen) -> dict:
    env = sanitizer_env()
    sanitizer_log = os.path.join(out_dir, "sanitizer.log")
    result = {}
    t0 = time.time()
    code, text = _finish(plain, deadline - time.time())
    result["plain"] = dict(exit_status=code, driver_ok="DRIVER OK" in text, waited_s=round(time.time() - t0, 1))
    with open(sanitizer_log, "w") as f:
        f.write(f"==== plain run (warms Triton's cache): exit status {code}\n{_trimmed(text)}\n")
    log(f"[sanitizer] plain driver run: exit status {code} (waited {result['plain']['waited_s']} s for it); "
        + (text.strip().splitlines() or ["no output"])[-1][:300])
    binary = sanitizer_binary()
    for i, tool in enumerate(tools):
        left = deadline - time.time()
        if binary is None:
            result[tool] = dict(verdict="not run: compute-sanitizer not found", passed=False)
            log(f"[sanitizer] {tool}: compute-sanitizer not found")
            continue
        if left < 15:
            result[tool] = dict(verdict="not run: out of time budget", passed=False)
            log(f"[sanitizer] {tool}: not run (budget)")
            continue
        t0 = time.time()
        # Later tools keep a share of what is left, so one slow tool cannot starve the rest.
        timeout = left / (len(tools) - i) * (1.5 if i < len(tools) - 1 else 1.0)
        # Every report printed (without host backtraces), so that each is attributed to a kernel.
        cmd = [binary, "--tool", tool, "--report-api-errors", "no", "--show-backtrace", "no",
               "--print-limit", "1000000", sys.executable, DRIVER]
        code, text = _run(cmd, env, min(timeout, left))
        parsed = parse_sanitizer_log(tool, text)
        verdict = sanitizer_verdict(tool, parsed, code)
        if verdict is None and parsed["errors"]:
            label = f"clean in the project's kernels ({parsed['errors']} reports, all in other libraries' kernels)"
        else:
            label = verdict or "clean"
        result[tool] = dict(parsed, exit_status=code, passed=verdict is None, verdict=label,
                            seconds=round(time.time() - t0, 1))
        with open(sanitizer_log, "a") as f:
            f.write(f"\n==== compute-sanitizer --tool {tool}: {label}\n{_trimmed(text)}\n")
        log(f"[sanitizer] {tool}: {label} ({parsed['errors']} errors, {parsed['warnings']} warnings, "
            f"{result[tool]['seconds']} s); reports in the project's kernels: {parsed['reports_in_project_kernels']}; "
            f"elsewhere: {parsed['reports_elsewhere']}")
    return result


# ----------------------------------------------------------------------------- main
def failures_of(result: dict, tools: List[str]) -> List[str]:
    out = []
    for mode, r in result.get("replays", {}).get("modes", {}).items():
        out += [f"replays {mode}: {f}" for f in r["failures"]]
    sanitizer = result.get("sanitizer", {})
    out += [f"sanitizer {t}: {sanitizer[t]['verdict']}" for t in tools
            if t in sanitizer and not sanitizer[t]["passed"]]
    return out


def summary_lines(result: dict, tools: List[str]) -> List[str]:
    lines = ["summary:"]
    for mode, r in result.get("replays", {}).get("modes", {}).items():
        not_bitwise = [n for n, p in r["parts"].items() if not p["bitwise"]]
        lines.append(f"  {mode:13s} {r['layer_replays']} layer replays (M={r['M']}, graphs={r['graphs']}): "
                     f"rel err vs float64 <= {max(r['rel_err_vs_float64']):.1e}; not bitwise across replays: "
                     f"{', '.join(not_bitwise) or 'none'}; memory after replays {r['memory']['after_replays']} "
                     f"{'unchanged' if r['memory']['after_replays'] == r['memory']['before_replays'] else 'CHANGED'}")
    for tool in tools:
        s = result.get("sanitizer", {}).get(tool)
        if s:
            lines.append(f"  {tool:13s} {s['verdict']}")
    failures = failures_of(result, tools)
    lines.append("FAILED: " + "; ".join(failures) if failures else "ALL CHECKS PASSED")
    return lines


def main(argv=None) -> int:
    global _log_path
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument("--replays", type=int, default=10000, help="layer replays per mode")
    ap.add_argument("--phases", type=int, default=10, help="input refreshes per mode")
    ap.add_argument("--m", type=int, default=4, help="tokens per call")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--budget-s", type=float, default=230, help="wall seconds; sanitizer tools are cut to fit")
    ap.add_argument("--skip-replays", action="store_true")
    ap.add_argument("--skip-sanitizer", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny layer, few replays; no sanitizer without a GPU")
    args = ap.parse_args(argv)
    deadline = time.time() + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    _log_path = os.path.join(args.out, "reliability.log")
    open(_log_path, "w").close()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tools = [] if args.skip_sanitizer or device.type != "cuda" else [t for t in args.tools.split(",") if t]
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
                  torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command=" ".join(sys.argv))
    log(f"[reliability] {result['device']}, torch {result['torch']}, triton {result['triton']}")
    plain = start_plain_driver() if tools else None
    if not args.skip_replays:
        result["replays"] = run_replays(args, device)
        if device.type == "cuda":  # the dsv3 weights are gone; give their memory back before the sanitizers
            torch.cuda.empty_cache()
    if tools:
        result["sanitizer"] = run_sanitizers(tools, args.out, deadline, plain)
    result["failures"] = failures_of(result, tools)
    with open(os.path.join(args.out, "reliability.json"), "w") as f:
        json.dump(result, f, indent=1)
    for line in summary_lines(result, tools):
        log(line)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
