"""mlc-edge: compile Hugging Face LLM checkpoints into MLC-LLM bundles for phone GPUs."""

__version__ = "0.1.0"
