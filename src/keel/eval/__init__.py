"""Evaluation: validation loss and text generation."""
