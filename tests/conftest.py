import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from zoo import ZOO

# One thread: on small shared machines, torch's thread pool makes tiny models many times slower.
torch.set_num_threads(1)

# Generated tests (hostile files, random architectures) run a bounded number of examples in CI;
# FXCOMPRESS_LONG=1 selects the long mode (many more examples, no time limit per example).
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LONG = os.environ.get("FXCOMPRESS_LONG", "") not in ("", "0")
settings.load_profile("long" if LONG else "ci")

# compile() recomputes every analysis a pass reports preserved and fails if it differs.
os.environ.setdefault("FXCOMPRESS_CHECK_ANALYSES", "1")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(params=sorted(ZOO))
def zoo_model(request):
    """(name, model in eval mode, example inputs) for every model of the shared zoo."""
    make_model, make_input = ZOO[request.param]
    return request.param, make_model().eval(), (make_input(),)
