"""The error raised for a bad configuration: the CLI prints it as one line and exits 2."""


class ConfigError(KeyError, ValueError):
  """A configuration value is missing, unknown or inconsistent; the message says how to fix it."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ""
