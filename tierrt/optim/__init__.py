"""Optimizers that run over state homed in tierrt's tiers."""
