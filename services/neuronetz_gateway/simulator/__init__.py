"""A bundled Ollama simulator for development, tests and benchmarks.

``create_simulator_app()`` returns a raw ASGI app imitating Ollama's native
API deterministically (see :mod:`neuronetz_gateway.simulator.app`); serve it
with ``python -m neuronetz_gateway.simulator --host 127.0.0.1 --port 11434``.
"""

from neuronetz_gateway.simulator.app import (
    DEFAULT_MODELS,
    THINKING,
    RecordedRequest,
    SimulatorApp,
    SimulatorConfig,
    SimulatorStats,
    create_simulator_app,
)
from neuronetz_gateway.simulator.content import (
    PROMPT_OVERHEAD,
    WORDS,
    embedding_vector,
    simulated_pieces,
    simulated_text,
)

__all__ = [
    "DEFAULT_MODELS",
    "PROMPT_OVERHEAD",
    "THINKING",
    "WORDS",
    "RecordedRequest",
    "SimulatorApp",
    "SimulatorConfig",
    "SimulatorStats",
    "create_simulator_app",
    "embedding_vector",
    "simulated_pieces",
    "simulated_text",
]
