"""Static check: every node of an exported graph is one TensorRT's ONNX parser supports.

Source of the data below: onnx/onnx-tensorrt `docs/operators.md` at tag `release/10.1-GA`
(commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c, 2024-06-17), "Supported ONNX Operators":
"TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20". We encode the
operators marked `Y` in its support matrix and the restrictions of that matrix that an exporter
can break (constant `axes` inputs, Resize modes, LayerNormalization's single output, Dropout's
`training_mode`). TensorRT 10.x releases after 10.1 only add operators, so a graph that passes here
parses on every TensorRT 10 release.

    problems = check_graph("unet.onnx")     # [] when TensorRT's parser supports every node
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .extras import require

onnx = require("onnx", "ONNX export and graph checks")

TRT_MATRIX_SOURCE = ("onnx/onnx-tensorrt docs/operators.md @ release/10.1-GA "
                     "(96e781103cfc4adf4a6bb557e94bac8e693f6f4c)")
TRT_OPSET_RANGE = (9, 20)

# Operators marked "Y" in the support matrix (ai.onnx domain).
TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max
MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Inputs the matrix requires to be initializers / build-time constants: op -> input indices.
_CONSTANT_INPUTS = {
    "Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,), "Pad": (3,), "CumSum": (1,), "OneHot": (1,),
    **{op: (1,) for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                           "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
    "Dropout": (2,),
}
_RESIZE_COORD_MODES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_MODES = {"nearest", "linear"}
_TRT_IO_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT32,
                 onnx.TensorProto.INT64, onnx.TensorProto.BOOL, onnx.TensorProto.UINT8, onnx.TensorProto.INT8}


@dataclass(frozen=True)
class OpProblem:
    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op_type} node {self.node!r}: {self.reason}"


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _check_nodes(nodes, constants: set[str], problems: list[OpProblem]) -> None:
    for node in nodes:
        name = node.name or (node.output[0] if node.output else "?")
        if node.domain not in ("", "ai.onnx"):
            problems.append(OpProblem(name, node.op_type, f"custom domain {node.domain!r} needs a TensorRT plugin"))
            continue
        if node.op_type not in TRT_SUPPORTED_OPS:
            problems.append(OpProblem(name, node.op_type, "not supported by TensorRT's ONNX parser"))
            continue
        for idx in _CONSTANT_INPUTS.get(node.op_type, ()):
            if idx < len(node.input) and node.input[idx] and node.input[idx] not in constants:
                problems.append(OpProblem(name, node.op_type, f"input {idx} ({node.input[idx]}) must be an initializer"))
        if node.op_type == "Resize":
            coord = _attr(node, "coordinate_transformation_mode", b"half_pixel")
            mode = _attr(node, "mode", b"nearest")
            coord, mode = (v.decode() if isinstance(v, bytes) else v for v in (coord, mode))
            if coord not in _RESIZE_COORD_MODES:
                problems.append(OpProblem(name, "Resize", f"coordinate_transformation_mode {coord!r} unsupported"))
            if mode not in _RESIZE_MODES:
                problems.append(OpProblem(name, "Resize", f"mode {mode!r} unsupported"))
            if _attr(node, "antialias", 0):
                problems.append(OpProblem(name, "Resize", "antialiasing is not supported"))
        if node.op_type == "LayerNormalization" and any(o for o in node.output[1:]):
            problems.append(OpProblem(name, node.op_type, "only the first output Y is supported"))
        for a in node.attribute:  # If/Loop/Scan bodies
            if a.type == onnx.AttributeProto.GRAPH:
                _check_nodes(a.g.node, constants | {i.name for i in a.g.initializer}, problems)


def check_model(model: onnx.ModelProto) -> list[OpProblem]:
    """Every problem TensorRT 10's ONNX parser would have with this model (empty list: none)."""
    problems: list[OpProblem] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not TRT_OPSET_RANGE[0] <= opset <= TRT_OPSET_RANGE[1]:
        problems.append(OpProblem("<model>", "opset", f"opset {opset} outside TensorRT's {TRT_OPSET_RANGE}"))
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    _check_nodes(model.graph.node, constants, problems)
    for io in list(model.graph.input) + list(model.graph.output):
        t = io.type.tensor_type.elem_type
        if t not in _TRT_IO_TYPES:
            problems.append(OpProblem(io.name, "graph I/O", f"type {onnx.TensorProto.DataType.Name(t)} unsupported"))
    return problems


def check_graph(path: str | Path) -> list[OpProblem]:
    """`check_model` on a file (its external weights are not read: only the graph matters)."""
    return check_model(onnx.load(str(path), load_external_data=False))


def op_types(path: str | Path) -> list[str]:
    return sorted({n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node})
