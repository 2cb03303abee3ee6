import pytest
import torch

import fused_opt


def pytest_report_header(config):
    return f"torch {torch.__version__}; fused_opt backends: {fused_opt.available_backends()}"


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # Tests choose backends explicitly; an override in the environment would silently change them.
    monkeypatch.delenv("FUSED_OPT_BACKEND", raising=False)
    yield


