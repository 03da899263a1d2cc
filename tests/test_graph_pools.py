"""moe_fusion/lowering/graph_pools.py: the thread that makes tensors kept across calls. What it is for (a
reduce-overhead warm-up's pool) is tested on the GPU in tests/test_layer.py
(test_constants_first_made_in_a_graph_warmup_stay_out_of_its_pool)."""
import threading

import pytest
import torch

from moe_fusion.lowering.graph_pools import made_outside_graph_pools, on_own_thread


def test_runs_on_another_thread_and_hands_back_its_result():
    caller = threading.get_ident()
    assert on_own_thread(lambda: threading.get_ident()) != caller
    t = on_own_thread(lambda: torch.arange(5))
    assert torch.equal(t, torch.arange(5))


def test_hands_back_its_exception():
    def fails():
        raise ValueError("made on the other thread")

    with pytest.raises(ValueError, match="other thread"):
        on_own_thread(fails)


def test_inline_off_cuda():
    caller = threading.get_ident()
    assert made_outside_graph_pools(lambda: threading.get_ident(), torch.device("cpu")) == caller
