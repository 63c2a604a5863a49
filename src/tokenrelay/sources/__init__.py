"""Sources produce the events of a run: an OpenAI-compatible upstream, later agents and pools."""
