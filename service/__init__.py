"""API tier. Never imports torch: it talks to workers through task names and Redis only."""
