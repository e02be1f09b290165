"""Test setup: 8 fake CPU devices, set before JAX initialises its backends."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run a test body in float64 (where accuracy is asserted)."""
    with jax.enable_x64(True):
        yield
