"""The one exception type of the data pipeline: its message names the file and the fix."""


class DataError(ValueError):
    """Bad input to the data pipeline (missing or corrupt file, mismatched tokenizer, ...)."""
