"""Test set-up: 8 fake CPU devices, f32 matmuls at full precision."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Non-partitionable threefry compiles random initialisers several times faster on CPU; the tests
# compare results within one process, so the bit pattern of the draws does not matter.
jax.config.update("jax_threefry_partitionable", False)
