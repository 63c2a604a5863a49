"""Runnable examples of using tokenrelay."""
