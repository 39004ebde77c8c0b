"""Training application: data, model, loop and metrics wired together."""
