"""Keel: PyTorch-native infrastructure for pretraining language models."""

__version__ = "0.1.0"
