"""Answers kept for identical requests, and identical requests in flight sharing one run."""
