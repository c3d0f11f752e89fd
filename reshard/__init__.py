"""reshard: convert and reshard LLM checkpoints between formats and parallel layouts."""

__version__ = "0.1.0"
