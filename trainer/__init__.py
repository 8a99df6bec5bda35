"""leantrain.trainer: YAML recipes into an accelerate training loop (issue 4)."""
