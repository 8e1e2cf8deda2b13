class SelfRewardError(Exception):
    """A user-facing error: the message says what went wrong and what to do.

    The CLI prints it as one line and exits non-zero; nothing is written to a run.
    """
