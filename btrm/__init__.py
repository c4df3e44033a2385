"""btrm: Bradley-Terry reward models trained with Ray Train + DeepSpeed and served with Ray Serve."""

__version__ = "0.1.0"
