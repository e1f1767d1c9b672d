import os

import pytest
import torch

# Tests run offline: nothing may reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from hub_server import HubServer  # noqa: E402
from script_launch import HUB_TOKEN  # noqa: E402

from modeling_pvt import PvtConfig  # noqa: E402

TINY_CONFIG = dict(
    image_size=64,
    hidden_sizes=[16, 32, 40, 64],
    num_attention_heads=[1, 2, 5, 8],
    depths=[1, 1, 2, 1],
    mlp_ratios=[2, 2, 2, 2],
    num_labels=5,
)


@pytest.fixture
def tiny_config() -> PvtConfig:
    """A four-stage PVT with every feature of the real ones (reduction 8/4/2/1, several heads) at toy width."""
    return PvtConfig(**TINY_CONFIG)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def hub():
    """A test Hub for the module's tests, with the user `trainer` whose token the scripts get (`script_launch`)."""
    with HubServer() as server:
        server.state.add_token(HUB_TOKEN, "trainer")
        yield server
    assert not server.state.errors, f"the test Hub met requests it does not understand: {server.state.errors}"
