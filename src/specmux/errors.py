"""User-facing errors.

Every error a user can cause by bad input derives from :class:`SpecmuxError`.  The CLI
turns it into one readable line and exit code 2; the server turns it into a 4xx JSON body.
Anything else escaping is a bug.
"""

from __future__ import annotations


class SpecmuxError(Exception):
    """Bad input or an unusable setup, described in one readable line."""


class ConfigError(SpecmuxError, ValueError):
    """An invalid option value or configuration (k <= 0, bad JSON, unknown policy...)."""


class PromptError(SpecmuxError, ValueError):
    """An empty prompt, or one longer than the model context allows."""


class TokenizerMismatchError(SpecmuxError, ValueError):
    """A drafter whose vocabulary/tokenizer differs from the target's."""


class ModelLoadError(SpecmuxError, RuntimeError):
    """A model that cannot be found or loaded (missing file, hub unreachable...)."""
