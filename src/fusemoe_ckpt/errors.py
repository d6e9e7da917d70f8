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


class HubError(FusemoeError):
    """The Hugging Face Hub could not be reached, or refused a repo, revision or upload."""


class ConversionInterrupted(KeyboardInterrupt):
    """^C during a conversion; the message says where the completed shards were kept.

    A KeyboardInterrupt still, so code that stops on ^C keeps stopping.
    """
