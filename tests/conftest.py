import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before they
# are defined (fused_opt imports them lazily, after this).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_opt  # noqa: E402


def pytest_report_header(config):
    return f"torch {torch.__version__}; fused_opt backends: {fused_opt.available_backends()}"


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # Tests choose backends explicitly; an override in the environment would silently change them.
    monkeypatch.delenv("FUSED_OPT_BACKEND", raising=False)
    yield


