"""The exceptions fusemoe-ckpt raises: one base class, a few precise kinds."""

from __future__ import annotations

import signal


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


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal: ^C (SIGINT), or SIGTERM (scancel, a time limit, preemption, a pod's
    deletion) turned into this exception by `interrupts.signals_as_interrupts`.

    A KeyboardInterrupt, so every place that stops safely on ^C stops the same way on SIGTERM.
    """

    def __init__(self, message: str = "", *, signal: signal.Signals = signal.SIGINT) -> None:
        super().__init__(message)
        self.signal = signal


class ConversionInterrupted(Interrupted):
    """A conversion stopped by ^C or SIGTERM; the message says where the completed shards were kept."""


def interrupted_by(error: BaseException) -> signal.Signals:
    """The signal that raised `error` or the interruption it was raised from; SIGINT for a plain
    KeyboardInterrupt, which is what Python raises on ^C."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, Interrupted):
            return current.signal
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return signal.SIGINT


def one_line(error: BaseException) -> str:
    """The message an error is shown with: ours as they are, others prefixed with their type; in
    one line whatever the paths and keys in it hold (see `printable`)."""
    message = str(error) if isinstance(error, FusemoeError) else f"{type(error).__name__}: {error}"
    return printable(message)


def printable(text: str) -> str:
    """`text` with every character that is not printable escaped as in a Python string literal
    (a newline as \\n, ESC as \\x1b): a path or a tensor key holding one can neither split the
    one-line message nor send the terminal a control sequence."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
