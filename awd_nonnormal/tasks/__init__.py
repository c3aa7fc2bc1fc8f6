"""Synthetic long-memory tasks of Orhan & Pitkow (2020, section 3.1.1): copy, addition, psMNIST.

* :mod:`.data`  pure generators (``torch.Generator`` in, tensors out), the IDX reader, data sets;
* :mod:`.config` :class:`TaskConfig`, :class:`RunOptions` and the task registry;
* :mod:`.train` the model and the resumable trainer;
* :mod:`.sweep` the hyper-parameter grid of Figure 3, run in parallel, with its summary;
* ``python -m awd_nonnormal.tasks`` the command line (``train`` and ``sweep``).

The training function is :func:`awd_nonnormal.tasks.train.train` (not re-exported here, so that
the name ``awd_nonnormal.tasks.train`` stays the module).
"""

from .config import (TASKS, RunConflict, RunOptions, Task, TaskConfig, TaskError, get_task,
                     make_config)
from .train import TaskModel, build_model

__all__ = ["TASKS", "Task", "TaskConfig", "RunOptions", "TaskError", "RunConflict", "TaskModel",
           "build_model", "get_task", "make_config"]
