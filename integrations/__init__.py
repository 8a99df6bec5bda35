"""Integrations of leantrain's optimizers with other training loops (transformers.Trainer)."""
