"""The one error class for bad input a user can fix, raised where the input enters the library.

``UserError`` (a ``ValueError``) carries one line that says what was wrong and what to do. ``sora-jax``
prints it as ``sora-jax: error: <line>`` with a non-zero exit and no traceback; any other exception is a bug
and keeps its traceback. Subclasses name where the input came from (``sora_jax.config.ConfigError``,
``sora_jax.parallel.mesh.MeshError``, ...). Library code below the entry points raises plain ``ValueError``
for broken invariants (bugs); a module that reads user input (a config value, a file, a prompt) raises
``UserError``. The bottom of the import graph: imports nothing.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input the user can fix; the message is one line naming the input and what to do."""

    exit_code = 2  # what `sora-jax` exits with


class PromptRefused(UserError):
    """A prompt the safety policy refuses (``sora_jax/safety/policy.py``). The message names the rule, never
    the prompt: ``prompt refused by the safety policy (<kind>: <rule>)``; ``sora-jax`` exits 3."""

    exit_code = 3

    def __init__(self, kind: str, rule: str):
        super().__init__(f"prompt refused by the safety policy ({kind}: {rule})")
        self.kind, self.rule = kind, rule

    def __reduce__(self):  # picklable (the base pickles its message, not these arguments)
        return type(self), (self.kind, self.rule)


# OS errors about paths a user gave (a missing file, a folder where a file was expected, no permission):
# one line too. Other OSErrors (a full disk, a dropped network mount) keep their traceback.
PATH_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    FileExistsError,
)


class ConfigError(UserError):
    """A config problem the user can fix; the message names the key or file (``sora_jax.config``)."""
