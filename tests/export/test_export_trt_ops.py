"""The static TensorRT-parser check (`caphuman.export.trt_ops`) on hand-built graphs: it accepts what the
support matrix allows and names what it does not."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from caphuman.export.trt_ops import TRT_OPSET_RANGE, TRT_SUPPORTED_OPS, check_model


def _model(nodes, inits=(), opset=17, in_type=TensorProto.FLOAT):
    graph = helper.make_graph(list(nodes), "g", [helper.make_tensor_value_info("x", in_type, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _axes(name="axes", values=(0,)):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def test_matrix_data_is_sane():
    for op in ("Conv", "MatMul", "Softmax", "LayerNormalization", "InstanceNormalization", "Resize", "Where", "Gemm",
               "GroupNormalization", "Erf", "Sigmoid", "Einsum"):
        assert op in TRT_SUPPORTED_OPS
    for op in ("Unique", "SequenceAt", "STFT", "ConvInteger", "Col2Im", "AffineGrid"):
        assert op not in TRT_SUPPORTED_OPS
    assert TRT_OPSET_RANGE == (9, 20)


def test_supported_graph_passes():
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Unsqueeze", ["s", "axes"], ["y"])]
    assert check_model(_model(nodes, [_axes()])) == []
    # a Constant node output counts as constant too
    nodes = [helper.make_node("Constant", [], ["axes"], value=_axes("v")),
             helper.make_node("Unsqueeze", ["x", "axes"], ["y"])]
    assert check_model(_model(nodes)) == []


def test_unsupported_op_and_domain():
    problems = check_model(_model([helper.make_node("Unique", ["x"], ["y"])]))
    assert len(problems) == 1 and "Unique" in str(problems[0])
    problems = check_model(_model([helper.make_node("FusedConv", ["x"], ["y"], domain="com.microsoft")]))
    assert "plugin" in problems[0].reason


def test_non_constant_axes():
    nodes = [helper.make_node("Shape", ["x"], ["shp"]), helper.make_node("Slice", ["x", "st", "en", "shp"], ["y"])]
    inits = [_axes("st", (0,)), _axes("en", (1,))]
    problems = check_model(_model(nodes, inits))
    assert any("input 3" in p.reason for p in problems)


def test_resize_modes_and_opset():
    bad = helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="cubic", coordinate_transformation_mode="tf_crop_and_resize")
    sc = numpy_helper.from_array(np.ones(4, np.float32), "sc")
    reasons = " ".join(p.reason for p in check_model(_model([bad], [sc])))
    assert "cubic" in reasons and "tf_crop_and_resize" in reasons
    good = helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="linear", coordinate_transformation_mode="pytorch_half_pixel")
    assert check_model(_model([good], [sc])) == []
    assert any(p.op_type == "opset" for p in check_model(_model([helper.make_node("Relu", ["x"], ["y"])], opset=21)))


def test_layernorm_extra_outputs_and_io_types():
    ln = helper.make_node("LayerNormalization", ["x", "w"], ["y", "mean"])
    w = numpy_helper.from_array(np.ones(8, np.float32), "w")
    assert any("first output" in p.reason for p in check_model(_model([ln], [w])))
    problems = check_model(_model([helper.make_node("Cast", ["x"], ["y"], to=1)], in_type=TensorProto.DOUBLE))
    assert any("DOUBLE" in p.reason for p in problems)


def test_subgraphs_are_checked():
    then = helper.make_graph([helper.make_node("Unique", ["x"], ["u"])], "then", [],
                             [helper.make_tensor_value_info("u", TensorProto.FLOAT, None)])
    els = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "else", [],
                            [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    cond = numpy_helper.from_array(np.array(True), "c")
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els)
    assert any(p.op_type == "Unique" for p in check_model(_model([node], [cond])))
