"""The recipe keys, each checked on the code path training uses, and their d2l defaults."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli

from trainer import presets
from trainer.config import TrainConfig

RECIPE_KEYS = {"augment": "d2l", "pad": 4, "pad_mode": "reflect", "cutout": 0, "ema": 0.0,
               "zero_init_residual": False, "wd_bn_bias": True, "nesterov": False, "tta": "none", "low_res": 0,
               "low_res_epochs": 0, "stage_mult": "1,2,4,8", "stem_stride": 1, "stem_pool": 0, "stem_init": "xavier",
               "flip": "random", "bn_momentum": 0.9}


def _images(n: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _pixels(x: np.ndarray) -> np.ndarray:
    """Normalized NCHW float32 back to NHWC pixel values."""
    return ((x - presets._SHIFT_NCHW) / presets._SCALE_NCHW).transpose(0, 2, 3, 1)


def test_recipe_keys_default_to_d2l_and_seed_yaml_keeps_them():
    from launcher.run_config import load_run_config

    defaults = TrainConfig()
    assert {k: getattr(defaults, k) for k in RECIPE_KEYS} == RECIPE_KEYS
    d2l = load_run_config(ROOT / "configs" / "seed.yaml").train
    assert {k: getattr(d2l, k) for k in RECIPE_KEYS} == RECIPE_KEYS
    # the default transform is d2l's augment, draw for draw
    imgs = _images()
    got = presets.train_transform()(imgs, np.random.default_rng(5))
    assert np.array_equal(got, presets.augment(imgs, np.random.default_rng(5)))


@pytest.mark.parametrize("mode", ["reflect", "zero"])
@pytest.mark.parametrize("pad", [2, 4])
def test_padcrop_is_a_translated_view_of_the_padded_image(mode, pad):
    imgs = _images()
    dy, dx, flip = presets.draw_shifts(np.random.default_rng(1), len(imgs), pad)
    out = presets.apply_shifts(imgs, dy, dx, flip, pad, mode)
    np_mode = {"reflect": "reflect", "zero": "constant"}[mode]
    for i, img in enumerate(imgs):
        ref = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode=np_mode)[dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        ref = ref[:, ::-1] if flip[i] else ref
        np.testing.assert_allclose(_pixels(out[i:i + 1])[0], ref, atol=2e-3)
    # the random version is the same function of the same draws, and covers every offset and both flips
    again = presets.padcrop(imgs, np.random.default_rng(1), pad, mode)
    assert np.array_equal(again, out)
    dy, dx, flip = presets.draw_shifts(np.random.default_rng(2), 4000, pad)
    assert set(dy) == set(dx) == set(range(2 * pad + 1))
    assert 0.45 < flip.mean() < 0.55


def test_zero_padding_is_black_and_reflect_padding_is_not():
    imgs = np.full((1, 32, 32, 3), 200, dtype=np.uint8)
    corner = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), np.zeros(1, dtype=bool)
    zero = _pixels(presets.apply_shifts(imgs, *corner, 4, "zero"))[0]
    reflect = _pixels(presets.apply_shifts(imgs, *corner, 4, "reflect"))[0]
    np.testing.assert_allclose(zero[:4], 0, atol=2e-3)  # the top 4 rows are padding
    np.testing.assert_allclose(zero[:, :4], 0, atol=2e-3)
    np.testing.assert_allclose(zero[4:, 4:], 200, atol=2e-3)
    np.testing.assert_allclose(reflect, 200, atol=2e-3)


@pytest.mark.parametrize("size", [1, 8, 16])
def test_cutout_zeros_exactly_a_square_of_the_given_size(size):
    imgs = np.random.default_rng(3).integers(1, 256, (64, 32, 32, 3), dtype=np.uint8)
    rng = np.random.default_rng(4)
    x = presets.train_transform("padcrop", 4, "reflect", size)(imgs, rng)
    plain = presets.padcrop(imgs, np.random.default_rng(4), 4, "reflect")
    for i in range(len(x)):
        zero = x[i] == 0
        assert zero.sum() == 3 * size * size
        rows, cols = np.nonzero(zero.all(axis=0))
        assert rows.max() - rows.min() + 1 == size and cols.max() - cols.min() + 1 == size
        assert np.array_equal(x[i][~zero], plain[i][~zero])  # everything else is the uncut image
    # the squares lie inside the image and move around it
    y0, x0 = presets.draw_cutout(np.random.default_rng(6), 5000, size)
    assert y0.min() == x0.min() == 0 and y0.max() == x0.max() == 32 - size


def _net(width: int = 4):
    import mxnet as mx

    from trainer.model import resnet18

    net = resnet18(10, width)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((2, 3, 32, 32)))
    return net


def test_zero_init_residual_leaves_each_block_an_identity():
    import mxnet as mx
    from mxnet import autograd

    from trainer.model import Residual
    from trainer.recipe import blocks, zero_init_residual

    mx.random.seed(0)
    net = _net()
    identity = [b for b in blocks(net, Residual) if b.conv3 is None]
    projection = [b for b in blocks(net, Residual) if b.conv3 is not None]
    assert len(identity) == 5 and len(projection) == 3
    x = mx.nd.relu(mx.nd.random.normal(shape=(4, 4, 8, 8)))  # a block's input is a ReLU output
    assert not np.allclose(identity[0](x).asnumpy(), x.asnumpy())  # not an identity before
    assert zero_init_residual(net) == 8
    for blk in identity:
        c = blk.conv1._channels
        x = mx.nd.relu(mx.nd.random.normal(shape=(4, c, 8, 8)))
        np.testing.assert_allclose(blk(x).asnumpy(), x.asnumpy(), atol=1e-6)
        with autograd.record():  # training mode: batch statistics, still gamma 0
            np.testing.assert_allclose(blk(x).asnumpy(), x.asnumpy(), atol=1e-6)
    for blk in projection:
        x = mx.nd.relu(mx.nd.random.normal(shape=(4, blk.conv1.weight.shape[1], 8, 8)))
        np.testing.assert_allclose(blk(x).asnumpy(), mx.nd.relu(blk.conv3(x)).asnumpy(), atol=1e-6)


def test_wd_bn_bias_false_sets_wd_mult_zero_on_exactly_bn_and_bias_params():
    import mxnet as mx
    from mxnet import autograd, gluon

    from trainer.recipe import optimizer_spec, prepare_net

    net = _net()
    trainable = {n: p for n, p in net.collect_params().items() if p.grad_req != "null"}
    expected = {n for n in trainable if n.rsplit("_", 1)[-1] in ("gamma", "beta", "bias")}
    assert expected
    prepare_net(net, TrainConfig(wd_bn_bias=False))
    assert {n for n, p in trainable.items() if p.wd_mult == 0} == expected
    assert all(p.wd_mult == 1 for n, p in trainable.items() if n not in expected)
    # through the optimizer: with zero gradients, only weight decay moves a parameter
    cfg = TrainConfig(momentum=0.0, wd=0.1)
    trainer = gluon.Trainer(net.collect_params(), *optimizer_spec(cfg, 0.5))
    before = {n: p.data().copy() for n, p in trainable.items()}
    with autograd.record():
        loss = net(mx.nd.ones((2, 3, 32, 32))).sum() * 0  # every gradient fresh, and zero
    loss.backward()
    trainer.step(1)
    for n, p in trainable.items():
        want = before[n] if n in expected else before[n] * (1 - 0.5 * 0.1)
        np.testing.assert_allclose(p.data().asnumpy(), want.asnumpy(), rtol=1e-6, atol=1e-7)
    assert type(trainer._optimizer) is mx.optimizer.SGD


@pytest.mark.parametrize("nesterov", [False, True])
def test_nesterov_changes_the_update_as_computed_by_hand(nesterov):
    import mxnet as mx
    from mxnet import autograd, gluon

    from trainer.recipe import optimizer_spec

    lr, m, wd = 0.1, 0.9, 0.01
    p = gluon.Parameter("w", shape=(3,))
    p.initialize(mx.init.Constant(1.0))
    trainer = gluon.Trainer([p], *optimizer_spec(TrainConfig(momentum=m, wd=wd, nesterov=nesterov), lr))
    w, v = np.ones(3), np.zeros(3)
    for g in (np.array([1.0, -2.0, 0.5]), np.array([0.3, 0.3, -1.0]), np.array([-1.0, 0.0, 2.0])):
        with autograd.record():
            loss = (p.data() * mx.nd.array(g)).sum()  # gradient g
        loss.backward()
        trainer.step(1)
        if nesterov:  # the look-ahead: v = m v - lr g'; w += m v - lr g', with g' = g + wd w
            gw = g + wd * w
            v = m * v - lr * gw
            w = w + m * v - lr * gw
        else:  # d2l's sgd: v = m v - lr (g + wd w); w += v
            v = m * v - lr * (g + wd * w)
            w = w + v
        np.testing.assert_allclose(p.data().asnumpy(), w, rtol=1e-5)


def test_weight_average_equals_the_hand_computed_average_after_k_steps(tmp_path):
    import mxnet as mx

    from trainer.ema import WeightAverage

    net = _net()
    params = {n: p for n, p in net._collect_params_with_prefix().items() if p.grad_req != "null"}
    start = {n: p.data().asnumpy() for n, p in params.items()}
    ema = WeightAverage(net, 0.8)
    hand = dict(start)
    rng = np.random.default_rng(0)
    for _ in range(5):
        for p in params.values():
            p.set_data(mx.nd.array(rng.standard_normal(p.shape)))
        ema.update()
        hand = {n: 0.8 * hand[n] + 0.2 * params[n].data().asnumpy() for n in params}
    for n in params:
        np.testing.assert_allclose(ema.avg[n].asnumpy(), hand[n], rtol=1e-5, atol=1e-6)
    live = {n: p.data().asnumpy() for n, p in params.items()}
    with ema.applied():
        assert all(np.allclose(params[n].data().asnumpy(), hand[n], atol=1e-6) for n in params)
    assert all(np.array_equal(params[n].data().asnumpy(), live[n]) for n in params)  # swapped back
    ema.save(str(tmp_path / "a.ema"))
    other = WeightAverage(net, 0.8)
    other.load(tmp_path / "a.ema")
    assert all(np.array_equal(other.avg[n].asnumpy(), ema.avg[n].asnumpy()) for n in params)
    with pytest.raises(ValueError, match="does not fit"):
        WeightAverage(_net(8), 0.8).load(tmp_path / "a.ema")


TINY = ["--width", "4", "--batch-size", "16", "--lr", "0.1", "--lr-period", "1", "--lr-decay", "0.5", "--keep-checkpoints", "5",
        "--ema", "0.9", "--augment", "padcrop", "--cutout", "8", "--zero-init-residual", "--no-wd-bn-bias",
        "--nesterov", "--tta", "flip", "--low-res", "16", "--low-res-epochs", "1", "--stage-mult", "1,2,4,16",
        "--stem-stride", "2", "--stem-pool", "2", "--stem-init", "whiten", "--flip", "alternate",
        "--bn-momentum", "0.5"]


def _train(prepared: Path, out: Path, *extra: str):
    return run_cli(["train", "--prepared", str(prepared), "--out", str(out), *TINY, *extra], timeout=600)


def _final(out: Path) -> dict:
    import mxnet as mx

    return {k: v.asnumpy() for k, v in mx.nd.load(str(out / "model-final.params")).items()}


@pytest.mark.slow
def test_ema_run_validates_exports_and_resumes_the_average(prepared, tmp_path):
    import mxnet as mx

    from predictor.predict import load_model
    from trainer import rundir
    from trainer.evaluate import evaluate

    whole, part = tmp_path / "whole", tmp_path / "part"
    proc = _train(prepared, whole, "--epochs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ema = {k: v.asnumpy() for k, v in mx.nd.load(str(whole / "checkpoints" / "epoch-0002.ema")).items()}
    final = _final(whole)
    assert ema and all(np.array_equal(final[k], v) for k, v in ema.items())  # the final model is the average
    live = {k: v.asnumpy() for k, v in mx.nd.load(str(whole / "checkpoints" / "epoch-0002.params")).items()}
    assert any(not np.array_equal(live[k], v) for k, v in ema.items())
    # the last epoch's valid accuracy is the average's (the final model's), not the live weights'
    import data_prep

    valid = data_prep.open_split(prepared, "valid", data_prep.read_manifest(prepared))
    net = load_model(whole, mx.cpu())[0]  # predict's loader rebuilds the recorded stage_mult, stem_stride and stem_pool
    # ... in the flip view (train.tta), with the plain view's accuracy beside it
    row = rundir.read_metrics(whole)[-1]
    flip, plain = (evaluate(net, valid.images, valid.labels, mx.cpu(), 64, tta=t)["acc"] for t in ("flip", "none"))
    assert row["valid_acc"] == pytest.approx(flip) and row["valid_acc_plain"] == pytest.approx(plain)

    # stopped after epoch 1 (the low-resolution one) and resumed: the same average, hence the same final model
    assert _train(prepared, part, "--epochs", "1").returncode == 0
    resumed = _train(prepared, part, "--epochs", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = _final(part)
    for k, v in final.items():
        np.testing.assert_allclose(again[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    # the whitened stem is not trained: the same filters after the first epoch and in the final model
    first = {k: v.asnumpy() for k, v in mx.nd.load(str(whole / "checkpoints" / "epoch-0001.params")).items()}
    stem = next(k for k in first if k.endswith("weight"))
    np.testing.assert_allclose(final[stem], first[stem], rtol=1e-6, atol=1e-7)
    # parameters of the same shapes under another stem stride are another model: refused, exit 2
    proc = _train(prepared, part, "--epochs", "3", "--resume", "--stem-stride", "1")
    assert proc.returncode == 2 and "stem_stride 1, stem_pool 2: its model has width 4, stage_mult 1,2,4,16, " \
        "stem_stride 2, stem_pool 2" in proc.stderr, proc.stderr[-2000:]
    proc = _train(prepared, part, "--epochs", "3", "--resume", "--stem-pool", "0")  # and without the pool
    assert proc.returncode == 2 and "stem_stride 2, stem_pool 0: its model has" in proc.stderr, proc.stderr[-2000:]
    # checkpoints without their average cannot continue one: exit 2 naming the files
    for ema_file in (part / "checkpoints").glob("*.ema"):
        ema_file.unlink()
    proc = _train(prepared, part, "--epochs", "3", "--resume")
    assert proc.returncode == 2 and "epoch-0002.ema" in proc.stderr


def test_a_model_key_at_its_default_leaves_older_workdirs_stage_keys_alone():
    from contracts.schema import alias_spelled

    for key, value in (("stem_stride", 2), ("stem_pool", 3)):
        assert key not in alias_spelled(TrainConfig())  # markers written before the key existed still match
        assert alias_spelled(TrainConfig(**{key: value}))[key] == value


def test_recipe_flags_parse_and_the_d2l_pipeline_spelled_seed_refuses_padcrop(prepared, tmp_path):
    from trainer.train import build_parser, resolve

    args = build_parser().parse_args(["--prepared", "p", "--out", "o", *TINY])
    cfg = resolve(TrainConfig, args, None, "train")
    changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(TrainConfig(), f.name)}
    assert set(RECIPE_KEYS) - {"pad", "pad_mode"} <= changed
    proc = run_cli(["train", "--prepared", str(prepared), "--out", str(tmp_path / "r"), "--pipeline", "seed",
                    "--augment", "padcrop"])
    assert proc.returncode == 2 and "key 'pipeline': d2l" in proc.stderr and not (tmp_path / "r").exists()


def test_stage_mult_widens_only_the_named_stages_and_bad_values_are_refused(prepared, tmp_path):
    import mxnet as mx

    from trainer.model import resnet18

    def channels(net) -> list[int]:
        return [stage[1].conv2.weight.shape[0] for stage in list(net)[3:7]]

    d2l, wide = resnet18(10, 4), resnet18(10, 4, "1,2,4,16")
    for net in (d2l, wide):
        net.initialize()
        net(mx.nd.zeros((2, 3, 32, 32)))
    assert channels(d2l) == [4, 8, 16, 32] and channels(wide) == [4, 8, 16, 64]
    assert [p.shape for p in d2l[0].collect_params().values()] == [p.shape for p in wide[0].collect_params().values()]
    strided = resnet18(10, 4, stem_stride=2)
    strided.initialize()
    assert strided[:3](mx.nd.zeros((2, 3, 32, 32))).shape == (2, 4, 16, 16)
    assert strided(mx.nd.zeros((2, 3, 32, 32))).shape == (2, 10)
    x = mx.nd.array(np.random.default_rng(0).standard_normal((2, 3, 32, 32)))
    for pool in (2, 3):  # the stem's ReLU at all 32x32 positions, then each 16x16 cell its window's maximum
        pooled = resnet18(10, 4, stem_pool=pool)
        pooled.initialize()
        full = pooled[:3](x).asnumpy()
        assert full.shape == (2, 4, 32, 32) and pooled[:4](x).shape == (2, 4, 16, 16)
        assert pooled(x).shape == (2, 10)  # the same parameters as d2l's model: the pool has none
        assert [p.shape for p in pooled.collect_params().values()] == [p.shape for p in d2l.collect_params().values()]
        padded = np.pad(full, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf) if pool == 3 \
            else full  # 3x3 windows padded by 1 start one pixel above and left of each 2x2 cell
        windows = np.lib.stride_tricks.sliding_window_view(padded, (pool, pool), axis=(2, 3))[:, :, ::2, ::2]
        np.testing.assert_allclose(pooled[:4](x).asnumpy(), windows.max(axis=(4, 5))[:, :, :16, :16], rtol=1e-6)
    for bad in ("2,2,4,8", "1,2,4", "1,2,x,8", "1,2,4,0"):
        proc = run_cli(["train", "--prepared", str(prepared), "--out", str(tmp_path / "r"), "--stage-mult", bad])
        assert proc.returncode == 2 and "stage_mult" in proc.stderr and not (tmp_path / "r").exists(), bad


@pytest.mark.parametrize("size", [16, 24, 31])
def test_downscale_averages_areas_and_keeps_the_mean(size):
    x = presets.normalize(_images(6))
    small = presets.downscale(x, size)
    assert small.shape == (6, 3, size, size) and small.dtype == np.float32
    np.testing.assert_allclose(small.mean(axis=(2, 3)), x.mean(axis=(2, 3)), rtol=1e-4, atol=1e-5)
    assert presets.downscale(x, 32) is x
    const = np.full((1, 3, 32, 32), 0.7, dtype=np.float32)
    np.testing.assert_allclose(presets.downscale(const, size), 0.7, rtol=1e-5)
    if size == 16:  # an integer factor is the mean of each 2x2 block
        blocks = x.reshape(6, 3, 16, 2, 16, 2).mean(axis=(3, 5))
        np.testing.assert_allclose(small, blocks, rtol=1e-5, atol=1e-5)


def test_progressive_resizing_trains_the_first_epochs_small(prepared):
    import data_prep
    from trainer.recipe import check_recipe
    from trainer.train import epoch_batches

    cfg = TrainConfig(batch_size=8, augment="padcrop", cutout=4, low_res=24, low_res_epochs=2)
    split = data_prep.open_split(prepared, "train", data_prep.read_manifest(prepared))
    shapes = [next(iter(epoch_batches(split, cfg, epoch, 0, 1)))[0].shape for epoch in range(3)]
    assert shapes == [(8, 3, 24, 24), (8, 3, 24, 24), (8, 3, 32, 32)]
    # the small batch is the full-size batch of the same draws, downscaled
    full = dataclasses.replace(cfg, low_res=0, low_res_epochs=0)
    small_x, small_y = next(iter(epoch_batches(split, cfg, 0, 0, 1)))
    full_x, full_y = next(iter(epoch_batches(split, full, 0, 0, 1)))
    np.testing.assert_array_equal(small_y, full_y)
    np.testing.assert_allclose(small_x, presets.downscale(full_x, 24), rtol=1e-6)
    for bad in (dataclasses.replace(cfg, low_res_epochs=0), dataclasses.replace(cfg, low_res=0)):
        with pytest.raises(Exception, match="low_res"):
            check_recipe(bad)


def test_alternating_flip_shows_each_image_mirrored_in_exactly_one_of_two_epochs():
    imgs, rows = _images(64), np.arange(64)[::-1].copy()
    views = []
    for epoch in range(3):
        flips = presets.alternating_flips(len(imgs), seed=3, epoch=epoch)
        transform = presets.train_transform("padcrop", 2, "zero", flips=flips)
        views.append(transform(imgs[rows], np.random.default_rng(9), rows=rows))  # same translations each time
    plain = presets.padcrop(imgs[rows], np.random.default_rng(9), 2, "zero")
    mirrored = [bool(np.array_equal(views[0][i], plain[i][:, :, ::-1])) and not np.array_equal(plain[i], plain[i][:, :, ::-1])
                for i in range(len(rows))]
    assert 0.3 < np.mean(mirrored) < 0.7  # a random half in the first epoch ...
    np.testing.assert_array_equal(views[1], views[0][:, :, :, ::-1])  # ... every image the other way in the next
    np.testing.assert_array_equal(views[2], views[0])
    with pytest.raises(ValueError, match="padcrop only"):
        presets.train_transform("d2l", flips=flips)


def test_alternating_flip_without_padcrop_is_refused_by_key(prepared, tmp_path):
    proc = run_cli(["train", "--prepared", str(prepared), "--out", str(tmp_path / "r"), "--flip", "alternate"])
    assert proc.returncode == 2 and "key 'flip'" in proc.stderr and not (tmp_path / "r").exists()


def test_whitened_stem_filters_decorrelate_the_training_patches(prepared):
    import mxnet as mx

    import data_prep
    from trainer.config import TrainConfig
    from trainer.train import build_net

    train = data_prep.open_split(prepared, "train", data_prep.read_manifest(prepared))
    net = build_net(TrainConfig(width=8, stem_init="whiten"), 10, mx.cpu(), train.images)
    assert net[0].weight.grad_req == "null" and net[1].gamma.grad_req == "write"  # the stem alone is frozen
    out = net[0](mx.nd.array(presets.normalize(np.asarray(train.images)))).asnumpy()[:, :, 1:-1, 1:-1]
    directions = out[:, :4].transpose(0, 2, 3, 1).reshape(-1, 4).astype(np.float64)
    second_moment = directions.T @ directions / len(directions)  # interior patches, as they were estimated on
    np.testing.assert_allclose(second_moment, np.eye(4), atol=0.02)
    np.testing.assert_array_equal(out[:, 4:], -out[:, :4])  # each direction with its negation
    xavier = build_net(TrainConfig(width=8), 10, mx.cpu(), train.images)
    assert xavier[0].weight.grad_req == "write"


def test_bn_momentum_sets_how_far_one_training_batch_moves_every_running_statistic():
    import mxnet as mx
    from mxnet import autograd

    from trainer.model import from_config

    x = mx.nd.array(presets.normalize(_images(16)))
    for momentum in (0.9, 0.4):
        net = from_config(TrainConfig(width=4, bn_momentum=momentum), 10)
        net.initialize(mx.init.Xavier())
        net(x)  # shapes materialised; inference leaves the running statistics at 0 and 1
        with autograd.record():
            out = net(x)
        out.backward()  # MXNet updates the running statistics with the backward pass
        batch_mean = net[0](x).mean(axis=(0, 2, 3)).asnumpy()
        np.testing.assert_allclose(net[1].running_mean.data().asnumpy(), (1 - momentum) * batch_mean, rtol=1e-4, atol=1e-6)


BUDGETED = ["--width", "4", "--batch-size", "32", "--lr", "0.1", "--schedule", "cosine", "--warmup-epochs", "1",
            "--augment", "padcrop", "--low-res", "16", "--low-res-epochs", "20", "--epochs", "40",
            "--keep-checkpoints", "3", "--threads", "1"]


def _budgeted(prepared: Path, out: Path, seconds: float, *extra: str, ranks: int = 1):
    from conftest import horovodrun

    args = ["--prepared", str(prepared), "--out", str(out), *BUDGETED, "--time-budget", f"{seconds:.6f}", *extra]
    if ranks == 1:
        return run_cli(["train", *args], timeout=600)
    return horovodrun(ranks, ["python", "-m", "trainer", *args], timeout=600, check=False)


def _budget_count(first: dict, ratio: float, spent: float, seconds: float, every: int) -> int:
    """The count the budget must give BUDGETED, worked out here from trainer.budget's documented rule: with `spent`
    seconds gone, epochs 2..n cost the first epoch's seconds each, a 32x32 one its training pass `ratio` times, with
    20 of 40 epochs (at least one) small, and one of epochs 2..n-1 whose number is not a multiple of `every` (not
    validated) the first's validation seconds less; the most that fit, at least 2 (the warmup and one epoch)."""
    def cost(n: int) -> float:
        low = max(1, round(20 * n / 40))
        skipped = sum(1 for number in range(2, n) if number % every)
        return ((n - 1) * first["epoch_seconds"] - skipped * first["valid_seconds"]
                + (n - low) * (ratio - 1) * first["pass_seconds"])

    return max([n for n in range(2, 41) if cost(n) <= seconds - spent], default=2)


@pytest.mark.slow
def test_time_budget_fits_the_epochs_to_the_first_ones_seconds_and_a_resume_keeps_the_count(prepared, tmp_path):
    import json
    import math
    import re

    from trainer import rundir

    # a budget shorter than one epoch: the warmup and one epoch after it
    short = tmp_path / "short"
    proc = _budgeted(prepared, short, 0.001)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first_s = rundir.read_metrics(short)[0]["epoch_seconds"]
    assert len(rundir.read_metrics(short)) == 2
    # forty of them, on two ranks: each measures its own first epoch; rank 0's decides for both; every third
    # epoch validated (and the first and the last), the others costed without the first's validation seconds
    run = tmp_path / "run"
    seconds = 40 * first_s
    proc = _budgeted(prepared, run, seconds, "--valid-every", "3", ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    rows = rundir.read_metrics(run)
    said = re.search(r"time_budget \S+ s: (\S+) s spent, the first epoch \S+ s, so (\d+) epochs, (\d+) of them at "
                     r"16x16 \(a 32x32 epoch takes \S+ s more: its training pass, \S+ s at 16x16, costed at (\S+) "
                     r"times, as a 32x32 step was timed\)", proc.stdout)
    assert said, proc.stdout[-3000:]
    spent, ratio = float(said[1]), float(said[4])
    # the step timing comes before the first epoch and counts; a 32x32 step does 4 times a 16x16 one's arithmetic
    assert rows[0]["pass_seconds"] < rows[0]["epoch_seconds"] < spent < rows[0]["epoch_seconds"] + 60
    assert 1 < ratio < 16
    n = _budget_count(rows[0], ratio, spent, seconds, every=3)
    assert 2 < n < 40 and len(rows) == n and int(said[2]) == n, (n, len(rows), rows[0], spent, seconds)
    assert [r["epoch"] + 1 for r in rows if r["valid_acc"] is not None] == sorted({1, *range(3, n + 1, 3), n})
    assert all(r["valid_seconds"] < 0.01 for r in rows if r["valid_acc"] is None) and rows[0]["valid_seconds"] > 0
    record = json.loads((run / "config.json").read_text())["train"]
    assert (record["epochs"], record["low_res_epochs"], record["time_budget"]) == (n, max(1, round(n / 2)),
                                                                                    pytest.approx(seconds))
    # the cosine schedule decays to the fitted count: the last epoch starts where an n-epoch run's does
    assert rows[-1]["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi * (n - 2) / (n - 1))), rel=1e-6)
    assert f"epoch {n}/{n} " in proc.stdout
    # the last checkpoint lost, then resumed with the same flags but valid_every's (how a run is carried out, free
    # to change): epoch n again, validated as the last, the count not fitted anew
    for f in (run / "checkpoints").glob(f"epoch-{n:04d}.*"):
        f.unlink()
    proc = _budgeted(prepared, run, seconds, "--resume", ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert f"resuming at epoch {n}" in proc.stdout and f"epoch {n}/{n} " in proc.stdout
    assert "s spent, the first epoch" not in proc.stdout and len(rundir.read_metrics(run)) == n
    assert rundir.read_metrics(run)[-1]["valid_acc"] is not None
    # another budget on resume is a change of the run's training: refused without --resume-with-changes
    proc = _budgeted(prepared, run, 2 * seconds, "--resume", "--batch-size", "64")  # one rank, the same global batch
    assert proc.returncode == 2 and "time_budget" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_time_budget_that_holds_every_epoch_trains_exactly_the_run_without_one(prepared, tmp_path):
    # the passes that time a 32x32 step against a 16x16 one leave the parameters and BatchNorm statistics alone
    runs = {}
    for name, extra in (("plain", ["--time-budget", "0"]), ("budgeted", [])):
        out = tmp_path / name
        proc = _budgeted(prepared, out, 1e6, "--epochs", "3", "--low-res-epochs", "1", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = _final(out)
    assert ("time_budget" in (tmp_path / "budgeted" / "config.json").read_text())
    for key, value in runs["plain"].items():
        np.testing.assert_array_equal(runs["budgeted"][key], value, err_msg=key)


def test_time_budget_under_a_decaying_schedule_without_warmup_is_refused_by_key(prepared, tmp_path):
    out = tmp_path / "run"
    proc = _budgeted(prepared, out, 60, "--warmup-epochs", "0")
    assert proc.returncode == 2 and "key 'time_budget'" in proc.stderr and "warmup_epochs" in proc.stderr
    assert not out.exists()
