"""`zoo.training`, the public name of the training API; it lives in the `zoo.train` package."""

from zoo.train import *  # noqa: F401,F403
from zoo.train import __all__  # noqa: F401
