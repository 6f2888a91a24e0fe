"""The evaluators' schedule, shared with the trainer (which checks the state before any is due)."""
from mim_jax.evaluators.schedule import Periodic


def test_an_evaluator_is_due_every_period_and_at_the_end():
    ev = Periodic()
    ev.every_steps = 5
    assert [s for s in range(1, 13) if ev.is_due(s)] == [5, 10]
    assert ev.is_due(12, final=True) and not ev.is_due(12)
