"""Test-session settings.

The test models are tiny (tens to hundreds of parameters), so one intra-op thread is as fast
as two, and it is immune to oversubscription: on this 2-core machine under load, two torch
threads made each tiny Hessian product 20x slower (92 ms against 4 ms, measured).
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_leaked_flush_to_zero():
    """The command line flushes float subnormals to zero for its own process; under CliRunner
    that process is the test run, so undo it after each test (hypothesis refuses to run with
    flush-to-zero on, and no test should depend on an earlier one's setting)."""
    yield
    torch.set_flush_denormal(False)
