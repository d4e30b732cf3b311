"""The operator tools: the `videoqa` command, `serve`, tiny checkpoints and the memory plan."""
