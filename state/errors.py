class InputError(Exception):
    """Bad input from the user (config, data, command line).

    Entry points print ``str(error)`` as one line and exit with code 2; nothing is submitted.
    """

    exit_code = 2
