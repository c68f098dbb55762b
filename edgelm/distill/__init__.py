"""Logit knowledge distillation: losses (registry) and the trainer."""
