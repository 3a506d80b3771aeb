"""The one exception type the CLI turns into a single line and a non-zero exit."""


class LayerprobeError(Exception):
    """Bad input or an environment problem the user can fix: the message says what and how."""
