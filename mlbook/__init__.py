"""mlbook: the package behind the book "Meta-learning: learning to learn".

Correct, task-batched MAML (second and first order), Reptile and a transfer
baseline on plain ``nn.Module`` models, task distributions, and training and
evaluation loops. See ``book/api`` for the reference.
"""

from . import models, tasks, zoo
from .maml import MAML
from .reptile import Reptile
from .tasks import TaskBatch
from .train import EvalResult, TrainResult, default_device, evaluate, meta_train
from .transfer import Pretrained

__version__ = "0.1.0"


def __getattr__(name):
    # These pull in matplotlib, ipywidgets, PIL or the Omniglot tooling: load
    # them on first use, so `import mlbook` stays light.
    if name in ("plots", "widgets", "fewshot", "data", "omniglot_repro"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mlbook' has no attribute {name!r}")


__all__ = [
    "MAML",
    "Reptile",
    "Pretrained",
    "TaskBatch",
    "meta_train",
    "evaluate",
    "EvalResult",
    "TrainResult",
    "default_device",
    "models",
    "tasks",
    "zoo",
    "plots",
    "widgets",
    "fewshot",
    "data",
]
