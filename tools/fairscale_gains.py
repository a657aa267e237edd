"""FairScale's own AdaScale gains on fixed gradient samples, for tests/test_fairscale.py.

FairScale (PyTorch) clips each update's estimates of sigma^2 (at 1e-6) and mu^2 (at 0) before they enter
its moving averages; keras-adascale averages the raw estimates and clips what it reads. This script runs
FairScale's `AdaScale` on gradient samples drawn from NumPy (a linear loss, so each micro-batch's gradient
is exactly its sample) and writes the gain of every update, with what it took to make them, to
tests/data/fairscale_gains.json. The test replays the same samples through the NumPy reference's
per-update rule (`AdaScaleReference(clip="update")`) and checks that it reproduces these numbers, and that
the rule keras-adascale follows differs from them where small N makes the mu^2 estimates negative.

It needs FairScale and PyTorch, which the project does not depend on: run it in a virtual environment of
its own, e.g.

    python3 -m venv /tmp/fsvenv && /tmp/fsvenv/bin/pip install torch==2.13.0 numpy
    /tmp/fsvenv/bin/pip install --no-deps fairscale==0.4.13
    /tmp/fsvenv/bin/python tools/fairscale_gains.py
"""

import json
import pathlib

import numpy as np

# Small N and noise that dominates the mean: one update's mu^2 estimate is often negative, which is where
# the two rules differ. Each case: (samples N per update, scale S, smoothing theta, noise, seed).
CASES = [
    {"samples": 2, "scale": 2.0, "smoothing": 0.9, "noise": 3.0, "seed": 0},
    {"samples": 4, "scale": 8.0, "smoothing": 0.95, "noise": 2.0, "seed": 1},
]
UPDATES = 60
DIM = 16
OUTPUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "fairscale_gains.json"


def samples(case):
    """The gradient samples of every update, shape (UPDATES, N, DIM): a fixed mean plus Gaussian noise."""
    rng = np.random.RandomState(case["seed"])
    mean = rng.randn(DIM) / np.sqrt(DIM)
    return mean + case["noise"] * rng.randn(UPDATES, case["samples"], DIM) / np.sqrt(DIM)


def fairscale_gains(case):
    import fairscale
    import torch
    from fairscale.optim import AdaScale

    parameter = torch.nn.Parameter(torch.zeros(DIM, dtype=torch.float64))
    optimizer = AdaScale(torch.optim.SGD([parameter], lr=0.1), world_size=1, scale=case["scale"],
                         smoothing=case["smoothing"], num_gradients_to_accumulate=case["samples"])
    gains = []
    for update in samples(case):
        for sample in update:
            # A linear loss: its gradient is the sample. FairScale's default is_scaled_loss=True wants each
            # micro-batch's loss divided by the accumulation count.
            loss = (parameter * torch.from_numpy(sample)).sum() / case["samples"]
            loss.backward()
        gains.append(float(optimizer.gain()))
        optimizer.step()
        optimizer.zero_grad()
    return gains, fairscale.__version__, torch.__version__


def main():
    results = []
    for case in CASES:
        gains, fairscale_version, torch_version = fairscale_gains(case)
        results.append({**case, "updates": UPDATES, "dim": DIM, "gains": gains})
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps({"fairscale": fairscale_version, "torch": torch_version,
                                  "made_by": "tools/fairscale_gains.py", "cases": results}, indent=1) + "\n")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
