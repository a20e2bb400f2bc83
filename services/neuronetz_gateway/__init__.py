"""neuronetz-gateway: a secure, multi-tenant API gateway in front of Ollama."""

__all__ = ["__version__"]

__version__ = "0.1.0"
