"""Store implementations behind the small Protocols of the rest of the package."""
