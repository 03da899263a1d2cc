"""benchmarks/gpu_reliability.py and kernel_driver.py at their smallest, on whatever device there is
(the Triton interpreter on the CPU), so the GPU scripts cannot rot between GPU runs; and the
sanitizer-log verdicts on logs written the way compute-sanitizer writes them."""
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import gpu_reliability  # noqa: E402
import kernel_driver  # noqa: E402


def test_driver_runs_every_case_and_launches_every_kernel(capsys):
    """The whole driver (about 35 s on the interpreter): every case matches its reference and every
    kernel of KERNELS is launched, as the sanitizer run on the GPU needs."""
    assert kernel_driver.main([]) == 0
    assert f"DRIVER OK {len(kernel_driver.CASES)} cases" in capsys.readouterr().out


def test_driver_fails_on_a_failing_case_or_a_kernel_never_launched(monkeypatch, capsys):
    def broken(device, dtype):
        raise AssertionError("wrong result")

    monkeypatch.setattr(kernel_driver, "CASES", [kernel_driver.Case("broken", broken)])
    assert kernel_driver.main([]) == 1
    out = capsys.readouterr().out
    assert "DRIVER FAILED" in out and "broken" in out and "_norm_quant_kernel" in out


def test_replays_smoke(tmp_path):
    assert gpu_reliability.main(["--smoke", "--out", str(tmp_path), "--replays", "4", "--phases", "2"]) == 0
    log = (tmp_path / "reliability.log").read_text()
    assert log.strip().splitlines()[-1] == "ALL CHECKS PASSED"
    assert (tmp_path / "reliability.json").exists()


MEMCHECK_CLEAN = """========= COMPUTE-SANITIZER
[case] layer M=1 atomic: ok
DRIVER OK 8 cases; launches: expert_gemm1_kernel x8
========= ERROR SUMMARY: 0 errors
"""
MEMCHECK_ERRORS = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 2 bytes
=========     at expert_gemm2_kernel+0x1a30
=========     by thread (3,0,0) in block (7,0,0)
DRIVER OK 8 cases
========= ERROR SUMMARY: 3 errors
"""
RACECHECK = """========= COMPUTE-SANITIZER
DRIVER OK 8 cases
========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)
"""


def _verdict(tool, text, code=0):
    return gpu_reliability.sanitizer_verdict(tool, gpu_reliability.parse_sanitizer_log(tool, text), code)


def test_sanitizer_verdicts():
    assert _verdict("memcheck", MEMCHECK_CLEAN) is None
    assert _verdict("memcheck", MEMCHECK_ERRORS) == "3 errors"
    parsed = gpu_reliability.parse_sanitizer_log("memcheck", MEMCHECK_ERRORS)
    assert parsed["reports_in_project_kernels"] == {"expert_gemm2_kernel": 1} and parsed["reports_elsewhere"] == {}
    assert _verdict("racecheck", RACECHECK) == "1 errors"
    assert _verdict("memcheck", MEMCHECK_CLEAN.replace("ERROR SUMMARY: 0 errors", "")).startswith("no summary")
    assert _verdict("memcheck", MEMCHECK_CLEAN, code=1).startswith("the driver failed")
    assert _verdict("memcheck", MEMCHECK_CLEAN.replace("DRIVER OK", "DRIVER FAILED")).startswith("the driver failed")
    assert _verdict("memcheck", MEMCHECK_CLEAN, code=None) == "timed out"


def _initcheck_log(*kernels):
    reports = "".join(f"========= Uninitialized __global__ memory read of size 2 bytes\n=========     at {k}+0xeb0\n"
                      f"=========     by thread (64,0,0) in block (0,0,0)\n" for k in kernels)
    return f"========= COMPUTE-SANITIZER\n{reports}DRIVER OK 8 cases\n========= ERROR SUMMARY: 3 errors\n"


def test_initcheck_passes_only_when_every_report_is_in_another_library():
    silu = "void at::native::vectorized_elementwise_kernel<(int)8, silu_kernel>(int, T2, T3)"
    assert _verdict("initcheck", _initcheck_log(silu, silu, silu)) is None
    assert _verdict("initcheck", _initcheck_log(silu, silu, "_norm_quant_kernel")) == "3 errors"
    assert _verdict("initcheck", _initcheck_log(silu, silu)) == "3 errors"  # one report not printed
    assert _verdict("memcheck", _initcheck_log(silu, silu, silu)) == "3 errors"


@pytest.mark.parametrize("part", ["normed", "experts_alone"])
def test_deterministic_verdict_fails_on_a_part_that_changes(part, monkeypatch, tmp_path):
    """A replay that changes a part deterministic mode promises bitwise must fail the script."""
    real_new_phase = gpu_reliability.ReplayChecker.new_phase

    def new_phase(self, outputs):
        real_new_phase(self, outputs)
        if part in self.first:
            self.first[part].view(-1)[0] += 1  # the replays now differ from "the first"

    monkeypatch.setattr(gpu_reliability.ReplayChecker, "new_phase", new_phase)
    assert gpu_reliability.main(["--smoke", "--out", str(tmp_path), "--replays", "4", "--phases", "2"]) == 1
    assert f"{part}: " in (tmp_path / "reliability.log").read_text()
