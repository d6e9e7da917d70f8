"""The exceptions fusemoe-ckpt raises: one base class, a few precise kinds."""

from __future__ import annotations


class FusemoeError(Exception):
    """Base class of every error fusemoe-ckpt raises on purpose."""


class CheckpointError(FusemoeError):
    """The source checkpoint is missing, malformed or inconsistent."""


class FamilyError(FusemoeError):
    """No family rule fits the checkpoint, or its experts break the rule."""


class DestinationError(FusemoeError):
    """The output directory cannot be written as asked."""


class UsageError(FusemoeError):
    """An option has a value that cannot work."""


class ManifestError(UsageError):
    """A batch manifest is unreadable, or an entry has a missing, unknown or invalid field."""


class HubError(FusemoeError):
    """The Hugging Face Hub could not be reached, or refused a repo, revision or upload."""


class ConversionInterrupted(KeyboardInterrupt):
    """^C during a conversion; the message says where the completed shards were kept.

    A KeyboardInterrupt still, so code that stops on ^C keeps stopping.
    """


def one_line(error: BaseException) -> str:
    """The message an error is shown with: ours as they are, others prefixed with their type."""
    return str(error) if isinstance(error, FusemoeError) else f"{type(error).__name__}: {error}"
