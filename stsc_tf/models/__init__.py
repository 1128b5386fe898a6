"""Backbones and the STSC model."""
