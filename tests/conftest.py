import os

import pytest
import torch


# The CPU suite compares pixels with references made on the CPU: a GPU machine running it keeps its faces there too
# (the GPU tests name their device).
os.environ.setdefault("DIFFATTN_DEVICE", "cpu")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_slow = pytest.mark.skip(reason="slow: set RUN_SLOW=1")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "slow" in item.keywords and os.environ.get("RUN_SLOW", "0") in ("0", ""):
            item.add_marker(no_slow)


@pytest.fixture(scope="session", autouse=True)
def preset_cache(tmp_path_factory):
    """A fresh preset cache per test session, so building, saving and reloading presets is what the tests run."""
    path = tmp_path_factory.mktemp("diffattn-cache")
    old = os.environ.get("DIFFATTN_CACHE")
    os.environ["DIFFATTN_CACHE"] = str(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield path
    if old is None:
        os.environ.pop("DIFFATTN_CACHE", None)
    else:
        os.environ["DIFFATTN_CACHE"] = old


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield
