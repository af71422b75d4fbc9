"""The distillation library: recipe, trainer and losses, LLaVA data."""
