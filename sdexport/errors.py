"""The small hierarchy of errors sdexport raises on purpose.

Every error a user can cause is one of these; the CLI turns it into one line on
stderr and the exit code below. Anything else is a bug and keeps its traceback.
"""


class SdexportError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(SdexportError):
    """A bad option value (steps, guidance, scheduler, backend, shapes)."""

    exit_code = 2


class ModelError(SdexportError):
    """The model directory is missing, not diffusers layout, or unsupported."""

    exit_code = 3


class ShapeError(SdexportError):
    """A shape outside what the export or engine declared."""

    exit_code = 4


class IntegrityError(SdexportError):
    """An artifact does not match its manifest (hash, names, dtypes) or is corrupt."""

    exit_code = 5


class ValidationFailed(SdexportError):
    """Numerical validation ran and at least one comparison missed its threshold."""

    exit_code = 6


class BackendUnavailable(SdexportError):
    """The requested backend is not installed here (names the packages to install)."""

    exit_code = 7


class CannotRunHere(SdexportError):
    """Engines exist but cannot execute on this host (no GPU, or a GPU the flavour refuses)."""

    exit_code = 8


class DiskFull(SdexportError):
    """Not enough disk space for the artifact (found before the work, or the disk filled up during it)."""

    exit_code = 10


class ServeFailed(SdexportError):
    """The Triton server could not start or stopped on its own (its log says why)."""

    exit_code = 11
