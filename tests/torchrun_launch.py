"""Start a command under torchrun (gloo, this machine) from a test, and fail the test in one
message if it does not end cleanly: shared by the distributed tests, whose workers are either
a test file run as a script or `python -m secateur`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest


def torchrun(ranks: int, target: list[str], timeout_s: float) -> None:
    """Run `torchrun --standalone --nproc_per_node ranks *target` with one thread per rank (the
    references run with one too: a BLAS may round differently with another thread count)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *target]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    # Own session: on a timeout the launcher and its workers are killed together.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        log, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"the {ranks} ranks did not finish in {timeout_s} s:\n{log[-4000:]}")
    assert process.returncode == 0, log[-4000:]
