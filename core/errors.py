"""The error tree of the core library.

Every error carries a stable ``code`` (used by the service to build ``{"code", "detail"}``
answers and by the CLI to print one clear line) and a message that says what to do next.
"""

from __future__ import annotations


class SlimError(Exception):
    """Base class of every error the core raises on purpose."""

    code = "slim_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidSafetensors(SlimError):
    """A file is not a well-formed safetensors file (or breaks one of our limits)."""

    code = "invalid_safetensors"


class HeaderTooLarge(InvalidSafetensors):
    code = "header_too_large"


class InvalidCheckpoint(SlimError):
    """A checkpoint directory is unusable (missing, no weights, bad index)."""

    code = "invalid_checkpoint"


class InvalidPath(InvalidCheckpoint):
    """A file path is absolute, escapes its directory, or holds NUL or backslashes."""

    code = "invalid_path"


class BaseMismatch(SlimError):
    """A fine-tune does not belong to the given base (no shared tensors, wrong shapes)."""

    code = "base_mismatch"


class InvalidDelta(SlimError):
    """A delta file is malformed."""

    code = "invalid_delta"


class UnsupportedFormatVersion(InvalidDelta):
    code = "unsupported_format_version"


class IntegrityError(SlimError):
    """Bytes do not match the hash recorded when they were written."""

    code = "integrity_error"


class InvalidCalibration(SlimError):
    """A calibration file is malformed or does not fit the chosen evaluation."""

    code = "invalid_calibration"


class InvalidArgument(SlimError):
    """A parameter is out of range or contradicts another one."""

    code = "invalid_argument"


class EvaluationUnavailable(SlimError):
    """The requested evaluation cannot run for this checkpoint (no config, unknown model)."""

    code = "evaluation_unavailable"


class Cancelled(SlimError):
    """A long computation was asked to stop by its progress callback."""

    code = "cancelled"
