import pytest
import torch

from slimlm.testing import save_tiny_model

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """Return a function family -> path of a saved tiny random model folder (built once per family)."""
    cache = {}

    def make(family: str = "llama", **kwargs):
        key = (family, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = save_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family, **kwargs)
        return cache[key]

    return make


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
