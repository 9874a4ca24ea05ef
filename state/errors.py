from pathlib import Path


class InputError(Exception):
    """Bad input from the user (config, data, command line).

    Entry points print ``str(error)`` as one line and exit with code 2; nothing is submitted.
    """

    exit_code = 2


class PermanentJobError(Exception):
    """A job failed for a reason a retry cannot change (nothing to train on, a model that does not
    load, bad data): the job's ledger record says ``permanent`` and the driver fails its stage at
    once instead of resubmitting it up to ``executor.max_attempts`` times. An InputError raised in a
    job counts as one too."""


def read_user_text(path: Path, what: str) -> str:
    """The text of ``path``, a file the user named; InputError naming it when it is missing, a folder
    (the line says it should be ``what``: "a YAML config file"), not UTF-8 or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not {what}") from None
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror})") from None
