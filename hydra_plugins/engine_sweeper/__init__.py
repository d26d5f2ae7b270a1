"""Hydra sweeper plugin of the engine: ``-m search=<preset>`` selects it (conf/search/*.yaml)."""
