"""Registries find code by module: a new file is all a new method / evaluator / source needs."""

import sys
import textwrap

import numpy as np
import pytest

from configs import quickstart
from sslvl_jax import train
from sslvl_jax.errors import ConfigError


def _write(root, rel: str, text: str) -> None:
  path = root / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(textwrap.dedent(text))


@pytest.fixture
def plugin_root(tmp_path, monkeypatch):
  """A folder on sys.path for plugin modules the tests write; the modules are unloaded after."""
  monkeypatch.syspath_prepend(str(tmp_path))
  before = set(sys.modules)
  yield tmp_path
  for name in set(sys.modules) - before:
    if name.startswith(("toyplugins", "toy_")):
      del sys.modules[name]


def test_a_package_registry_finds_entries_in_modules_nobody_imports(plugin_root):
  _write(plugin_root, "toyplugins/__init__.py", """
      from sslvl_jax.registry import Registry
      THINGS = Registry("thing", package=__name__)
  """)
  for name in ("alpha", "beta"):  # two files; nothing imports them
    _write(plugin_root, f"toyplugins/{name}.py", f"""
        from toyplugins import THINGS
        THINGS.add("{name}", "{name.upper()}")
    """)
  from toyplugins import THINGS  # pylint: disable=import-outside-toplevel
  assert THINGS.get("beta") == "BETA" and THINGS.names() == ["alpha", "beta"]
  with pytest.raises(ConfigError, match=r"unknown thing 'gamma'; known: alpha, beta$"):
    THINGS.get("gamma")


def test_module_path_names_import_the_module_and_bad_ones_say_why(plugin_root):
  _write(plugin_root, "toy_registry.py", """
      from sslvl_jax.registry import Registry
      WIDGETS = Registry("widget")
  """)
  _write(plugin_root, "toy_widgets.py", """
      from toy_registry import WIDGETS
      WIDGETS.add("spoke", 7)
  """)
  from toy_registry import WIDGETS  # pylint: disable=import-outside-toplevel
  assert "spoke" not in WIDGETS  # not imported yet
  assert WIDGETS.get("toy_widgets:spoke") == 7 and WIDGETS.get("spoke") == 7
  with pytest.raises(ConfigError, match="module 'toy_widgets' registers no 'hub'"):
    WIDGETS.get("toy_widgets:hub")
  with pytest.raises(ConfigError, match="cannot import 'toy_missing'"):
    WIDGETS.get("toy_missing:spoke")


@pytest.mark.slow  # a 2-step training run, ~15 s
def test_an_evaluator_in_a_users_own_file_runs_in_training(plugin_root, tmp_path):
  """A toy evaluator (mean feature norm of the test split) written to a file of its own, named in
  the config as `module:name`, is built, checked and run by the loop like a built-in one."""
  _write(plugin_root, "toy_evals.py", """
      import numpy as np
      from sslvl_jax.evals import EVALUATORS
      from sslvl_jax.evals.tasks import Evaluator

      @EVALUATORS.register("feature_norm")
      class FeatureNorm(Evaluator):
        SPLITS = {"split": "test"}
        def evaluate(self, params, model_state, extras):
          feats, _ = self.features(params, model_state, extras, "split")
          return {"mean_norm": float(np.linalg.norm(feats, axis=1).mean()), "n": len(feats)}
  """)
  c = quickstart.get_config("smoke")
  c.total_steps = 2
  c.evals = {"norm": {"type": "toy_evals:feature_norm", "batch_size": 64}}
  final = train.run(c, str(tmp_path / "run"))
  assert final["norm/n"] == 297 and np.isfinite(final["norm/mean_norm"])
  assert final["norm/mean_norm"] > 0
  with pytest.raises(ConfigError, match="evals.norm.k: not a setting"):
    c.evals.norm.k = 3
    train.setup(c, str(tmp_path / "bad"))
