"""ConfigError: bad input from the user (a missing file, a mismatched checkpoint, an out-of-range
setting). The commands print its message as one line, `error: ...`, instead of a traceback. It
lives in a module of its own, beneath every other, so that there is exactly one class of it."""


class ConfigError(ValueError):
    """A one-line message that names the file or value at fault and says what to do."""
