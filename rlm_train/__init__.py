"""rlm-train: post-training pipeline that turns small open models into Recursive Language Models."""

__version__ = "0.1.0"
