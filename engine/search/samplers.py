"""Samplers by preset name. One is built per trial with seed ``seed + trial number``.

Optuna's samplers keep their knowledge in the study (the storage), not in the sampler object, so a
fresh sampler per trial loses nothing; seeding it with the trial number makes a single-worker
sweep reproducible and keeps a resumed sweep from re-drawing the first trials' values (a sampler
seeded once would start its random sequence over after a restart).
"""

from __future__ import annotations

import optuna

from engine.config import SAMPLERS, ConfigError


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number``: ``seed + number``, wrapped to the 32 bits NumPy's
    seeding takes (``search.seed`` itself may be as large as 2**32 - 1)."""
    return (seed + number) % 2**32


def startup_trials(n_trials: int) -> int:
    """Random trials before a model-based sampler takes over: a third of the budget, 2..10."""
    return max(2, min(10, n_trials // 3))


def make_sampler(name: str, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    """``grid`` trials are enqueued with fixed params (engine.search.storage), so any sampler
    serves them; the others sample the space."""
    if name in ("grid", "random"):
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        # constant_liar: running trials count as bad guesses, so parallel workers spread out.
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=startup_trials(n_trials),
            multivariate=True,
            constant_liar=True,
        )
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials(n_trials))
    if name == "cmaes":
        # Categorical params go to the independent (random) sampler, as CMA-ES is continuous.
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=startup_trials(n_trials), warn_independent_sampling=False
        )
    if name == "nsga2":
        population = max(4, min(50, n_trials // 4))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
    raise ConfigError(f"search.sampler={name!r} is unknown; choose one of {', '.join(SAMPLERS)}")
