"""Errors the stages raise for problems a user can fix, as opposed to bugs."""


class PipelineError(Exception):
    """A failure worth one clear line to the user rather than a traceback.

    `exit_code` follows the CLI's convention: 2 for bad input the user can fix, 1 for a runtime failure.
    """

    exit_code = 1


class BadInputError(PipelineError):
    """Input (config, files, mirrors, arguments) that can never work as given."""

    exit_code = 2


class DataError(BadInputError):
    """A data file that is malformed: bad header, wrong sizes, labels out of range."""


class DownloadError(PipelineError):
    """No mirror could deliver a verified copy of a file."""


class TrainingError(PipelineError):
    """Tuning produced no usable trial."""


class QualityGateError(PipelineError):
    """The model trained but did not meet `evaluate.min_test_accuracy`."""


class StorageError(PipelineError):
    """An artifact could not be written: a full disk, a read-only or unreachable file system."""
