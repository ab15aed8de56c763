"""The one user-fixable error type (a leaf: imports nothing of the package)."""


class ConfigError(ValueError):
  """A problem the user can fix; the message is one sentence naming the fix."""
