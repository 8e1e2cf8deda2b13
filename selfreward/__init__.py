"""selfreward: the Self-Rewarding Language Models loop as a resumable service."""

__version__ = "0.1.0"
