import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no graph of an earlier test is reused."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
