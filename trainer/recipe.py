"""Training-recipe ingredients for short schedules, each behind a TrainConfig key whose default is d2l's.

- zero_init_residual: each residual block's last BatchNorm gamma starts at 0, so the block starts as an
  identity (Goyal et al. 2017) and early training sees a shallower net.
- wd_bn_bias false: no weight decay on BatchNorm gamma/beta and biases (they set scales and offsets, not
  the capacity weight decay is meant to limit). The key is positive because a bool key named no_* would
  get the flag --no-..., which argparse's BooleanOptionalAction reads as false.
- optimizer: d2l's SGD with momentum, or Nesterov momentum (NesterovSGD).
- stem_init whiten: the stem's filters whiten the images' 3x3 patches and stay frozen (airbench's first
  layer): from the first step every later layer sees decorrelated, unit-variance inputs.
The augmentation keys live in trainer.presets, the weight average in trainer.ema.
"""
from __future__ import annotations

from collections.abc import Iterator

from contracts.errors import InputError
from trainer.config import DECAY_TO_END, TrainConfig


def check_recipe(cfg: TrainConfig) -> None:
    """Refuse key combinations that would silently do nothing (d2l's per-image pipeline has no padcrop/cutout)."""
    if cfg.pipeline == "d2l" and (cfg.augment != "d2l" or cfg.cutout):
        raise InputError("key 'pipeline': d2l (the per-image DataLoader) applies only d2l's augmentation; "
                         "use pipeline: batched with augment/cutout")
    if cfg.pipeline == "d2l" and cfg.low_res and cfg.low_res_epochs:
        raise InputError("key 'low_res': d2l's per-image pipeline does not resize; use pipeline: batched")
    if cfg.flip == "alternate" and cfg.augment != "padcrop":
        raise InputError("key 'flip': alternate mirrors padcrop's crops; set augment: padcrop or flip: random")
    if cfg.time_budget and cfg.schedule in DECAY_TO_END and not cfg.warmup_epochs:
        raise InputError(f"key 'time_budget': the epochs are fitted to it after the first, whose learning rate under "
                         f"the {cfg.schedule} schedule depends on their count; set warmup_epochs (1 or more)")
    if bool(cfg.low_res) != bool(cfg.low_res_epochs):
        raise InputError(f"keys 'low_res' ({cfg.low_res}) and 'low_res_epochs' ({cfg.low_res_epochs}): "
                         "set both (progressive resizing) or neither")


def train_size(cfg: TrainConfig, epoch: int) -> int:
    """The side of this epoch's training batches: low_res for the first low_res_epochs epochs, else 32."""
    return cfg.low_res if cfg.low_res and epoch < cfg.low_res_epochs else 32


def blocks(block, kind: type) -> Iterator:
    """Every descendant of a Gluon block that is an instance of kind, in definition order."""
    for child in block._children.values():
        if isinstance(child, kind):
            yield child
        yield from blocks(child, kind)


def zero_init_residual(net) -> int:
    """Set the last BatchNorm gamma of every trainer.model.Residual to 0 (after initialisation); returns the count."""
    from trainer.model import Residual

    count = 0
    for res in blocks(net, Residual):
        res.bn2.gamma.data()[:] = 0
        count += 1
    return count


WHITEN_IMAGES = 2000  # the first training images the patch covariance is estimated on (~1.8M patches)
WHITEN_EPS = 5e-4  # added to each eigenvalue: the faintest directions are not amplified without bound


def patch_whitening(images, n_dirs: int, kernel: int = 3):
    """(2 n_dirs, 3, kernel, kernel) float32 filters: the top n_dirs eigenvectors of the covariance of the
    normalized images' kernel x kernel patches, each divided by sqrt(its eigenvalue + WHITEN_EPS), then the same
    filters negated (a ReLU after them keeps both signs of every direction)."""
    import numpy as np

    from trainer.presets import normalize

    cov = np.zeros((3 * kernel * kernel,) * 2)
    count = 0
    for start in range(0, len(images), 250):
        x = normalize(np.asarray(images[start:start + 250]))
        patches = np.lib.stride_tricks.sliding_window_view(x, (kernel, kernel), axis=(2, 3))
        flat = patches.transpose(0, 2, 3, 1, 4, 5).reshape(-1, 3 * kernel * kernel).astype(np.float64)
        cov += flat.T @ flat
        count += len(flat)
    evals, evecs = np.linalg.eigh(cov / max(count, 1))
    top = np.argsort(evals)[::-1][:n_dirs]
    filters = (evecs[:, top] / np.sqrt(evals[top] + WHITEN_EPS)).T.reshape(n_dirs, 3, kernel, kernel)
    return np.concatenate([filters, -filters]).astype(np.float32)


def freeze_stem(net) -> None:
    """The stem conv (net[0]) is not trained: call before the first forward pass, so no gradient is bound for it."""
    for p in (net[0].weight, net[0].bias):
        if p is not None:
            p.grad_req = "null"


def whiten_stem(net, images) -> int:
    """Overwrite the first filters of the (initialised) stem conv with patch_whitening of images: width // 2
    directions and their negations, at most all 27 of a 3x3 RGB patch; any filters left keep their random
    init. Returns the number of whitened filters."""
    import mxnet as mx

    stem = net[0]
    width, _, kernel, _ = stem.weight.shape
    filters = patch_whitening(images, min(width // 2, 3 * kernel * kernel), kernel)
    stem.weight.data()[: len(filters)] = mx.nd.array(filters, ctx=stem.weight.data().context)
    if stem.bias is not None:
        stem.bias.data()[:] = 0
    return len(filters)


def no_decay_params(net) -> list:
    """The parameters weight decay should skip: BatchNorm gamma and beta, and every Conv/Dense bias."""
    from mxnet.gluon import nn

    found = []
    for bn in blocks(net, nn.BatchNorm):
        found += [bn.gamma, bn.beta]
    for layer in [*blocks(net, nn.Conv2D), *blocks(net, nn.Dense)]:
        if layer.bias is not None:
            found.append(layer.bias)
    return found


def apply_no_wd_bn_bias(net) -> int:
    """wd_mult 0 on no_decay_params(net) (the optimizer reads it per update); returns how many."""
    params = no_decay_params(net)
    for p in params:
        p.wd_mult = 0.0
    return len(params)


def prepare_net(net, cfg: TrainConfig) -> None:
    """The recipe's changes to an initialised net: zero-init residual gammas, no decay on BN and biases."""
    if cfg.zero_init_residual:
        zero_init_residual(net)
    if not cfg.wd_bn_bias:
        apply_no_wd_bn_bias(net)


def optimizer_spec(cfg: TrainConfig, lr: float) -> tuple[str, dict]:
    """(optimizer, its arguments): d2l's sgd with momentum, or NesterovSGD when cfg.nesterov."""
    args = {"learning_rate": lr, "momentum": cfg.momentum, "wd": cfg.wd}
    return (nesterov_sgd()(**args), {}) if cfg.nesterov else ("sgd", args)


def _nesterov_class():
    """NesterovSGD, defined on first use so that importing this module does not import mxnet."""
    import mxnet as mx

    class NesterovSGD(mx.optimizer.Optimizer):
        """SGD with Nesterov momentum, in d2l's lr-scaled momentum form (v = m v - lr g; w += m v - lr g).

        Not MXNet's "nag": its nag_mom_update writes the weight in place and then reads it again for the
        state's decay term, and two identical runs with it trained differently here (MXNet 1.9.1, MKLDNN).
        """

        def __init__(self, momentum: float = 0.0, **kwargs):
            super().__init__(**kwargs)
            self.momentum = momentum

        def create_state(self, index, weight):
            return mx.nd.zeros(weight.shape, weight.context, dtype=weight.dtype)

        def update(self, index, weight, grad, state):
            self._update_count(index)
            lr, wd = self._get_lr(index), self._get_wd(index)
            g = grad * self.rescale_grad
            if self.clip_gradient is not None:
                g = mx.nd.clip(g, -self.clip_gradient, self.clip_gradient)
            g = g + wd * weight
            state *= self.momentum
            state -= lr * g
            weight += self.momentum * state - lr * g

    NesterovSGD.__module__ = __name__
    NesterovSGD.__qualname__ = "NesterovSGD"
    return NesterovSGD


def nesterov_sgd() -> type:
    """The NesterovSGD optimizer class (made once)."""
    if "NesterovSGD" not in globals():
        globals()["NesterovSGD"] = _nesterov_class()
    return globals()["NesterovSGD"]


def __getattr__(name: str):
    """trainer.recipe.NesterovSGD resolves lazily, so that importing this module does not import mxnet."""
    if name == "NesterovSGD":
        return nesterov_sgd()
    raise AttributeError(name)
