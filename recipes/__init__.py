"""One module per command; each is a thin layer that builds on the ``cookbook`` package."""
