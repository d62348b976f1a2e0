"""Experiments: many training runs as one Ray Tune experiment, recorded under one MLflow parent run.

- :mod:`~wsol_core.experiments.space`: the search space (short names, ranges, checks); no Ray.
- :mod:`~wsol_core.experiments.trials`: the skeleton a search and a sweep share and the trial body.
- :mod:`~wsol_core.experiments.search`: the hyperparameter search (TPE + ASHA).
- :mod:`~wsol_core.experiments.sweep`: seeded sweeps of fixed variants (the ablation tables).
- :mod:`~wsol_core.experiments.summary`: a finished search's table and plot.
"""
