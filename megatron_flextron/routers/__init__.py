"""Flextron's routers: budget -> architecture (static), cost models and the surrogate model."""
