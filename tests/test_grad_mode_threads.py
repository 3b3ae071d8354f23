"""Issue 13, item 1: the grad mode is per thread, as PyTorch's (a Dask worker with two threads ran a sweep in
which one thread's no_grad() switched the other's gradients off)."""
import threading

import numpy as np

import fastgrad as fg
from fastgrad.core import TensorNode


def test_no_grad_in_one_thread_leaves_the_others_alone():
    inside, leave = threading.Event(), threading.Event()
    seen = {}

    def evaluate():
        with fg.no_grad():
            seen['inside'] = fg.is_grad_enabled()
            inside.set()
            leave.wait()
        seen['after'] = fg.is_grad_enabled()

    t = threading.Thread(target=evaluate)
    t.start()
    inside.wait()
    try:
        assert fg.is_grad_enabled()
        w = TensorNode(np.ones(2))
        (w * 2.0).sum().backward()
        np.testing.assert_array_equal(w.grad, [2.0, 2.0])
    finally:
        leave.set()
        t.join()
    assert seen == {'inside': False, 'after': True}


def test_overlapping_no_grad_blocks_in_two_threads_restore_each_threads_mode():
    """Thread A enters, B enters, A leaves, B leaves: with one process-wide flag A restored 'on', then B
    restored A's 'off' and gradients stayed off for good."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with fg.no_grad():
            a_in.set()
            b_in.wait()
        a_out.set()

    def b():
        a_in.wait()
        with fg.no_grad():
            b_in.set()
            a_out.wait()

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fg.is_grad_enabled()
    results = []
    t = threading.Thread(target=lambda: results.append(fg.is_grad_enabled()))
    t.start()
    t.join()
    assert results == [True]  # a new thread starts with gradients on, as in PyTorch
