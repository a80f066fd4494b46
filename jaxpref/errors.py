"""User-facing errors: one line on stderr, exit code 2, never a traceback."""


class JaxprefError(Exception):
    """An error caused by the user's input (config, data, checkpoint, flag).

    The message is one line that names what is wrong and where.
    """


class ConfigError(JaxprefError):
    pass


class ModelSourceError(JaxprefError):
    pass


class DataError(JaxprefError):
    pass
