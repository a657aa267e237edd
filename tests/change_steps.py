"""A callback the changing-S tests share, in a module with no side effects (conftest.py sets up logical
devices on import), so that the multi-worker tests' worker processes can import it too."""

import keras


class ChangeSteps(keras.callbacks.Callback):
    """Calls `set_accumulation_steps(k)` at the update boundaries a plan names: {update index: k}."""

    def __init__(self, plan):
        super().__init__()
        self.plan = dict(plan)

    def on_train_batch_end(self, batch, logs=None):
        updates = int(self.model.optimizer.iterations)
        if updates in self.plan:
            self.model.optimizer.set_accumulation_steps(self.plan.pop(updates))
