"""SpeechGPT: a language model that hears and speaks through discrete speech units.

The package is laid out one file per stage of a spoken turn:
audio -> units -> prompt -> model -> parser -> vocoder -> pipeline -> ui.
"""

__version__ = "0.1.0"
