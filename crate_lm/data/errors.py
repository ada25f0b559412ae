"""The one exception type of the data pipeline: its message names the file and the fix."""

from crate_lm.errors import CrateLMError


class DataError(CrateLMError):
    """Bad input to the data pipeline (missing or corrupt file, mismatched tokenizer, ...)."""
