"""The one exception type the loader raises for any bad model source."""


class ModelLoadError(ValueError):
    """The model could not be loaded; the message names the path or file and the problem."""
