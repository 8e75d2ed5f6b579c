"""Trainer building blocks on real arrays and files: augmentation, sharding, schedule, checkpoints, metrics."""
from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before anything imports mxnet

import numpy as np
import pytest
from PIL import Image

from trainer import curves, rundir
from trainer import presets as augment
from trainer.config import TrainConfig
from trainer.schedule import base_lr, lr_at
from trainer.sharding import epoch_permutation, eval_slice, steps_per_epoch, train_shard


def test_augment_matches_the_d2l_transform_per_image():
    """Batched result == mxnet's Resize(40) + fixed_crop + flip + ToTensor/Normalize for the same crop."""
    import mxnet as mx
    from mxnet.gluon.data.vision import transforms

    from trainer.presets import MEAN, STD

    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN.tolist(), STD.tolist())])
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    # smooth images too: d2l rounds its 40x40 intermediate to uint8, noise magnifies that
    images[12:] = np.clip(np.cumsum(images[12:] // 16, axis=1), 0, 255)
    rows_k, cols_k = augment.draw_params(rng, len(images))
    got = augment.apply_params(images, rows_k, cols_k)
    inverse = {k: (side, off) for side in range(32, 41) for off in range(41 - side)
               for k in [augment.INDEX[side, off]]}
    for i in range(len(images)):
        side, y0 = inverse[int(rows_k[i])]
        flip = cols_k[i] >= len(augment.ROWS)
        side_x, x0 = inverse[int(cols_k[i] % len(augment.ROWS))]
        assert side_x == side
        big = mx.image.imresize(mx.nd.array(images[i], dtype="uint8"), 40, 40, 1)
        ref = mx.image.fixed_crop(big, x0, y0, side, side, (32, 32), 1)
        if flip:
            ref = mx.nd.flip(ref, axis=1)
        ref = to_tensor(ref).asnumpy()
        # within 1.5 grey levels (d2l's uint8 rounding of the 40x40 image), in normalized units
        assert np.abs(ref - got[i]).max() <= 1.5 / 255 / STD.min(), i


def test_augment_draws_the_d2l_distribution():
    rng = np.random.default_rng(0)
    rows_k, cols_k = augment.draw_params(rng, 20000)
    sides = {int(k): side for side in range(32, 41) for off in range(41 - side) for k in [augment.INDEX[side, off]]}
    side = np.array([sides[int(k)] for k in rows_k])
    assert side.min() == 32 and side.max() == 40
    flips = cols_k >= len(augment.ROWS)
    assert 0.45 < flips.mean() < 0.55
    # area fraction uniform in [0.64, 1]: its mean is 0.82
    assert abs((side.astype(float) ** 2 / 1600).mean() - 0.82) < 0.01
    out = augment.augment(np.zeros((5, 32, 32, 3), np.uint8), rng)
    assert out.shape == (5, 3, 32, 32) and out.dtype == np.float32


def test_augment_is_reproducible_from_its_generator():
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    a = augment.augment(images, np.random.default_rng(5))
    b = augment.augment(images, np.random.default_rng(5))
    c = augment.augment(images, np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("n,batch,size", [(540, 16, 2), (1000, 7, 3), (600, 8, 8), (97, 10, 1)])
def test_train_shards_are_disjoint_and_equal_in_steps(n, batch, size):
    shards = [train_shard(n, batch, r, size, seed=3, epoch=2) for r in range(size)]
    steps = steps_per_epoch(n, batch, size)
    assert steps == n // (batch * size)
    assert all(s.shape == (steps, batch) for s in shards)
    seen = np.concatenate([s.ravel() for s in shards])
    assert len(np.unique(seen)) == len(seen) == steps * batch * size
    assert seen.min() >= 0 and seen.max() < n


def test_epoch_permutation_depends_on_seed_and_epoch_only():
    assert np.array_equal(epoch_permutation(100, 0, 1), epoch_permutation(100, 0, 1))
    assert not np.array_equal(epoch_permutation(100, 0, 1), epoch_permutation(100, 0, 2))
    assert not np.array_equal(epoch_permutation(100, 0, 1), epoch_permutation(100, 1, 1))


@pytest.mark.parametrize("n,size", [(60, 2), (61, 3), (5, 8), (10000, 7)])
def test_eval_slices_tile_the_split(n, size):
    covered = np.concatenate([np.arange(n)[eval_slice(n, r, size)] for r in range(size)])
    assert np.array_equal(covered, np.arange(n))


def test_step_schedule_is_d2ls():
    cfg = TrainConfig(lr=0.1, lr_period=2, lr_decay=0.5, epochs=6)
    assert [lr_at(cfg, e) for e in range(6)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert lr_at(cfg, 1.99) == pytest.approx(0.1)


def test_cosine_and_linear_decay_warmup_and_scaling():
    cfg = TrainConfig(lr=0.2, schedule="cosine", warmup_epochs=2, epochs=12, scale_lr=True)
    assert base_lr(cfg, 4) == pytest.approx(0.8)
    warm = [lr_at(cfg, p, 4) for p in (0, 0.5, 1, 1.5)]
    assert warm[0] > 0 and all(a < b for a, b in zip(warm, warm[1:], strict=False))
    assert lr_at(cfg, 2, 4) == pytest.approx(0.8)
    assert lr_at(cfg, 7, 4) == pytest.approx(0.4)
    assert lr_at(cfg, 12, 4) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(TrainConfig(lr=0.2), 3, 4) == pytest.approx(0.2)  # scale_lr is off by default
    linear = TrainConfig(lr=0.2, schedule="linear", warmup_epochs=2, epochs=12)
    assert [lr_at(linear, p) for p in (2, 4.5, 7, 12, 13)] == pytest.approx([0.2, 0.15, 0.1, 0.0, 0.0])
    assert lr_at(linear, 1) == pytest.approx(lr_at(cfg, 1, 4) / 4)  # the same warmup


def _tiny_net_and_trainer():
    import mxnet as mx
    from mxnet import autograd, gluon

    net = gluon.nn.Dense(3, in_units=4)
    net.initialize(mx.init.Xavier())
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1, "momentum": 0.9})
    with autograd.record():
        loss = net(mx.nd.ones((2, 4))).sum()
    loss.backward()
    trainer.step(2)
    return net, trainer


def test_checkpoints_are_complete_pruned_and_found(tmp_path):
    with pytest.raises(rundir.InputError, match="no model-final.params"):
        rundir.find_model_params(tmp_path)
    net, trainer = _tiny_net_and_trainer()
    for epoch in (1, 2, 3, 4):
        rundir.save_checkpoint(tmp_path, epoch, net, trainer, {"lr": 0.1}, keep=2)
    assert [e for e, _ in rundir.list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        f"epoch-{e:04d}.{s}" for e in (3, 4) for s in ("json", "params", "states")]
    # a checkpoint whose marker never got written is not complete
    (tmp_path / "checkpoints" / "epoch-0005.params").write_bytes(b"partial")
    assert rundir.find_model_params(tmp_path).name == "epoch-0004.params"
    ck, damaged = rundir.intact_checkpoint(tmp_path)
    assert ck.epoch == 4 and ck.record["lr"] == 0.1 and not damaged
    rundir.load_optimizer_state(trainer, ck)
    net.load_parameters(str(ck.path(".params")))
    rundir.atomic_write(tmp_path / "model-final.params", net.save_parameters)
    assert rundir.find_model_params(tmp_path).name == "model-final.params"
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_read_run_config_names_the_file(tmp_path):
    with pytest.raises(rundir.InputError, match="config.json"):
        rundir.read_run_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(rundir.InputError, match="not valid JSON"):
        rundir.read_run_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"classes": ["a"]}))
    assert rundir.read_run_config(tmp_path)["classes"] == ["a"]


def test_metrics_append_truncate_and_plot(tmp_path):
    records = [{"epoch": e, "train_loss": 2.0 - e / 10, "train_acc": e / 10, "valid_acc": e / 12} for e in range(4)]
    for r in records:
        rundir.append_metrics(tmp_path, r)
    with open(tmp_path / rundir.METRICS, "a") as f:
        f.write('{"epoch": 4, "train_lo')  # torn by a kill
    assert rundir.read_metrics(tmp_path) == records
    assert rundir.truncate_metrics(tmp_path, 2) == records[:2]
    assert rundir.read_metrics(tmp_path) == records[:2]
    curves.plot_curves(tmp_path, records[:2] + [dict(records[2], valid_acc=None)])
    with Image.open(tmp_path / rundir.CURVES) as im:
        assert im.format == "PNG" and im.size == (600, 400)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_changes_the_loss_as_computed_by_hand(eps):
    import mxnet as mx

    from trainer.train import make_objective

    rng = np.random.default_rng(3)
    k = 10
    logits = rng.normal(scale=3.0, size=(6, k)).astype(np.float32)
    labels = np.array([0, 3, 9, 3, 1, 7])
    # by hand: cross-entropy of log-softmax against 1 - eps + eps/k on the label and eps/k elsewhere
    z = logits.astype(np.float64)
    log_p = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    target = np.full((6, k), eps / k)
    target[np.arange(6), labels] += 1 - eps
    hand = -(target * log_p).sum(1)
    got = make_objective(k, eps)(mx.nd.array(logits), mx.nd.array(labels, dtype="float32")).asnumpy()
    np.testing.assert_allclose(got, hand, rtol=1e-5)
    plain = -log_p[np.arange(6), labels]
    assert np.allclose(got, plain, rtol=1e-5) == (eps == 0)
