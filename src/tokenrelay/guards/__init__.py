"""What stands between a request and the Hub: who is calling, and whether they may start a run."""

from .principal import Principal

__all__ = ["Principal"]
