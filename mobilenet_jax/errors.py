"""The one base class of the errors a user fixes: a flag, a file or a workdir.

run.py, predict, export and convert print such an error's message as one line and exit 1,
without a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A bad setting, file or workdir; the message names it and says what to do."""


class ConfigError(UserError, ValueError):
  """A bad config field or command-line override."""


class WorkdirError(UserError, FileNotFoundError):
  """A workdir that lacks what the command reads (config.json, checkpoints)."""


class FileError(UserError, ValueError):
  """A file named on the command line that cannot be used as asked (an image, a checkpoint)."""


class WorkdirBusyError(UserError):
  """A workdir that another run holds (its lock, `workdirs.Lock`)."""
