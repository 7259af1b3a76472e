"""Training: recipes (recipes.py), the one train step and evaluation (step.py), a run's
configuration and config.json (config.py), and the loop (loop.py).

`train_step(state, batch, *, config, axis_name=None) -> (state, metrics)` is compiled with
sharded `jax.jit` or with `pmap` (`zoo.parallel.compile_step`); `train(TrainConfig)` runs it and
does not know which model it trains.
"""

from zoo.train.config import TrainConfig, check_resume, resolve
from zoo.train.loop import Interrupted, build, export, train, train_seconds
from zoo.train.recipes import (FREEZE, OPTIMIZERS, RECIPES, SCHEDULES, Recipe, decay_mask,
                               default_recipe_name, make_optimizer, make_schedule,
                               param_labels, peak_lr)
from zoo.train.step import (StepConfig, TrainState, create_train_state, evaluate,
                            model_variables, state_variables, train_step)

__all__ = ["FREEZE", "Interrupted", "OPTIMIZERS", "RECIPES", "Recipe", "SCHEDULES", "StepConfig",
           "TrainConfig", "TrainState", "build", "check_resume", "create_train_state",
           "decay_mask", "default_recipe_name", "evaluate", "export", "make_optimizer",
           "make_schedule", "model_variables", "param_labels", "peak_lr", "resolve",
           "state_variables", "train", "train_seconds", "train_step"]
