"""The benchmark's CPU readings: a process's main thread apart from its other threads."""

from __future__ import annotations

import os
import threading
import time

from tests.bench.procs import cpu_seconds, main_threads_cpu


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_the_main_thread_reading_leaves_out_the_other_threads() -> None:
    pid = os.getpid()
    main_before, all_before = main_threads_cpu([pid]), cpu_seconds([pid])
    worker = threading.Thread(target=_spin, args=(0.6,))
    worker.start()
    worker.join()
    main_spent = main_threads_cpu([pid]) - main_before
    all_spent = cpu_seconds([pid]) - all_before
    assert all_spent >= 0.3  # the other thread's CPU counts for the process
    assert main_spent < all_spent / 2  # but not for its main thread
