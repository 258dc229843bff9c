"""Data layer: tasks (files, split protocols, prompt templates) and metrics."""

from dpft.data.tasks import TASKS, Example, MissingDataError, Task, build_task, data_dir

__all__ = ["TASKS", "Example", "MissingDataError", "Task", "build_task", "data_dir"]
