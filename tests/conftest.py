"""Test set-up: 8 fake CPU devices, f32 matmuls at full precision, a shared compilation cache."""

import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests compile the same programs (smoke steps, initialisers) in separate processes (xdist
# workers, CLI subprocesses): one on-disk cache, keyed by the program and the jax version, compiles
# each once. A fresh clone starts empty; the cache never changes what a program computes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_REPO, ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Non-partitionable threefry compiles random initialisers several times faster on CPU; the tests
# compare results within one process, so the bit pattern of the draws does not matter.
jax.config.update("jax_threefry_partitionable", False)
