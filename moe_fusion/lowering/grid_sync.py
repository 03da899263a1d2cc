"""Counters in global memory through which the programs of one launch wait for each other, and
the launch option that makes a launch a programmatic dependent of the one before it.

A producer program counts itself done with a release after a CTA barrier (every thread's
stores are issued before the one atomic that publishes them); a consumer spins on an acquire
read until the count is reached. Data published this way must be read with ``.cg`` loads (L2,
never a stale L1 line) or volatile loads.

Waiting is only safe when every program waited for is already running or finished: the
kernels guarantee it by putting waiters after producers in the grid (the GPU dispatches
programs in id order). The Triton interpreter runs programs one after another in id order,
so it finds every counter complete.
"""
import triton
import triton.language as tl


@triton.jit
def count_done(counter_ptr):
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release")


@triton.jit
def wait_until(counter_ptr, target):
    done = tl.atomic_add(counter_ptr, 0, sem="acquire")
    while done < target:
        done = tl.atomic_add(counter_ptr, 0, sem="acquire")


@triton.jit
def wait_then_release_dependents():
    """In a programmatic dependent launch: wait until the kernel before it has finished and its
    writes are visible, and only then let the next launch be placed, so that the next one never
    holds SM slots while the kernel before this one still runs."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


def pdl_launch(pdl: bool) -> dict:
    """Keyword arguments of a Triton launch: with ``pdl`` a programmatic dependent launch (CUDA):
    scheduled once the previous kernel in the stream lets it (griddepcontrol.launch_dependents),
    it must griddepcontrol.wait before reading that kernel's outputs."""
    return {"launch_pdl": True} if pdl else {}
