import torch

# Ranks are forked from this process: keep its thread pool at one so forks stay safe and cores are shared fairly.
torch.set_num_threads(1)


import pytest  # noqa: E402

from plait.data.corpus import stdlib_files  # noqa: E402


@pytest.fixture(scope="session")
def small_corpus() -> list[str]:
    """Forty standard-library modules: enough text for a 512-token BPE in about a second."""
    return [str(path) for path in stdlib_files()[:40]]
