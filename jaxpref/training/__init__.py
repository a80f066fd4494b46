"""The run: setup, the compiled step, the loop and its hooks, checkpoints, sinks, dry run."""
