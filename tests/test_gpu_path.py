"""The GPU path's logic, checked on CPU: copy ring, amp per device, gradient path and compression,
the AMP loss scale through a checkpoint, predict's per-device budget and the compute-capability check."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before anything imports mxnet

import numpy as np
import pytest
from conftest import BIN, horovodrun, run_cli

from contracts.errors import InputError
from launcher.doctor import gpu_report
from trainer import rundir
from trainer.config import TrainConfig, from_mapping
from trainer.cuda_arch import KNOWN_BUILDS, NO_KERNEL, kernel_for, support_problem
from trainer.inference import ACTIVATION_BUDGET, device_budget, forward_rows
from trainer.precision import amp_error, loss_scale_state, restore_loss_scale

CU117 = KNOWN_BUILDS["mxnet-cu117"]


# --- copy ring -------------------------------------------------------------------------------------

def test_cpu_pinned_exists_on_cpu_builds():
    import mxnet as mx

    a = mx.nd.empty((2, 3), ctx=mx.cpu_pinned(0))
    a[:] = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = a.copyto(mx.cpu())
    assert a.context.device_type == "cpu_pinned" and b.context == mx.cpu()
    assert np.array_equal(b.asnumpy(), np.arange(6).reshape(2, 3))


@pytest.mark.parametrize("pinned", [True, False])
def test_ring_returns_batches_in_order_and_cycles_its_slots(pinned):
    """pinned=True is the GPU's two-stage path (pinned slot, then a copy to ctx), run here with ctx = cpu."""
    import mxnet as mx

    from trainer.prefetch import CopyRing

    ring = CopyRing(mx.cpu(), slots=3, pinned=pinned)
    src = np.empty((4, 3, 2, 2), dtype=np.float32)  # one source buffer, rewritten per batch
    out, slots = [], []
    for k in range(8):
        src[...] = k
        out.append(ring.put(src, np.full(4, k, dtype=np.float32)))
        slots.append(id(ring.host[k % 3][0]))
        assert ring.count == k + 1
        for j in range(max(0, k - 2), k + 1):  # every batch holds its values for the next slots - 1 puts
            assert (out[j][0].asnumpy() == j).all() and (out[j][1].asnumpy() == j).all()
    assert slots[:3] == slots[3:6]  # the slots are reused, not reallocated
    assert ring.host[0][0].context == (mx.cpu_pinned(0) if pinned else mx.cpu())
    for k, (x, y) in enumerate(out):
        assert x.context == mx.cpu()
        if pinned:  # each batch has its own device copy: reusing the pinned slot leaves it intact
            assert (x.asnumpy() == k).all() and (y.asnumpy() == k).all()


@pytest.mark.parametrize("pinned", [True, False])
def test_slot_is_not_rewritten_while_a_read_of_it_is_in_flight(pinned):
    """Slow engine ops read slot 0 (as its copy to the device, or on CPU the step, does); reuse must wait for them."""
    import mxnet as mx

    from trainer.prefetch import CopyRing

    ring = CopyRing(mx.cpu(), slots=2, pinned=pinned)
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal((64, 3072)).astype(np.float32) for _ in range(3))
    w = rng.standard_normal((3072, 1024)).astype(np.float32) / 64
    (xa,) = ring.put(a)
    ring.put(b)
    mx.nd.waitall()
    slot = ring.host[0][0]
    W = mx.nd.array(w)
    acc = mx.nd.zeros((64, 1024))
    for _ in range(12):  # ~0.3 s of queued reads of slot 0: still in flight when the ring comes back to it
        acc = acc + mx.nd.dot(slot, W)
    (xc,) = ring.put(c)  # slot 0 again
    assert np.allclose(acc.asnumpy(), 12 * (a @ w), rtol=1e-3, atol=1e-3)
    assert np.array_equal(xc.asnumpy(), c)
    if pinned:
        assert np.array_equal(xa.asnumpy(), a)


def test_staged_queues_batch_k_plus_1_before_yielding_batch_k():
    import mxnet as mx

    from trainer.prefetch import CopyRing, prefetched

    ring = CopyRing(mx.cpu())
    buf = np.empty((2, 3), dtype=np.float32)

    def batches():
        for k in range(5):
            buf[...] = k  # like batched_stream: valid only until the next batch is asked for
            yield buf, np.full(2, k, dtype=np.float32)

    seen = []
    for k, (x, y) in enumerate(prefetched(batches(), ring)):
        assert ring.count == min(k + 2, 5)  # batch k+1 already copied and queued
        seen.append((x.asnumpy()[0, 0], y.asnumpy()[0]))
    assert seen == [(k, k) for k in range(5)]
    nd = [(mx.nd.full((2,), k), mx.nd.full((2,), k)) for k in range(3)]  # d2l's DataLoader batches
    assert [x.asnumpy()[0] for x, _ in prefetched(nd, CopyRing(mx.cpu()))] == [0, 1, 2]


def test_ring_needs_two_slots():
    import mxnet as mx

    from trainer.prefetch import CopyRing

    with pytest.raises(ValueError, match="2 slots"):
        CopyRing(mx.cpu(), slots=1)


# --- config: amp per device, compression ------------------------------------------------------------

@pytest.mark.parametrize("amp, device, ok", [("none", "cpu", True), ("none", "gpu", True), ("float16", "gpu", True),
                                             ("bfloat16", "cpu", True), ("float16", "cpu", False),
                                             ("bfloat16", "gpu", False)])
def test_amp_is_checked_per_device(amp, device, ok):
    err = amp_error(amp, device)
    assert (err is None) == ok
    if not ok:
        assert "'amp'" in err and amp in err and device.upper() in err


def test_train_refuses_float16_on_cpu_before_writing(prepared, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["train", "--prepared", str(prepared), "--out", str(out), "--width", "4", "--amp", "float16"])
    assert proc.returncode == 2 and "'amp'" in proc.stderr and "float16 needs a GPU" in proc.stderr, proc.stderr
    assert not out.exists()


def test_compression_key():
    from trainer.hvd_trainer import COMPRESSIONS, compressor

    assert TrainConfig().compression == "none"
    assert from_mapping(TrainConfig, {"compression": "fp16"}, "x.yaml").compression == "fp16"
    with pytest.raises(InputError, match="'compression'.*x.yaml|x.yaml.*'compression'"):
        from_mapping(TrainConfig, {"compression": "fp8"}, "x.yaml")
    assert compressor("fp16") is COMPRESSIONS["fp16"] and compressor("none") is COMPRESSIONS["none"]


def test_gpu_config_trains_with_amp_float16():
    from launcher.run_config import load_run_config

    cfg = load_run_config(os.path.join(os.path.dirname(__file__), "..", "configs", "gpu-8.yaml"))
    assert cfg.train.amp == "float16" and cfg.train.compression == "none"


# --- gradient path ----------------------------------------------------------------------------------

def test_gradient_path_by_device_type():
    from trainer.hvd_trainer import gradient_path

    assert gradient_path("cpu") == "buffered"
    assert gradient_path("gpu") == "horovod"


GRAD_SCRIPT = """
import mxnet as mx, horovod.mxnet as hvd
from trainer.hvd_trainer import DenseGradTrainer, compressor
hvd.init()
p = mx.gluon.Parameter("w", shape=(4,))
p.initialize(ctx=mx.cpu())
for name in ("none", "fp16"):
    t = DenseGradTrainer({"w": p}, "sgd", {"learning_rate": 0.1}, compression=compressor(name), prefix=name)
    p.list_grad()[0][:] = 1 + 1e-4 * (hvd.rank() + 1)
    t._allreduce_grads()
    print(f"rank {hvd.rank()} {name} {p.list_grad()[0].asnumpy()[0]:.6f}", flush=True)
"""


@pytest.mark.slow
def test_fp16_compression_reaches_the_cpu_allreduce(tmp_path):
    """Sums 1.0001 and 1.0002 (without NCCL, Horovod averages through the trainer's rescale_grad): 2.0003
    without compression, fp16's 2.0 with it (the old override dropped the compression: 2.0003 both times)."""
    script = tmp_path / "grads.py"
    script.write_text(GRAD_SCRIPT)
    proc = horovodrun(2, [str(BIN / "python"), str(script)], timeout=180)
    for rank in (0, 1):
        assert f"rank {rank} none 2.000300" in proc.stdout, proc.stdout + proc.stderr[-2000:]
        assert f"rank {rank} fp16 2.000000" in proc.stdout, proc.stdout + proc.stderr[-2000:]


# --- AMP loss scale through a checkpoint -------------------------------------------------------------

def _amp_trainer():
    """A gluon Trainer with the loss scaler amp.init_trainer attaches (constructed directly: no GPU, no amp.init)."""
    import mxnet as mx
    from mxnet.contrib.amp.loss_scaler import LossScaler

    net = mx.gluon.nn.Dense(3, in_units=2)
    net.initialize()
    trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1, "momentum": 0.9})
    trainer._amp_loss_scaler = LossScaler()
    trainer._amp_original_scale = trainer._scale
    return net, trainer


def test_loss_scale_round_trip_through_a_checkpoint(tmp_path):
    from trainer.device import init_horovod
    from trainer.precision import resume_loss_scale

    hvd = init_horovod()
    net, trainer = _amp_trainer()
    scaler = trainer._amp_loss_scaler
    scaler._loss_scale, scaler._next_loss_scale, scaler._unskipped = 1024.0, 512.0, 17
    rundir.save_checkpoint(tmp_path, 3, net, trainer, {"phase": "tune", "amp_loss_scale": loss_scale_state(trainer)},
                               keep=2)
    ck, _ = rundir.intact_checkpoint(tmp_path)
    _, fresh = _amp_trainer()
    assert fresh._amp_loss_scaler.loss_scale == 2.0 ** 16
    rundir.load_optimizer_state(fresh, ck)
    resume_loss_scale(fresh, ck.record, hvd)
    assert loss_scale_state(fresh) == {"loss_scale": 1024.0, "next_loss_scale": 512.0, "unskipped": 17}
    _, plain = _amp_trainer()
    resume_loss_scale(plain, {"epoch": 3}, hvd)  # a checkpoint from before AMP: the scaler keeps its start
    assert plain._amp_loss_scaler.loss_scale == 2.0 ** 16


def test_loss_scale_state_without_amp_is_none():
    import mxnet as mx

    net = mx.gluon.nn.Dense(2, in_units=2)
    net.initialize()
    trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    assert loss_scale_state(trainer) is None
    restore_loss_scale(trainer, {"loss_scale": 1.0, "next_loss_scale": 1.0, "unskipped": 0})  # no-op, no error


# --- predict budget, overlapped inference loop --------------------------------------------------------

def test_forward_rows_per_device():
    assert forward_rows(512, 64) == 256  # CPU: 64 MB per activation tensor
    assert device_budget("cpu") == ACTIVATION_BUDGET and device_budget("gpu", 0) == ACTIVATION_BUDGET
    assert forward_rows(512, 64, device_budget("gpu", 16 << 30)) == 512  # a 16 GB GPU takes the whole batch
    assert forward_rows(8192, 64, device_budget("gpu", 16 << 30)) == 4096


def test_overlapped_inference_loop_matches_one_forward():
    import mxnet as mx

    from trainer.inference import logit_batches
    from trainer.model import resnet18
    from trainer.presets import eval_transform

    net = resnet18(10, 4)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    images = np.random.default_rng(0).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    want = net(mx.nd.array(eval_transform(images, 36))).asnumpy()
    got = np.concatenate([lg.asnumpy() for _, _, lg in logit_batches(net, images, mx.cpu(), 4, 36)])
    assert np.allclose(got, want, atol=1e-5)


# --- compute capability ------------------------------------------------------------------------------

@pytest.mark.parametrize("cc, target", [((5, 0), "sm_50"), ((5, 2), "sm_50"), ((6, 1), "sm_60"), ((7, 5), "sm_70"),
                                        ((8, 0), "sm_80"), ((8, 6), "sm_86"), ((8, 9), "sm_86"), ((3, 7), None),
                                        ((9, 0), None), ((10, 0), None), ((12, 0), None)])
def test_kernel_for_the_pypi_cu117_build(cc, target):
    assert kernel_for(cc, *CU117) == target


def test_ptx_runs_on_newer_gpus_and_hopper_gets_the_message():
    assert kernel_for((9, 0), ((8, 0),), ((8, 0),)).startswith("compute_80")
    msg = support_problem((9, 0), "NVIDIA H100 80GB HBM3", "mxnet-cu117 1.9.1", CU117)
    assert NO_KERNEL in msg and "9.0" in msg and "mxnet-cu117 1.9.1" in msg and "sm_86" in msg and "no PTX" in msg
    assert support_problem((8, 9), "NVIDIA L4", "mxnet-cu117 1.9.1", CU117) is None
    assert support_problem((9, 0), "H100", "mxnet 1.9.1", None) is None  # unknown build: the runtime probe decides


def test_doctor_reports_capability_and_support():
    lines, problems = gpu_report([("NVIDIA A100", (8, 0)), ("NVIDIA H100", (9, 0))], "mxnet-cu117 1.9.1", CU117)
    assert "sm_50 sm_60 sm_70 sm_80 sm_86 and no PTX" in lines[0]
    assert "compute capability 8.0: runs sm_80" in lines[1] and "compute capability 9.0: no kernels" in lines[2]
    assert len(problems) == 1 and "H100" in problems[0]
    assert gpu_report([], "mxnet 1.9.1", None) == ([], [])


def test_no_gpu_here_is_no_problem():
    import mxnet as mx

    from trainer.cuda_arch import gpu_problem, installed_build, visible_gpus

    assert gpu_problem(mx.cpu()) is None
    assert installed_build()[0].startswith("mxnet")
    assert isinstance(visible_gpus(), list)
