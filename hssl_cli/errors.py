"""Errors a user can cause. The CLI prints them as one red line and exits with code 2."""


class HsslError(Exception):
    """A user-facing error: the message names the file or key and says what to do."""


class RecipeError(HsslError):
    """A recipe that does not parse or does not fit the schema."""


class DataError(HsslError):
    """A dataset that is missing, incomplete or in the wrong layout."""


class CheckpointError(HsslError):
    """A checkpoint that is truncated, foreign, from a newer hssl, or does not fit its model."""


class TrainingDiverged(HsslError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


class CheckpointNote(UserWarning):
    """Something a user should know about a checkpoint that still loads (e.g. no checksum to verify);
    the CLI prints it as one `note:` line."""


def first_line(error: Exception) -> str:
    """The first line of a library's error, so that an HsslError quoting it stays one line."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
