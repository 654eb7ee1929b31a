"""Failures medpipe explains in one line (`error: ...`, exit code 1) instead of a traceback.

The CLI turns these, any `ValueError` (input that does not fit, validated where it enters)
and any `OSError` (the machine said no: permissions, a full disk, a file where a folder
should be) into one line. Everything else is a bug and keeps its traceback. Each class also
derives from the built-in error it refines, so callers may catch either.
"""

from __future__ import annotations


class MedpipeError(Exception):
    """Base: the message says what failed and what to do about it."""

    def __str__(self) -> str:  # KeyError would otherwise quote its message
        return str(self.args[0]) if self.args else ""


class MissingItem(MedpipeError, KeyError):
    """A reference names a member, array or key that the file does not hold."""


class CheckFailed(MedpipeError, RuntimeError):
    """A self-check refused to publish an output (e.g. an export that differs from PyTorch)."""


class ToolFailed(MedpipeError, RuntimeError):
    """An outside tool or service failed (a download, `dvc`), or an optional extra is missing."""


class Busy(MedpipeError, RuntimeError):
    """Another run of the same stage holds the workspace's lock."""
