"""Paper reproductions, each one `run(out, config, ...)` function that the CLI composes."""

EXPERIMENTS = ("cnn-fashion-mnist",)
