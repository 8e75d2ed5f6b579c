"""Mixed precision per device, and the AMP loss scale as part of a checkpoint.

MXNet 1.9.1's AMP has float16 kernels on GPU only (on CPU the first convolution fails with
"FP16 gemm on cpu not implemented"), and bfloat16 only through MKLDNN on CPU. The dynamic
loss scale (mxnet.contrib.amp.loss_scaler.LossScaler) lives on the trainer; without saving it
a resumed run starts again at 2^16 and skips steps until it has found its level again.
"""
from __future__ import annotations

AMP_DEVICE = {"float16": "gpu", "bfloat16": "cpu"}
_WHY = {"float16": "MXNet 1.9 has no float16 convolution/GEMM kernels on CPU",
        "bfloat16": "MXNet 1.9's AMP supports bfloat16 on CPU (MKLDNN) only"}


def amp_error(amp: str, device_type: str) -> str | None:
    """Why `amp` cannot run on a device of device_type ('cpu', 'gpu'), or None when it can."""
    want = AMP_DEVICE.get(amp)
    if want is None or want == device_type:
        return None
    other = next(k for k, v in AMP_DEVICE.items() if v == device_type)
    return (f"key 'amp': {amp} needs a {want.upper()} context ({_WHY[amp]}) but this rank runs on "
            f"{device_type.upper()}; use amp: none or amp: {other} here")


def loss_scale_state(trainer) -> dict | None:
    """The AMP loss scaler's state (JSON-ready), or None when the trainer has no AMP loss scaler."""
    scaler = getattr(trainer, "_amp_loss_scaler", None)
    if scaler is None:
        return None
    return {"loss_scale": float(scaler._loss_scale), "next_loss_scale": float(scaler._next_loss_scale),
            "unskipped": int(scaler._unskipped)}


def restore_loss_scale(trainer, state: dict | None) -> None:
    """Put a loss_scale_state() back on the trainer's AMP loss scaler (no-op without either)."""
    scaler = getattr(trainer, "_amp_loss_scaler", None)
    if scaler is None or not state:
        return
    scaler._loss_scale = float(state["loss_scale"])
    scaler._next_loss_scale = float(state["next_loss_scale"])
    scaler._unskipped = int(state["unskipped"])


def resume_loss_scale(trainer, record: dict | None, hvd) -> None:
    """Restore rank 0's checkpointed loss scale (its record's 'amp_loss_scale') on every rank.

    Every rank must use the same scale: overflow checks run on the averaged gradients, so
    equal scales keep every rank's skip decisions, and so the models, identical.
    """
    import mxnet as mx

    from trainer.collectives import broadcast

    if getattr(trainer, "_amp_loss_scaler", None) is None:
        return
    state = (record or {}).get("amp_loss_scale") if hvd.rank() == 0 else None
    values = [state["loss_scale"], state["next_loss_scale"], state["unskipped"]] if state else [0.0, 0.0, 0.0]
    values = broadcast(mx.nd.array(values, dtype="float64"), 0, "amp_loss_scale").asnumpy()
    if values[0] > 0:
        restore_loss_scale(trainer, {"loss_scale": values[0], "next_loss_scale": values[1], "unskipped": values[2]})
