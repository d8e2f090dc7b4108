"""What every command line shares: --help exits 0; bad input is one line and exit status 2."""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Sequence

from absl import app, flags, logging

from sslvl_jax.errors import ConfigError, RunError

_VERBOSE = flags.DEFINE_bool("verbose", False, "show the traceback of an error, not one line")


def fail(message: object) -> None:
  """Print one clear line and exit with status 2."""
  logging.flush()
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def innermost(e: BaseException) -> BaseException:
  """The exception at the root of a chain of re-raises (flag parsing wraps config errors twice)."""
  seen = {id(e)}
  while True:
    nxt = e.__cause__ or e.__context__
    if nxt is None or id(nxt) in seen:
      return e
    if isinstance(e, ConfigError) and not isinstance(nxt, ConfigError):
      return e
    seen.add(id(nxt))
    e = nxt


def one_line(e: BaseException) -> str:
  """A one-line description of `e` for the user."""
  if isinstance(e, (ConfigError, RunError)):
    return str(e)
  if isinstance(e, SyntaxError):
    return f"{e.filename} line {e.lineno}: {e.msg}"
  if isinstance(e, OSError) and e.strerror:
    fix = "; free some space (the last good checkpoint is kept)" if e.errno == errno.ENOSPC else ""
    return f"{e.strerror}: {e.filename}{fix}" if e.filename else f"{e.strerror}{fix}"
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"


def required(**values: object) -> None:
  """ConfigError naming the first of the given flags that is not set."""
  for name, value in values.items():
    if value in (None, ""):
      raise ConfigError(f"--{name} is required (see --help)")


def run(main: Callable[[Sequence[str]], None], argv: Sequence[str] | None = None) -> None:
  """Parse flags and run `main`, turning expected failures into one line and exit status 2."""
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("--help", "-h", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
    app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True, exitcode=0)
  for a in argv[1:]:  # config_flags defers a missing file to a vague error at first use
    if a.startswith("--config=") and not os.path.isfile(a[len("--config="):].split(":")[0]):
      fail(f"{a}: no such config file (recipes are configs/<name>.py)")
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:  # names the flag; a recipe's own ConfigError is wrapped inside
    root = innermost(e)
    fail(str(root) if isinstance(root, ConfigError) else str(e).splitlines()[0])
  except (AttributeError, KeyError, TypeError, ValueError, SyntaxError) as e:  # config overrides
    fail(f"bad --config override or config file: {one_line(innermost(e))}")
  if len(rest) > 1:
    fail(f"unexpected arguments: {rest[1:]} (flags are --name=value; see --help)")
  try:
    app.run(main, flags_parser=lambda _: rest)
  except (ConfigError, RunError, OSError) as e:
    if _VERBOSE.value:
      raise
    fail(one_line(e))
