"""The run's exported MXNet graph as ONNX: `cifar10-hvd export --model RUN --onnx OUT.onnx`.

The input is the run directory's self-contained export (model-symbol.json + model-0000.params,
described by model-meta.json: raw uint8 NHWC 32x32 RGB images in, the evaluation view inside,
logits out). MXNet's own translator (mxnet.onnx) converts it at a fixed opset, so the ONNX graph
has the same preprocessing inside: a client feeds uint8 images and argmaxes the logits, with no
project code. The class names and the input contract travel in the model's metadata_props.
onnx and onnxruntime are the `onnx` extra (pip install '.[onnx]').

    cifar10-hvd export --model RUN [--onnx RUN/model.onnx]
    cifar10-hvd export --model RUN --precision int8 --prepared P [--onnx RUN/model-int8.onnx]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np

from contracts.errors import InputError, run_command

ONNX_MODEL = "model.onnx"
OPSET = 13  # MXNet 1.9.1's translators go up to 13; fixed so the file does not change with the onnx package
INPUT_NAME, OUTPUT_NAME = "data", "logits"
MAX_SYMBOL_BYTES = 16 << 20  # a ResNet-18 symbol is ~100 KB; anything far larger is not the run's export
CHECK_ROWS = 8  # random images the export runs through both MXNet and onnxruntime before it is written
CHECK_TOLERANCE = 1e-3  # relative to the logits' scale; float32 reorderings differ by ~1e-6
INSTALL_HINT = "pip install '.[onnx]' (onnx 1.16, onnxruntime 1.19; README 'ONNX export')"

ExportError = InputError  # a run dir export cannot convert (missing files, ops ONNX cannot express): exit 2


def require(module: str):
    """import module (onnx, onnxruntime), or an InputError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ExportError(f"{module} is not installed ({e}); {INSTALL_HINT}") from None


def available() -> bool:
    """Whether onnx can be imported here (the final phase writes model.onnx only then)."""
    try:
        require("onnx")
    except InputError:
        return False
    return True


def read_meta(run_dir: Path) -> dict:
    """model-meta.json, checked against the run record's classes (config.json)."""
    from trainer.config import read_run_record
    from trainer.rundir import MODEL_META, MODEL_PARAMS, MODEL_SYMBOL

    for name in (MODEL_SYMBOL, MODEL_PARAMS, MODEL_META):
        if not (run_dir / name).is_file():
            raise ExportError(f"{run_dir / name}: not found; only a run's final phase exports the model "
                              "(cifar10-hvd train --phase final)")
    try:
        meta = json.loads((run_dir / MODEL_META).read_text())
        classes = read_run_record(run_dir).classes
    except (OSError, ValueError) as e:
        raise ExportError(f"{run_dir / MODEL_META}: unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("classes") != classes:
        raise ExportError(f"{run_dir / MODEL_META}: its classes differ from the run record's {classes}")
    return meta


def supported_ops() -> set[str]:
    """MXNet operators mxnet.onnx can translate at OPSET."""
    from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph

    return {op for version, table in MXNetGraph.registry_.items() if version <= OPSET for op in table}


def check_ops(symbol_path: Path) -> None:
    """ExportError naming every operator of the symbol ONNX cannot express (e.g. MKLDNN int8 subgraphs)."""
    if symbol_path.stat().st_size > MAX_SYMBOL_BYTES:
        raise ExportError(f"{symbol_path}: larger than {MAX_SYMBOL_BYTES >> 20} MiB; not a run's export")
    try:
        nodes = json.loads(symbol_path.read_text())["nodes"]
        ops = {str(n["op"]) for n in nodes}
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{symbol_path}: not an MXNet symbol file: {e}") from None
    missing = sorted(ops - supported_ops())
    if missing:
        hint = " (an int8-quantized MKLDNN graph: export the float32 run instead)" if any(
            "quantize" in op or op.startswith("_sg_") for op in missing) else ""
        raise ExportError(f"{symbol_path}: operators ONNX opset {OPSET} cannot express: {', '.join(missing)}{hint}")


def load_graph(run_dir: Path):
    """(symbol, {name: NDArray}) of the run's export."""
    import mxnet as mx

    from trainer.rundir import MODEL_PARAMS, MODEL_SYMBOL

    try:
        sym = mx.sym.load(str(run_dir / MODEL_SYMBOL))
        saved = mx.nd.load(str(run_dir / MODEL_PARAMS))
    except mx.base.MXNetError as e:
        raise ExportError(f"{run_dir}: cannot load {MODEL_SYMBOL} + {MODEL_PARAMS}: {e}") from None
    if sym.list_arguments()[:1] != [INPUT_NAME]:
        raise ExportError(f"{run_dir / MODEL_SYMBOL}: its first input is not '{INPUT_NAME}'")
    return sym, {k.split(":", 1)[-1]: v for k, v in saved.items()}


def translate(sym, params: dict, where: Path):
    """The ONNX graph (uint8 NHWC input of any batch size) that mxnet.onnx makes of sym at OPSET."""
    from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph
    from onnx import TensorProto

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its per-op notes (e.g. on dot) are for other graphs: the result is checked below
    try:
        return MXNetGraph().create_onnx_graph_proto(
            sym, params, [(1, 32, 32, 3)], [TensorProto.UINT8], opset_version=OPSET, dynamic=True,
            dynamic_input_shapes=[(None, 32, 32, 3)])
    except (AttributeError, KeyError, ValueError, NotImplementedError) as e:
        raise ExportError(f"{where}: mxnet.onnx cannot convert it: {e}") from None
    finally:
        root.setLevel(level)


def finish(graph, meta: dict):
    """The model: weights as initializers only (not inputs), output renamed to logits, metadata, opset."""
    from onnx import helper

    weights = {t.name for t in graph.initializer}
    keep = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(keep)
    (out,) = graph.output
    graph.node.append(helper.make_node("Identity", [out.name], [OUTPUT_NAME], name="logits"))
    out.name = OUTPUT_NAME
    graph.name = "cifar10_hvd_resnet18"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="cifar10-hvd", doc_string=__doc__.split("\n")[0])
    helper.set_model_props(model, metadata(meta))
    return model


def metadata(meta: dict) -> dict[str, str]:
    """metadata_props: the class names (logit order) and the input contract, as JSON strings."""
    contract = {**meta.get("input", {}), "name": INPUT_NAME}
    return {"classes": json.dumps(meta["classes"]), "input": json.dumps(contract),
            "output": json.dumps({"name": OUTPUT_NAME, **meta.get("output", {})}),
            "inside": json.dumps(meta.get("inside", {}))}


def check_against_mxnet(model, run_dir: Path) -> None:
    """Refuse a translation whose logits differ from MXNet's on random images (skipped without onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    import mxnet as mx

    from trainer.rundir import MODEL_PARAMS, MODEL_SYMBOL

    x = np.random.default_rng(0).integers(0, 256, (CHECK_ROWS, 32, 32, 3), dtype=np.uint8)
    with warnings.catch_warnings():  # "cannot decide type for data": the uint8 input, given at the call
        warnings.simplefilter("ignore", UserWarning)
        block = mx.gluon.SymbolBlock.imports(str(run_dir / MODEL_SYMBOL), [INPUT_NAME], str(run_dir / MODEL_PARAMS))
    want = block(mx.nd.array(x, dtype="uint8")).asnumpy()
    got = session(model.SerializeToString(), ort).run(None, {INPUT_NAME: x})[0]
    err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-6))
    if got.shape != want.shape or not err < CHECK_TOLERANCE:
        raise ExportError(f"{run_dir / MODEL_SYMBOL}: the ONNX translation disagrees with MXNet "
                          f"(relative logit error {err:.2g} > {CHECK_TOLERANCE})")


def session(model_bytes: bytes, ort=None, threads: int = 0):
    """A quiet CPU onnxruntime session of the serialized model (threads 0: onnxruntime's default)."""
    if ort is None:
        ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def build(run_dir: str | Path):
    """The checked onnx.ModelProto of RUN's export; ExportError (exit 2) when it cannot be expressed."""
    onnx = require("onnx")
    from trainer.rundir import MODEL_SYMBOL

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    check_ops(run_dir / MODEL_SYMBOL)
    sym, params = load_graph(run_dir)
    model = finish(translate(sym, params, run_dir / MODEL_SYMBOL), meta)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{run_dir / MODEL_SYMBOL}: the ONNX translation fails onnx.checker: {e}") from None
    check_against_mxnet(model, run_dir)
    return model


def export(run_dir: str | Path, out: str | Path | None = None, precision: str = "float32",
           prepared: str | Path | None = None) -> Path:
    """Write RUN's export as ONNX to out (default RUN/model.onnx, or RUN/model-int8.onnx for int8, calibrated
    on prepared's training images), beside and renamed into place."""
    from contracts.files import check_output
    from trainer import onnx_int8

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / (onnx_int8.INT8_MODEL if precision == "int8" else ONNX_MODEL)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: model run dir not found")
    if out.is_dir() or not out.parent.is_dir():
        raise ExportError(f"{out}: --onnx must be a file path in an existing folder")
    check_output(out, "--onnx")
    if precision == "float32":
        return write(build(run_dir), out)
    if precision != "int8" or prepared is None:
        raise ExportError(f"--precision {precision!r}: float32, or int8 with --prepared (the calibration images)")
    require("onnxruntime")
    return onnx_int8.export(run_dir, Path(prepared), out)


def write(model, out: Path) -> Path:
    """model serialized to out, beside and renamed into place (a full disk: exit 2 naming out)."""
    return write_bytes(model.SerializeToString(), out)


def write_bytes(data: bytes, out: Path) -> Path:
    """data to out, beside and renamed into place."""
    from trainer.rundir import write_file

    write_file(out, lambda tmp: Path(tmp).write_bytes(data))
    return out


def export_final(run_dir: str | Path) -> str:
    """The final phase's model.onnx, written when onnx is installed and can express the model; the line to
    log either way. A full disk while writing it is an error (exit 2), as for the rest of the final model."""
    run_dir = Path(run_dir)
    if not available():
        return f"onnx not installed: no {run_dir / ONNX_MODEL} ({INSTALL_HINT}; then cifar10-hvd export --model {run_dir})"
    try:
        model = build(run_dir)
    except InputError as e:
        return f"no {run_dir / ONNX_MODEL}: {e}"
    return f"wrote {write(model, run_dir / ONNX_MODEL)}"


def build_parser() -> argparse.ArgumentParser:
    from contracts.schema import Parser

    p = Parser(prog="cifar10-hvd export", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="trainer run dir with the final phase's export (e.g. WORKDIR/final)")
    p.add_argument("--onnx", default=None,
                   help=f"ONNX file to write (default: MODEL/{ONNX_MODEL}, for int8 MODEL/model-int8.onnx)")
    p.add_argument("--precision", choices=("float32", "int8"), default="float32",
                   help="int8: onnxruntime's static quantization, the graph predict --engine onnxruntime "
                        "--precision int8 runs (needs --prepared)")
    p.add_argument("--prepared", default=None,
                   help="prepared data dir whose first 512 training images calibrate int8")
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.precision == "int8" and args.prepared is None:
        raise ExportError("--precision int8 needs --prepared (its training images calibrate the quantization)")
    out = export(args.model, args.onnx, args.precision, args.prepared)
    kind = "int8, " if args.precision == "int8" else ""
    print(f"export: wrote {out} ({kind}opset {OPSET}; input '{INPUT_NAME}' uint8 N x 32 x 32 x 3, output '{OUTPUT_NAME}')",
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: 0 on success, 2 for input errors."""
    return run_command("export", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
