"""leantrain.launch: recipes plus a cluster description into launch commands."""
