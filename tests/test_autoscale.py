"""The S policy (keras_adascale/autoscale.py) on synthetic statistics with hand-computed answers, and the AutoScale
callback in `model.fit`."""

import math

import keras
import numpy as np
import pytest

import keras_adascale
from conftest import BATCH, LeastSquares
from keras_adascale import autoscale, setting


def test_budget_picks_the_square_root_of_noise_scale_times_update_cost():
    # b = sigma2 / mu2 = 16, update cost 4: S* = sqrt(64) = 8. Costs per unit of tau (times b + 1 = 17):
    # S = 8: (16/8 + 1) + (16 + 8)/4 = 9; S = 2: (8 + 1) + 18/4 = 13.5; so 13.5 / 9 - 1 = 50% better.
    decision = autoscale.decide(0.32 / 0.02, 2, 1.0, "budget", min_steps=2, max_steps=32, update_cost=4.0)
    assert decision.steps == 8 and decision.scale == 8 and decision.changed
    assert decision.improvement == pytest.approx(0.5)


def test_budget_keeps_a_count_within_the_threshold():
    # From S = 7: cost (16/7 + 1) + 23/4 = 9.0357 against 9 at S = 8: 0.4% better, under 5%.
    decision = autoscale.decide(16.0, 7, 1.0, "budget", min_steps=2, max_steps=32, update_cost=4.0)
    assert decision.steps == 7 and not decision.changed
    assert autoscale.decide(16.0, 7, 1.0, "budget", max_steps=32, update_cost=4.0, threshold=0.001).steps == 8


def test_budget_stays_within_the_bounds():
    assert autoscale.decide(16.0, 2, 1.0, "budget", min_steps=2, max_steps=4, update_cost=4.0).steps == 4
    assert autoscale.decide(0.01, 8, 1.0, "budget", min_steps=3, max_steps=32, update_cost=4.0).steps == 3


def test_budget_counts_s_per_step_on_several_replicas():
    # 4 replicas: S = 4k. b = 100, cost 4: S* = 20, between S = 20 (k = 5) exactly.
    decision = autoscale.decide(100.0, 1, 4.0, "budget", max_steps=32, update_cost=4.0)
    assert decision.steps == 5 and decision.scale == 20


def test_efficiency_takes_the_largest_count_that_keeps_the_target():
    # b = 9, e = 0.8: r/S = 10 / (9 + S) >= 0.8 for S <= 3.5.
    assert autoscale.decide(9.0, 2, 1.0, "efficiency", target_efficiency=0.8).steps == 3
    # 2 replicas (S = 2k): S = 2 gives 10/11 = 0.91, S = 4 gives 10/13 = 0.77: k = 1.
    assert autoscale.decide(9.0, 3, 2.0, "efficiency", target_efficiency=0.8).steps == 1


def test_goodput_maximizes_gain_per_second_of_the_fitted_step_time():
    # t(1) = 1.0 s, t(4) = 2.5 s: t(k) = 0.5 + 0.5 k. b = 15: r/t = 32k / ((15 + k)(1 + k)),
    # 1.0 at k = 1, 1.333 at k = 3, 1.347 at k = 4, 1.333 at k = 5.
    step_time = autoscale.fit_step_time({1: 1.0, 4: 2.5})
    assert step_time == pytest.approx((0.5, 0.5))
    decision = autoscale.decide(15.0, 1, 1.0, "goodput", step_time=step_time)
    assert decision.steps == 4
    assert decision.improvement == pytest.approx(32 * 4 / (19 * 5) - 1)


def test_one_measured_count_gives_half_its_time_as_the_fixed_cost():
    assert autoscale.fit_step_time({4: 2.0}) == pytest.approx((1.0, 0.25))


def test_the_gain_model_per_unit_of_tau():
    assert autoscale.updates_per_tau(9.0, 3.0) == pytest.approx((9 / 3 + 1) / 10)
    assert autoscale.examples_per_tau(9.0, 3.0) == pytest.approx((9 + 3) / 10)
    assert autoscale.gain(math.inf, 8.0) == 8.0
    assert autoscale.budget_scale(16.0, 4.0) == 8.0


class FakeOptimizer:
    """The optimizer surface ScalePolicy reads: a snapshot with a chosen noise scale and tau, on R replicas."""

    def __init__(self, replicas=1, steps=2):
        self.replicas, self.steps, self.tau, self.noise_scale, self.iterations = replicas, steps, 0.0, 16.0, 0
        self.gain = 1.0
        self.calls = []

    @property
    def samples_per_update(self):
        return self.replicas * self.steps

    def snapshot(self):
        return {"accumulation_steps": self.steps, "scale": float(self.replicas * self.steps), "gain": self.gain,
                "scale_invariant_iterations": self.tau, "gradient_noise_scale": self.noise_scale}

    def set_accumulation_steps(self, steps):
        self.calls.append(steps)
        self.steps = steps

    def _setting_numbers(self):
        scale = float(self.replicas * self.steps)
        return setting.ScaleSetting(steps=self.steps, next_steps=self.steps, update_start=0, updates=self.iterations,
                                    scale=scale, next_scale=scale)


def test_the_policy_waits_for_the_warmup_then_decides_every_interval():
    optimizer, policy = FakeOptimizer(), autoscale.ScalePolicy(interval=10, warmup=25, update_cost=4.0)
    for tau in [5, 15, 24]:
        optimizer.tau = tau
        assert policy.step(optimizer) is None
    optimizer.tau = 26
    assert policy.step(optimizer).steps == 8 and optimizer.calls == [8]
    optimizer.noise_scale, optimizer.tau = 64.0, 30  # S* = 16, but the next decision is at tau 36
    assert policy.step(optimizer) is None
    optimizer.tau = 36.5
    assert policy.step(optimizer).steps == 16 and optimizer.calls == [8, 16]
    assert [change["steps"] for change in policy.changes] == [8, 16]
    assert policy.changes[-1]["from_steps"] == 8 and "budget" in policy.changes[-1]["reason"]


def test_the_least_count_gives_two_samples():
    # b = 0.01: S* = 0.2, below any count; one replica needs k >= 2, two replicas k >= 1.
    for replicas, least in [(1, 2), (2, 1)]:
        optimizer = FakeOptimizer(replicas=replicas, steps=4)
        optimizer.noise_scale = 0.01
        autoscale.ScalePolicy(warmup=0).step(optimizer)
        assert optimizer.steps == least


def test_goodput_policy_uses_the_times_it_was_given():
    optimizer, policy = FakeOptimizer(steps=1), autoscale.ScalePolicy("goodput", warmup=0, interval=1, min_steps=1)
    optimizer.noise_scale = 15.0
    policy.record_time(4, 2.5)
    assert policy.step(optimizer, seconds=1.0).steps == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [({"objective": "fastest"}, "`objective` must be one of"), ({"interval": -1}, "`interval`"),
     ({"max_steps": 0}, "`max_steps` must be an integer >= 1"), ({"min_steps": 8, "max_steps": 4}, "`min_steps`"),
     ({"update_cost": -1.0}, "`update_cost`"), ({"target_efficiency": 1.5}, "`target_efficiency`")],
)
def test_bad_policy_arguments_raise_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        autoscale.ScalePolicy(**kwargs)


def test_autoscale_in_fit_grows_the_count_and_logs_s_and_k():
    problem = LeastSquares(num_examples=96 * BATCH, seed=11)
    model = problem.model()
    optimizer = keras_adascale.AdaScaleSGD(0.01, momentum=0.9, gradient_accumulation_steps=2)
    model.compile(optimizer=optimizer, loss="mse")
    callback = keras_adascale.AutoScale(interval=4, warmup=4, update_cost=64.0, max_steps=8, verbose=0)
    history = model.fit(problem.x, problem.y, batch_size=BATCH, shuffle=False, epochs=2, verbose=0,
                        callbacks=[callback])
    assert callback.changes and callback.changes[0]["from_steps"] == 2
    assert optimizer.accumulation_steps == callback.changes[-1]["steps"]
    assert history.history["accumulation_steps"][-1] == optimizer.accumulation_steps
    assert history.history["scale"][-1] == optimizer.scale
    # Each change is the policy's answer for the statistics it saw.
    for change in callback.changes:
        expected = autoscale.decide(change["noise_scale"], change["from_steps"], 1.0, "budget", min_steps=2,
                                    max_steps=8, update_cost=64.0)
        assert change["steps"] == expected.steps


def test_autoscale_needs_gradient_accumulation():
    problem = LeastSquares(num_examples=16, seed=1)
    model = problem.model()
    model.compile(optimizer=keras.optimizers.SGD(), loss="mse")
    with pytest.raises(ValueError, match="AutoScale needs a model compiled with an AdaScale optimizer"):
        model.fit(problem.x, problem.y, verbose=0, callbacks=[keras_adascale.AutoScale()])
    model = problem.model()
    model.compile(optimizer=keras_adascale.AdaScaleSGD(scale=1), loss="mse")
    with pytest.raises(ValueError, match="made with `gradient_accumulation_steps=k`"):
        model.fit(problem.x, problem.y, verbose=0, callbacks=[keras_adascale.AutoScale()])


def test_autoscale_with_its_default_verbose_prints_each_change_on_a_line_of_its_own(capsys):
    # The default path (verbose=1) through a change of S, under fit's default progress bar.
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 8)).astype("float32")
    y = x @ rng.normal(size=(8, 1)).astype("float32") + 2.0 * rng.normal(size=(1024, 1)).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    optimizer = keras_adascale.AdaScaleSGD(0.02, gradient_accumulation_steps=2)
    model.compile(optimizer=optimizer, loss="mse")
    callback = keras_adascale.AutoScale("budget", update_cost=16.0, interval=10, max_steps=16)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[callback])
    assert callback.changes, "the example must change S to test the printing"
    out = capsys.readouterr().out
    change = callback.changes[0]
    line = (f"\nAutoScale: update {change['update']} (tau {change['scale_invariant_iterations']:.0f}): "
            f"k {change['from_steps']} -> {change['steps']}, S = {change['scale']:g}. {change['reason']}.\n")
    assert line in out


def test_autoscale_prints_to_the_absl_log_when_interactive_logging_is_off(monkeypatch, capsys):
    from keras_adascale import callbacks

    logged = []
    monkeypatch.setattr(callbacks.logging, "info", logged.append)
    optimizer = FakeOptimizer()
    callback = keras_adascale.AutoScale(warmup=0, update_cost=4.0)
    callback.set_params({"verbose": 0})
    keras.config.disable_interactive_logging()
    try:
        callback._decide(optimizer, None)
    finally:
        keras.config.enable_interactive_logging()
    assert optimizer.calls == [8] and capsys.readouterr().out == ""
    assert len(logged) == 1 and logged[0].startswith("AutoScale: update 0 (tau 0): k 2 -> 8, S = 8. budget:")


def test_efficiency_leaves_the_current_count_only_below_the_target_by_more_than_the_threshold():
    # Target 0.8: S = 4 keeps it at b >= 11 ((b + 1) / (b + 4) >= 0.8). At b = 10.9 it is 0.7987: within 5% below,
    # so k = 4 stays, where a noise scale moving between 11.0 and 10.9 used to flip k 2 -> 4 -> 2 -> 4.
    assert autoscale.decide(11.0, 2, 1.0, "efficiency", target_efficiency=0.8, max_steps=4).steps == 4
    stay = autoscale.decide(10.9, 4, 1.0, "efficiency", target_efficiency=0.8, max_steps=4)
    assert stay.steps == 4 and not stay.changed
    # Below target x (1 - threshold) = 0.76 (b = 5: 6 / 9 = 0.67): down to the largest count that keeps 0.8
    # (S = 2: 6 / 7 = 0.86).
    down = autoscale.decide(5.0, 4, 1.0, "efficiency", target_efficiency=0.8, max_steps=4)
    assert down.steps == 2 and "below the target 0.8 x (1 - 0.05)" in down.reason


def test_a_nan_noise_scale_is_refused_by_decide_and_changes_nothing_in_the_policy():
    with pytest.raises(ValueError, match="`noise_scale` must be a number >= 0"):
        autoscale.decide(math.nan, 2, 1.0, "efficiency")
    optimizer = FakeOptimizer()
    optimizer.noise_scale = math.nan
    assert autoscale.ScalePolicy("efficiency", warmup=0).step(optimizer) is None
    assert optimizer.calls == [] and optimizer.steps == 2


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_goodput_times_only_the_updates_steps_and_drops_the_first_update_and_the_first_after_a_change(monkeypatch):
    from keras_adascale import callbacks

    optimizer, clock = FakeOptimizer(steps=2), FakeClock()
    optimizer.gradient_accumulation_steps = 2
    monkeypatch.setattr(callbacks, "_adascale_optimizer", lambda model, who: optimizer)
    callback = keras_adascale.AutoScale("goodput", interval=0, warmup=0, threshold=1e9, verbose=0)
    callback._clock = clock
    callback.on_train_begin()

    def update(step_seconds, gap_seconds):
        """One update of k micro-batches of `step_seconds` each, `gap_seconds` of other callbacks after each."""
        for micro in range(optimizer.steps):
            callback.on_train_batch_begin(micro)
            clock.now += step_seconds
            if micro == optimizer.steps - 1:
                optimizer.iterations += 1
            callback.on_train_batch_end(micro)
            clock.now += gap_seconds  # an evaluation in a callback after AutoScale, an epoch end...

    update(3.0, 0.0)  # the first update: the trace, not timed
    assert callback.policy.seconds_per_update() == {}
    update(0.01, 5.0)
    update(0.01, 5.0)
    assert callback.policy.seconds_per_update() == pytest.approx({2: 0.02})
    # A change (any count is now predicted better: no threshold); its first update is not timed.
    callback.policy.threshold = 0.0
    optimizer.noise_scale = 1e6
    update(0.01, 0.0)
    assert optimizer.calls and optimizer.steps != 2
    assert "half of the one measured step time assumed fixed" in callback.changes[-1]["reason"]
    callback.policy.threshold = 1e9
    new_steps = optimizer.steps
    update(1.0, 0.0)  # the first update at the new count: dropped
    assert set(callback.policy.seconds_per_update()) == {2}
    update(0.03, 2.0)
    assert callback.policy.seconds_per_update()[new_steps] == pytest.approx(0.03 * new_steps)


def test_decisions_come_on_a_grid_of_tau_so_a_policy_made_anew_on_a_resumed_run_decides_where_the_first_would():
    # warmup 25, interval 10: decisions at the first update reaching 25, 35, 45, ...
    def decisions(policy, taus, optimizer):
        made = []
        for tau in taus:
            optimizer.gain, optimizer.tau = tau - optimizer.tau, tau
            if policy.step(optimizer) is not None:
                made.append(tau)
        return made

    taus = [3.0 * update for update in range(1, 30)]
    straight = decisions(autoscale.ScalePolicy(interval=10, warmup=25, threshold=1e9), taus, FakeOptimizer())
    assert straight == [27.0, 36.0, 45.0, 57.0, 66.0, 75.0, 87.0]
    for kill in (5, 10, 13, 19):  # the first policy ran through taus[:kill]; a new one takes the rest
        resumed_optimizer = FakeOptimizer()
        resumed_optimizer.tau = taus[kill - 1]
        resumed = decisions(autoscale.ScalePolicy(interval=10, warmup=25, threshold=1e9), taus[kill:],
                            resumed_optimizer)
        assert resumed == [tau for tau in straight if tau > taus[kill - 1]], kill


class AligningOptimizer(FakeOptimizer):
    """FakeOptimizer with the micro-batches done, where its setting says the next update starts."""

    def __init__(self, steps):
        super().__init__(steps=steps)
        self.micro_batches = 0

    def _setting_numbers(self):
        return super()._setting_numbers()._replace(update_start=self.micro_batches)


def test_with_align_a_change_waits_for_a_boundary_where_the_micro_batches_are_a_multiple_of_the_new_count():
    optimizer = AligningOptimizer(steps=2)
    policy = autoscale.ScalePolicy(warmup=0, interval=0, update_cost=64.0, align=True, max_steps=8,
                                   min_steps=2)
    optimizer.micro_batches = 2  # one update of 2 done: 2 % 8 != 0
    policy.step(optimizer)
    assert optimizer.calls == [] and policy.changes == []
    optimizer.micro_batches, optimizer.iterations = 4, 1
    policy.step(optimizer)
    assert optimizer.calls == []
    optimizer.micro_batches, optimizer.iterations = 8, 3  # aligned: the change is made, and recorded now
    policy.step(optimizer)
    assert optimizer.calls == [8] and policy.changes[0]["update"] == 3 and policy.changes[0]["from_steps"] == 2


def test_with_align_a_change_that_no_boundary_can_align_is_made_at_once():
    # A custom loop whose updates of 2 started after one odd micro-batch: the micro-batches done stay odd,
    # so no boundary is ever a multiple of 8 (or of 4): waiting would wait forever.
    optimizer = AligningOptimizer(steps=2)
    policy = autoscale.ScalePolicy(warmup=0, interval=0, update_cost=64.0, align=True, max_steps=8,
                                   min_steps=2)
    optimizer.micro_batches, optimizer.iterations = 3, 1
    policy.step(optimizer)
    assert optimizer.calls == [8] and policy.changes[0]["update"] == 1


def test_efficiency_below_the_target_at_every_allowed_count_takes_the_smallest_allowed_one():
    # b = 0.5 on 2 replicas: even S = 4 (k = 2) is below 0.8; k = 1 is not allowed, so k = 2, not min_steps.
    decision = autoscale.decide(0.5, 4, 2.0, "efficiency", min_steps=1, allowed_steps=[2, 4, 8])
    assert decision.steps == 2


def test_every_epoch_decides_only_at_epoch_starts():
    problem = LeastSquares(num_examples=96 * BATCH, seed=11)
    model = problem.model()
    optimizer = keras_adascale.AdaScaleSGD(0.01, momentum=0.9, gradient_accumulation_steps=2)
    model.compile(optimizer=optimizer, loss="mse")
    starts = []
    at_start = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: starts.append(int(optimizer.iterations.numpy())))
    callback = keras_adascale.AutoScale(every="epoch", interval=0, warmup=0, update_cost=64.0, max_steps=8,
                                        allowed_steps=[2, 4, 8], verbose=0)
    model.fit(problem.x, problem.y, batch_size=BATCH, shuffle=False, epochs=3, verbose=0,
              callbacks=[at_start, callback])
    assert callback.changes
    assert all(change["update"] in starts for change in callback.changes)


def test_given_the_setting_the_policy_reads_the_statistics_only_where_a_decision_may_be_due_and_decides_the_same():
    # tau grows by the gain, at most S, per update: reading only where the last tau read plus S per update
    # since may reach the next decision point finds every decision that reading after every update finds.
    rng = np.random.default_rng(3)
    gains = rng.uniform(1.0, 2.0, size=400)
    gains[::37] = 2.0  # updates at the ceiling, where the bound is tight

    def run(given_setting):
        optimizer = FakeOptimizer(steps=2)
        reads = []
        snapshot = optimizer.snapshot
        optimizer.snapshot = lambda: reads.append(optimizer.tau) or snapshot()
        policy = autoscale.ScalePolicy(interval=7.5, warmup=20.0, threshold=1e9)  # decisions, no changes
        decided = []
        for gain in gains:
            optimizer.gain, optimizer.tau, optimizer.iterations = gain, optimizer.tau + gain, optimizer.iterations + 1
            if given_setting:
                decision = policy._step(optimizer, None, optimizer._setting_numbers())
            else:
                decision = policy.step(optimizer)
            if decision is not None:
                decided.append(optimizer.iterations)
        return decided, reads

    every_update, reads_every_update = run(given_setting=False)
    bounded, reads_bounded = run(given_setting=True)
    assert len(every_update) > 40
    assert bounded == every_update
    assert len(reads_every_update) == len(gains)
    assert len(reads_bounded) < len(gains) / 2


def test_in_fit_autoscale_reads_the_optimizer_once_per_update_and_its_statistics_only_where_a_decision_may_be_due():
    problem = LeastSquares(num_examples=96 * BATCH, seed=11)
    model = problem.model()
    optimizer = keras_adascale.AdaScaleSGD(0.01, momentum=0.9, gradient_accumulation_steps=4)
    model.compile(optimizer=optimizer, loss="mse")
    counts = {"_setting_numbers": 0, "snapshot": 0}
    for name in counts:
        method = getattr(optimizer, name)

        def counted(method=method, name=name):
            counts[name] += 1
            return method()

        setattr(optimizer, name, counted)
    callback = keras_adascale.AutoScale(interval=1e6, warmup=1e6, max_steps=4, verbose=0)  # no decision due
    history = model.fit(problem.x, problem.y, batch_size=BATCH, shuffle=False, epochs=2, verbose=0,
                        callbacks=[callback])
    updates = int(optimizer.iterations.numpy())
    assert updates == 2 * 96 // 4
    # the first update's statistics (where the bound starts from), and none after
    assert counts["snapshot"] == 1
    # At train begin (the count it starts from, and the setting); after each micro-batch until the first
    # update is seen complete (a fit may start in the middle of one); then after each update, at each
    # epoch end, and inside the one snapshot.
    assert counts["_setting_numbers"] == 2 + (4 - 1) + updates + 2 + 1
    # every micro-batch's logs still carry S and k
    assert history.history["accumulation_steps"] == [4, 4]
