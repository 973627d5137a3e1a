import pytest
import torch

from fxcompress.zoo import ZOO

# One thread: on small shared machines, torch's thread pool makes tiny models many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(params=sorted(ZOO))
def zoo_model(request):
    """(name, model in eval mode, example inputs) for every model of the shared zoo."""
    make_model, make_input = ZOO[request.param]
    return request.param, make_model().eval(), (make_input(),)
