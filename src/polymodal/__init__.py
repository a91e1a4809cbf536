"""polymodal: build, train, load and serve multimodal language models."""

__version__ = "0.1.0"
