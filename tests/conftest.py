import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Every test that takes `device` runs on the CPU and, when present, CUDA."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def needs_compile():
    """Skips a test where torch.compile cannot run (no C++ compiler)."""
    try:
        torch.compile(lambda t: t + 1)(torch.ones(2))
    except Exception as err:  # noqa: BLE001 - any failure: no compile here
        pytest.skip(f"torch.compile fails here: {type(err).__name__}: {err}")
