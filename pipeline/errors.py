"""Typed errors a user can cause. Each message says what is wrong and, where it helps, what to do.

The CLI turns any ``PipelineError`` into one line on stderr and exit code 2 (the traceback only
with ``--debug``; an ``InvalidSettingsError`` adds a line per problem); batch jobs turn
``InvalidImageError`` into a row of the errors table (its class name is the error type). Anything
else that escapes is a bug and keeps its traceback.
"""

from collections.abc import Sequence


def first_line(error: BaseException | str) -> str:
    """The first line of an error's message (or of a text) that says something, stripped: what a
    one-line report quotes of it. An error whose message is empty is named by its type."""
    text = error if isinstance(error, str) else str(error)
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line or ("" if isinstance(error, str) else type(error).__name__)


class PipelineError(Exception):
    """Base class: an error caused by input or configuration, not by a bug."""


class InvalidImageError(PipelineError):
    """Bytes that cannot become an image we can upscale."""


class EmptyImageError(InvalidImageError):
    """Zero bytes."""


class NotAnImageError(InvalidImageError):
    """Bytes in no image format Pillow reads (a text file, say)."""


class TruncatedImageError(InvalidImageError):
    """An image whose data ends early."""


class CorruptImageError(InvalidImageError):
    """An image whose header is readable but whose data is damaged."""


class ImageTooLargeError(InvalidImageError):
    """More pixels than the configured limit (decompression-bomb guard)."""


class UnsupportedImageError(InvalidImageError):
    """A readable image in a mode or shape we cannot upscale (e.g. a 32-bit float TIFF)."""


class ImageTooSmallError(InvalidImageError):
    """An image smaller than what a job cuts from it (a training sub-image)."""


class WeightsError(PipelineError):
    """Weights that cannot be found, read, or do not fit the requested model."""


class DatasetError(PipelineError):
    """A dataset that cannot be loaded or does not have the expected layout."""


class DeviceError(PipelineError):
    """A device or precision that this machine cannot provide (e.g. CUDA asked for, none visible)."""


class SettingsError(PipelineError, ValueError):
    """A setting out of range or settings that contradict each other (also a ``ValueError``)."""


class InvalidSettingsError(SettingsError):
    """Settings with several problems, all reported at once. ``summary`` names the spec file (if
    any) and how many problems there are; ``problems`` holds one line per problem, each naming its
    key and where it was given (the spec file or a ``--set`` item). ``str()`` is the summary, then
    the problems, one a line. A single problem is a plain ``SettingsError`` of one line."""

    def __init__(self, summary: str, problems: Sequence[str]) -> None:
        super().__init__(summary, tuple(problems))  # the arguments, so that it pickles
        self.summary = summary
        self.problems = tuple(problems)

    def __str__(self) -> str:
        return "\n".join((self.summary, *self.problems))


class StorageError(PipelineError):
    """A location that cannot be listed, read or written: missing, permission denied, no space
    left, a missing bucket, an unreachable endpoint, missing credentials."""


class ClusterError(PipelineError):
    """A Ray cluster that cannot be reached, refuses our token, or does not know a job."""


class DestinationError(PipelineError):
    """A destination refused to protect data: it is or holds the inputs, holds files we did not
    write, or was made with other settings (scale, weights)."""
