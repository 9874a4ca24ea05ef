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
