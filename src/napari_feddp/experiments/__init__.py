"""Reproducible comparisons of centralized, local, federated and FedDP training (see docs/results.md)."""
