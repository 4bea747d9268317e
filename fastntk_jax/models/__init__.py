"""Flax models whose trainable (PEFT) parameters live in their own `trainable` collection."""
