"""The paper-reproduction harness: centralized, local, federated and FedDP training compared on
MoNuSeg (see docs/results.md). Runs from the repository root: ``python -m experiments --help``."""
