"""User-facing errors: one clear line, exit code 2, no traceback."""


class DeltakdError(Exception):
    """Bad input from the user (recipe, data file, checkpoint path).

    The CLI prints ``str(error)`` as a single line and exits with code 2.
    """

    exit_code = 2


class DivergedError(DeltakdError):
    """Training diverged (a non-finite loss or gradient norm); raised after ``results.json`` is written.

    The CLI prints the one line and exits with code 3.
    """

    exit_code = 3
