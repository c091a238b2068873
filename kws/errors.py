"""One base class for every failure a user can cause: the CLI prints it as one line, exit 2."""


class KwsError(Exception):
    pass
