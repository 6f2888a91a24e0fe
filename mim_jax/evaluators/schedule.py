"""When an evaluator runs: the one rule the evaluators and the trainer share."""
from __future__ import annotations


class Periodic:
    """Every `every_steps` steps (evaluators.create sets the resolved period), and always at
    the end of training."""

    every_steps: int = 1
    # What the evaluator cannot run without: 'labels' (the data's) and/or 'pixels' (an
    # objective with predicts_pixels). evaluators.check_needs refuses a run that lacks one.
    NEEDS: tuple = ()

    def is_due(self, step: int, final: bool = False) -> bool:
        return final or step % self.every_steps == 0
