"""``python -m neuronetz_gateway.cli``: the same CLI as ``neuronetz-gateway``."""

from neuronetz_gateway.cli.main import main

main()
