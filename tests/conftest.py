"""Test-session settings.

The test models are tiny (tens to hundreds of parameters), so one intra-op thread is as fast
as two, and it is immune to oversubscription: on this 2-core machine under load, two torch
threads made each tiny Hessian product 20x slower (92 ms against 4 ms, measured).
"""

import torch

torch.set_num_threads(1)
