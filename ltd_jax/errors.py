"""User-facing errors: the CLI prints their one-line message and exits non-zero."""


class LtdError(Exception):
  """Base class of errors caused by input the user can fix; the message names the fix."""


class ConfigError(LtdError):
  """An unknown, mistyped or out-of-range config value."""


class DatasetError(LtdError):
  """A dataset that cannot be found or is malformed."""


class CheckpointError(LtdError):
  """A checkpoint that is missing or does not fit the configured model."""


class TrainingError(LtdError):
  """Training cannot go on (a non-finite loss, say); checkpoints already written stay valid."""


class Preempted(Exception):
  """SIGTERM or SIGINT stopped training after a step; its checkpoint is written. The command
  line exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a killed
  process would, so that ``run.py && next`` does not go on with an unfinished run."""

  def __init__(self, message: str, signum: int, step: int):
    super().__init__(message)
    self.signum, self.step = signum, step
