"""pytest fixtures: placeholder, filled in by its owner."""
