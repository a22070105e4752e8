"""Data for training and evaluation: the synthetic visual world (`hyperowl.data.synthetic`)."""

from .synthetic import (
    ALL_TASKS,
    Example,
    Obj,
    Scene,
    examples,
    generate_split,
    iter_examples,
    render,
    synth_main,
    write_dataset,
    write_mp4,
)

__all__ = ["ALL_TASKS", "Example", "Obj", "Scene", "examples", "generate_split", "iter_examples", "render",
           "synth_main", "write_dataset", "write_mp4"]
