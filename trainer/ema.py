"""An exponential moving average of the weights (TrainConfig.ema = decay per step; 0 = off).

avg <- decay * avg + (1 - decay) * weights after every optimizer step, starting from the initial
weights. Only trainable parameters are averaged: BatchNorm running statistics stay the live net's
(averaged over ranks each epoch), so every rank holds the same average without extra communication.
Validation sees the average (applied() swaps it in and back), the final model is the average, and
each checkpoint carries it as epoch-EEEE.ema so a resumed run continues the same average.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

EMA_SUFFIX = ".ema"


class WeightAverage:
    """The running average of net's trainable parameters, keyed by their structural names (as save_parameters)."""

    def __init__(self, net, decay: float):
        self.decay = decay
        self.params = {name: p for name, p in net._collect_params_with_prefix().items() if p.grad_req != "null"}
        self.avg = {name: p.data().copy() for name, p in self.params.items()}

    def update(self) -> None:
        """One step of the average: avg = decay * avg + (1 - decay) * current weights."""
        for name, p in self.params.items():
            a = self.avg[name]
            a *= self.decay
            a += (1 - self.decay) * p.data()

    def apply(self) -> None:
        """Copy the average into the net's parameters (for good: the end of training)."""
        for name, p in self.params.items():
            self.avg[name].copyto(p.data())

    @contextlib.contextmanager
    def applied(self):
        """The net holds the average inside the block, its own weights again after it."""
        saved = {name: p.data().copy() for name, p in self.params.items()}
        self.apply()
        try:
            yield
        finally:
            for name, p in self.params.items():
                saved[name].copyto(p.data())

    def save(self, path: str) -> None:
        """Write the average as an MXNet NDArray dict file."""
        import mxnet as mx

        mx.nd.save(path, self.avg)

    def load(self, path: str | Path) -> None:
        """Read an average written by save; ValueError naming the file if it is missing or does not fit the net."""
        import mxnet as mx

        try:
            loaded = mx.nd.load(str(path))
        except mx.base.MXNetError as e:
            raise ValueError(f"{path}: cannot read the weight average: {str(e).splitlines()[0]}") from None
        shapes = {n: a.shape for n, a in self.avg.items()}
        if not isinstance(loaded, dict) or {n: a.shape for n, a in loaded.items()} != shapes:
            raise ValueError(f"{path}: the weight average does not fit this model (another width?)")
        for name, a in loaded.items():
            a.copyto(self.avg[name])


def averaged(ema):
    """A context in which the net holds the average (nothing changes without one)."""
    return ema.applied() if ema is not None else contextlib.nullcontext()


def checkpoint_files(ema) -> dict:
    """The extra checkpoint file the average needs: {suffix: writer(path)} (empty without one)."""
    return {EMA_SUFFIX: ema.save} if ema is not None else {}
