"""User-facing errors: one clear line, exit code 2, no traceback."""


class DeltakdError(Exception):
    """Bad input from the user (recipe, data file, checkpoint path).

    The CLI prints ``str(error)`` as a single line and exits with code 2.
    """

    exit_code = 2
