"""Head gradients built as ONNX nodes (realtime_cam.export.head_grad): every VJP against central finite
differences of the original model's logits, realistic heads, the GAP + linear closed form, the real
MobileNetV2 (float and int8), and torch.autograd."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import shared
from onnx import TensorProto, helper, numpy_helper

from realtime_cam.cams import head_gradients
from realtime_cam.errors import ExportError
from realtime_cam.export.head_grad import add_gradient_output
from realtime_cam.export.vjp_ops import VJPS

K = 4  # classes of the read-out that turns any op's output into logits


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def node(op: str, inputs: list[str], out: str | list[str] = "h", **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [out] if isinstance(out, str) else out, **attrs)


class Kit:
    """Random constants in the case's type."""

    def __init__(self, dtype, seed: int = 0):
        self.dtype, self.rng, self.inits = np.dtype(dtype), np.random.default_rng(seed), []

    def w(self, name: str, *shape: int, scale: float = 1.0) -> str:
        return self.c(name, self.rng.standard_normal(shape) * scale)

    def c(self, name: str, value, dtype=None) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype or self.dtype), name))
        return name

    def i(self, name: str, value) -> str:
        return self.c(name, value, np.int64)


def build_model(nodes, inits, dims, dtype, opset=17, output="h") -> onnx.ModelProto:
    """features f [N, *dims] -> nodes -> output ([N, K] logits, or the probed op output of any shape)."""
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    out = helper.make_tensor_value_info(output, t, ["N", None] if output == "logits" else None)
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("f", t, ["N", *dims])], [out],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def with_readout(nodes, kit: Kit, dims, runtime_dims, opset) -> onnx.ModelProto:
    """features f -> op(s) -> h -> Flatten -> MatMul R -> logits [N, K]."""
    t = helper.np_dtype_to_tensor_dtype(kit.dtype)
    probe = build_model(nodes, list(kit.inits), dims, kit.dtype, opset)
    h = session(probe).run(None, {"f": np.zeros((1, *runtime_dims), kit.dtype)})[0]
    kit.w("R", h[0].size, K, scale=1 / np.sqrt(h[0].size))
    nodes = [*nodes, node("Flatten", ["h"], "hf", axis=1), node("MatMul", ["hf", "R"], "logits")]
    model = build_model(nodes, kit.inits, dims, kit.dtype, opset, output="logits")
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("logits", t, ["N", K]))
    return model


def finite_differences(sess, x: np.ndarray, classes: np.ndarray, eps: float) -> np.ndarray:
    """d logits[n, c_n] / d x[n] by central differences; every perturbed copy is one row of one batch."""
    out = np.empty_like(x)
    per = x[0].size
    for n in range(x.shape[0]):
        rows = np.repeat(x[n].reshape(1, per), 2 * per, axis=0)
        rows[np.arange(per), np.arange(per)] += eps
        rows[per + np.arange(per), np.arange(per)] -= eps
        y = sess.run(None, {"f": rows.reshape(2 * per, *x.shape[1:])})[0][:, classes[n]]
        out[n] = ((y[:per] - y[per:]) / (2 * eps)).reshape(x.shape[1:])
    return out


def in_graph(model: onnx.ModelProto, x: np.ndarray, targets, features="f", logits="logits", feed="f"):
    grad_model = add_gradient_output(model, features, logits)
    onnx.checker.check_model(grad_model)
    sess = session(grad_model)
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, {feed: x, "target_class": np.asarray(targets, np.int64)})))
    return out, grad_model


@dataclass(frozen=True)
class Case:
    id: str
    dims: tuple
    build: Callable[[Kit], list]
    dtype: type = np.float64
    opset: int = 17
    kinks: tuple = ()  # inputs are moved away from these points, where the op is not differentiable
    runtime: tuple | None = None  # per-sample shape fed when dims are symbolic
    coarse: bool = False  # float32 inside: finite differences as coarse as float32's


def _bcast(k: Kit):  # b depends on f and broadcasts against it: [N, 2, 1, 4] vs [N, 2, 3, 4]
    return [node("ReduceMean", ["f"], "b", axes=[2], keepdims=1)]


def _dyn(k: Kit):  # the same b, with a shape that shape inference cannot follow (run-time unbroadcast)
    return [*_bcast(k), node("Shape", ["b"], "sb"), node("Max", ["sb", k.i("one", [1])], "sb1"),
            node("Reshape", ["b", "sb1"], "bd")]


def _positive(k: Kit, src="f", out="p"):
    return [node("Abs", [src], "abs_" + out), node("Add", ["abs_" + out, k.c("half_" + out, 0.5)], out)]


def _ln_decomposed(k: Kit):
    return [node("ReduceMean", ["f"], "mu", axes=[-1]), node("Sub", ["f", "mu"], "xc"),
            node("Pow", ["xc", k.c("two", 2.0)], "sq"), node("ReduceMean", ["sq"], "var", axes=[-1]),
            node("Add", ["var", k.c("eps", 1e-5)], "ve"), node("Sqrt", ["ve"], "sd"), node("Div", ["xc", "sd"], "xn"),
            node("Mul", ["xn", k.w("g", 5)], "xs"), node("Add", ["xs", k.w("bb", 5)], "h")]


def _bcast_2d(k: Kit):
    return [node("ReduceMean", ["f"], "b", axes=[1], keepdims=1)]


F32 = np.float32
CASES = [
    # linear layers (Gemm in every transA/transB/alpha/beta form; MatMul 2-D, N-D, both operands dependent)
    Case("gemm", (6,), lambda k: [node("Gemm", ["f", k.w("W", 6, 5), k.w("C", 5)], alpha=0.7, beta=1.3)]),
    Case("gemm_transB", (6,), lambda k: [node("Gemm", ["f", k.w("W", 5, 6), k.w("C", 1, 5)], transB=1)]),
    Case("gemm_transA", (6,), lambda k: [node("Transpose", ["f"], "ft"),
                                         node("Gemm", ["ft", k.w("W", 6, 5)], transA=1, alpha=2.0)]),
    Case("gemm_transA_transB", (6,), lambda k: [node("Transpose", ["f"], "ft"),
                                                node("Gemm", ["ft", k.w("W", 5, 6)], transA=1, transB=1)]),
    Case("gemm_B", (6,), lambda k: [node("Transpose", ["f"], "ft"), node("Gemm", [k.w("W", 5, 6), "ft"], "o"),
                                    node("Transpose", ["o"])]),
    Case("gemm_B_transB", (6,), lambda k: [node("Gemm", [k.w("W", 5, 6), "f"], "o", transB=1, alpha=0.5),
                                           node("Transpose", ["o"])]),
    Case("gemm_B_transA_transB", (6,), lambda k: [node("Gemm", [k.w("W", 6, 5), "f"], "o", transA=1, transB=1),
                                                  node("Transpose", ["o"])]),
    Case("gemm_C_dependent", (6,), lambda k: [node("Gemm", ["f", k.w("W", 6, 6), "f"], beta=0.5)]),
    Case("matmul_2d", (6,), lambda k: [node("MatMul", ["f", k.w("W", 6, 5)])]),
    Case("matmul_nd", (2, 3, 4), lambda k: [node("MatMul", ["f", k.w("W", 4, 5)])]),
    Case("matmul_const_left", (2, 3, 4), lambda k: [node("MatMul", [k.w("W", 5, 3), "f"])]),
    Case("matmul_both", (3, 4), lambda k: [node("Transpose", ["f"], "ft", perm=[0, 2, 1]),
                                           node("MatMul", ["f", "ft"])]),
    Case("matmul_batch_broadcast", (2, 3, 4), lambda k: [node("ReduceMean", ["f"], "a", axes=[1], keepdims=1),
                                                         node("Transpose", ["f"], "ft", perm=[0, 1, 3, 2]),
                                                         node("MatMul", ["a", "ft"])]),
    # elementwise, with the broadcasting cases
    Case("add_const", (2, 3), lambda k: [node("Add", ["f", k.w("C", 3)])]),
    Case("add_bcast", (2, 3, 4), lambda k: [*_bcast(k), node("Add", ["f", "b"])]),
    Case("sub_bcast", (2, 3, 4), lambda k: [*_bcast(k), node("Sub", ["b", "f"])]),
    Case("mul_bcast", (2, 3, 4), lambda k: [*_bcast(k), node("Mul", ["f", "b"])]),
    Case("mul_bcast_runtime", (2, 3, 4), lambda k: [*_dyn(k), node("Mul", ["f", "bd"])]),
    Case("add_bcast_runtime_rank", (2, 3, 4), lambda k: [*_dyn(k), node("Squeeze", ["bd", k.i("s", [2])], "b3"),
                                                         node("Unsqueeze", ["b3", k.i("u", [2])], "b4"),
                                                         node("Add", ["f", "b4"])]),
    Case("div_bcast", (2, 3, 4), lambda k: [*_bcast(k), *_positive(k, "b"), node("Div", ["f", "p"])]),
    Case("div_const", (2, 3), lambda k: [*_positive(k), node("Div", [k.w("C", 3), "p"])], kinks=(0,)),
    Case("neg_sum", (2, 3), lambda k: [node("Neg", ["f"], "n"), node("Sum", ["f", "n", "f", k.w("C", 3)])]),
    Case("where", (2, 3), lambda k: [*_bcast_2d(k), node("Where", [k.c("m", [True, False, True], bool), "f", "b"])]),
    Case("pow_const", (2, 3), lambda k: [*_positive(k), node("Pow", ["p", k.c("e", 3.0)])], kinks=(0,)),
    Case("pow_const_per_channel", (2, 3), lambda k: [*_positive(k), node("Pow", ["p", k.c("e", [0.5, 2.0, -1.0])])],
         kinks=(0,)),
    Case("pow_exponent", (2, 3), lambda k: [node("Pow", [k.c("base", 1.7), "f"])]),
    Case("sqrt", (2, 3), lambda k: [*_positive(k), node("Sqrt", ["p"])], kinks=(0,)),
    Case("exp_log", (2, 3), lambda k: [*_positive(k), node("Log", ["p"], "lg"), node("Exp", ["f"], "ex"),
                                       node("Add", ["lg", "ex"])], kinks=(0,)),
    Case("reciprocal", (2, 3), lambda k: [*_positive(k), node("Reciprocal", ["p"])], kinks=(0,)),
    Case("relu", (2, 3), lambda k: [node("Relu", ["f"])], kinks=(0,)),
    Case("leaky_relu", (2, 3), lambda k: [node("LeakyRelu", ["f"], alpha=0.1)], kinks=(0,)),
    Case("prelu", (2, 3), lambda k: [node("PRelu", ["f", k.w("s", 2, 1)])], kinks=(0,)),
    Case("elu", (2, 3), lambda k: [node("Elu", ["f"], alpha=0.8)], F32, kinks=(0,)),
    Case("clip_inputs", (2, 3), lambda k: [node("Clip", ["f", k.c("lo", -0.5), k.c("hi", 0.7)])], kinks=(-0.5, 0.7)),
    Case("clip_max_only", (2, 3), lambda k: [node("Clip", ["f", "", k.c("hi", 0.3)])], kinks=(0.3,)),
    Case("clip_attributes_opset10", (2, 3), lambda k: [node("Clip", ["f"], min=-0.5, max=0.7)], dtype=F32, opset=10,
         kinks=(-0.5, 0.7)),
    Case("sigmoid_tanh", (2, 3), lambda k: [node("Sigmoid", ["f"], "s"), node("Tanh", ["f"], "t"),
                                            node("Sum", ["s", "t"])]),
    Case("softplus", (2, 3), lambda k: [node("Softplus", ["f"])], F32),
    Case("hardsigmoid", (2, 3), lambda k: [node("HardSigmoid", ["f"], alpha=0.3, beta=0.4)], F32, kinks=(-4 / 3, 2)),
    Case("hardswish", (2, 3), lambda k: [node("HardSwish", ["f"])], F32, kinks=(-3, 3)),
    Case("erf", (2, 3), lambda k: [node("Erf", ["f"])], F32),
    Case("gelu", (2, 3), lambda k: [node("Gelu", ["f"])], F32, opset=20),
    Case("gelu_tanh", (2, 3), lambda k: [node("Gelu", ["f"], approximate="tanh")], F32, opset=20),
    # normalisations and reductions
    Case("softmax_last", (3, 4), lambda k: [node("Softmax", ["f"])]),
    Case("softmax_axis1", (3, 4), lambda k: [node("Softmax", ["f"], axis=1)]),
    Case("logsoftmax", (3, 4), lambda k: [node("LogSoftmax", ["f"], axis=1)]),
    Case("layernorm_last", (4, 5), lambda k: [node("LayerNormalization", ["f", k.w("g", 5), k.w("b", 5)])]),
    Case("layernorm_axis1", (4, 5), lambda k: [node("LayerNormalization", ["f", k.w("g", 4, 5)], axis=1)]),
    Case("layernorm_opset18", (4, 5), lambda k: [node("LayerNormalization", ["f", k.w("g", 5)])], opset=18),
    Case("layernorm_decomposed", (4, 5), _ln_decomposed),
    Case("batchnorm", (3, 2, 2), lambda k: [node("BatchNormalization", ["f", k.w("s", 3), k.w("b", 3), k.w("m", 3),
                                                                          k.c("v", [0.5, 1.5, 2.0])], epsilon=1e-3)]),
    Case("reducemean_keepdims0", (2, 3, 4), lambda k: [node("ReduceMean", ["f"], axes=[1, -1], keepdims=0)]),
    Case("reducemean_opset18_input", (2, 3, 4), lambda k: [node("ReduceMean", ["f", k.i("a", [2])], keepdims=0)],
         opset=18),
    Case("reducesum", (2, 3, 4), lambda k: [node("ReduceSum", ["f", k.i("a", [1, 3])])]),
    Case("reducesum_noop", (2, 3), lambda k: [node("ReduceSum", ["f"], "s", noop_with_empty_axes=1),
                                              node("Mul", ["f", "s"])]),
    Case("reducemax_min", (2, 3, 4), lambda k: [node("ReduceMax", ["f"], "a", axes=[2], keepdims=0),
                                                node("ReduceMin", ["f"], "b", axes=[1]),
                                                node("Flatten", ["b"], "bf"), node("Flatten", ["a"], "af"),
                                                node("Concat", ["af", "bf"], axis=1)]),
    # pooling
    Case("global_average_pool", (3, 4, 5), lambda k: [node("GlobalAveragePool", ["f"])], F32),
    Case("global_max_pool", (3, 4, 5), lambda k: [node("GlobalMaxPool", ["f"])], F32),
    Case("average_pool_whole_map", (3, 4, 4), lambda k: [node("AveragePool", ["f"], kernel_shape=[4, 4])], F32),
    Case("average_pool_2x2", (2, 4, 6), lambda k: [node("AveragePool", ["f"], kernel_shape=[2, 2], strides=[2, 2])],
         F32),
    Case("average_pool_pad_exclude", (2, 5, 6), lambda k: [node("AveragePool", ["f"], kernel_shape=[3, 3],
                                                                strides=[2, 2], pads=[1, 1, 1, 1])], F32),
    Case("average_pool_pad_include", (2, 5, 6), lambda k: [node("AveragePool", ["f"], kernel_shape=[3, 2],
                                                                strides=[2, 1], pads=[1, 0, 1, 1],
                                                                count_include_pad=1)], F32),
    Case("average_pool_same_upper", (2, 5, 5), lambda k: [node("AveragePool", ["f"], kernel_shape=[2, 2],
                                                               strides=[2, 2], auto_pad="SAME_UPPER")], F32),
    Case("average_pool_runtime_size", (2, "H", "W"), lambda k: [node("AveragePool", ["f"], kernel_shape=[3, 3],
                                                                     strides=[2, 2], pads=[1, 1, 1, 1])], F32,
         runtime=(2, 5, 6)),
    Case("average_pool_1d", (2, 7), lambda k: [node("AveragePool", ["f"], kernel_shape=[3], strides=[2])], F32),
    Case("max_pool_2x2", (2, 4, 4), lambda k: [node("MaxPool", ["f"], kernel_shape=[2, 2], strides=[2, 2])]),
    Case("max_pool_with_indices", (2, 4, 4), lambda k: [node("MaxPool", ["f"], ["h", "idx"], kernel_shape=[3, 3])]),
    Case("average_pool_ceil_same_size", (2, 5, 5), lambda k: [node("AveragePool", ["f"], kernel_shape=[3, 3],
                                                                   strides=[2, 2], ceil_mode=1)], F32),
    Case("max_pool_overlap_pad", (2, 5, 5), lambda k: [node("MaxPool", ["f"], kernel_shape=[3, 3], strides=[2, 2],
                                                            pads=[1, 1, 1, 1])]),
    Case("max_pool_dilated_ceil", (2, 6, 6), lambda k: [node("MaxPool", ["f"], kernel_shape=[2, 2], strides=[2, 2],
                                                             dilations=[2, 2], ceil_mode=1)]),
    # shape-only ops
    Case("flatten_reshape", (2, 3, 2), lambda k: [node("Flatten", ["f"], "a", axis=1),
                                                  node("Reshape", ["a", k.i("s", [0, 3, -1])])]),
    Case("squeeze_unsqueeze", (1, 3), lambda k: [node("Squeeze", ["f", k.i("a", [1])], "s"),
                                                 node("Unsqueeze", ["s", k.i("b", [1, 3])])]),
    Case("transpose", (2, 3, 4), lambda k: [node("Transpose", ["f"], perm=[0, 3, 1, 2])]),
    Case("concat_split", (2, 3), lambda k: [node("Mul", ["f", k.w("C", 3)], "fc"),
                                            node("Concat", ["f", "fc", "f"], "cat", axis=-2),
                                            node("Split", ["cat", k.i("s", [1, 3, 2])], ["a", "b", "unused"], axis=1),
                                            node("Mul", ["a", "b"])]),
    Case("concat_runtime_size", ("A", 3), lambda k: [node("Concat", ["f", "f"], axis=1)], runtime=(2, 3)),
    Case("slice_steps", (5, 6), lambda k: [node("Slice", ["f", k.i("st", [4, 1]), k.i("en", [0, 100]),
                                                          k.i("ax", [1, 2]), k.i("sp", [-2, 2])])]),
    Case("gather_repeated", (5, 3), lambda k: [node("Gather", ["f", k.i("ix", [3, 0, 3, -1])], axis=1)]),
    Case("gather_scalar_token", (5, 3), lambda k: [node("Gather", ["f", k.i("ix", 0)], axis=1)]),
    Case("gather_elements", (2, 3), lambda k: [
        node("Shape", ["f"], "n", end=1), node("Concat", ["n", k.i("s", [2, 3])], "sh", axis=0),
        node("Expand", [k.i("ix", [[[0, 0, 1], [1, 1, 1]]]), "sh"], "ixn"),
        node("GatherElements", ["f", "ixn"], axis=1)]),
    Case("gather_nd_batched", (3, 2), lambda k: [
        node("Shape", ["f"], "n", end=1), node("Concat", ["n", k.i("s", [2, 1])], "sh", axis=0),
        node("Expand", [k.i("ix", [[[2], [0]]]), "sh"], "ixn"), node("GatherND", ["f", "ixn"], batch_dims=1)]),
    Case("tile_expand", (2, 1), lambda k: [node("Tile", ["f", k.i("r", [1, 1, 3])], "t"),
                                           node("Expand", ["f", k.i("s", [1, 2, 3])], "e"),
                                           node("Concat", ["t", "e"], axis=2)]),
    Case("pad", (2, 3), lambda k: [node("Pad", ["f", k.i("p", [0, 1, 0, 0, 2, 1])])]),
    Case("pad_crop_runtime_pads", (3, 4), lambda k: [node("Max", [k.i("p", [0, 1, -1, 0, -1, 2]), k.i("lo", -5)], "pr"),
                                                     node("Pad", ["f", "pr"])]),
    Case("identity_dropout_cast", (2, 3), lambda k: [node("Identity", ["f"], "i"), node("Dropout", ["i"], "d"),
                                                     node("Cast", ["d"], "c32", to=TensorProto.FLOAT),
                                                     node("Cast", ["c32"], to=TensorProto.DOUBLE)],
         coarse=True),
    # convolutions
    Case("conv_3x3_pad", (2, 5, 5), lambda k: [node("Conv", ["f", k.w("W", 3, 2, 3, 3), k.w("B", 3)], pads=[1] * 4)],
         F32),
    Case("conv_stride2_even", (2, 6, 5), lambda k: [node("Conv", ["f", k.w("W", 3, 2, 3, 3)], strides=[2, 2],
                                                         pads=[1, 1, 1, 1])], F32),
    Case("conv_depthwise_dilated", (4, 7, 7), lambda k: [node("Conv", ["f", k.w("W", 4, 1, 3, 3)], group=4,
                                                              dilations=[2, 2], pads=[2, 1, 2, 0])], F32),
    Case("conv_grouped_asym", (4, 6, 5), lambda k: [node("Conv", ["f", k.w("W", 6, 2, 2, 3)], group=2,
                                                         strides=[2, 3])], F32),
    Case("conv_same_lower", (2, 5, 6), lambda k: [node("Conv", ["f", k.w("W", 2, 2, 2, 2)], strides=[2, 2],
                                                       auto_pad="SAME_LOWER")], F32),
    Case("conv_runtime_size", (2, "H", "W"), lambda k: [node("Conv", ["f", k.w("W", 3, 2, 3, 3)], strides=[2, 2],
                                                              pads=[1, 1, 1, 1])], F32, runtime=(2, 6, 5)),
    Case("conv_1d", (2, 9), lambda k: [node("Conv", ["f", k.w("W", 3, 2, 3)], strides=[2])], F32),
]


def _features(case: Case, n: int, seed: int) -> np.ndarray:
    dims = case.runtime or case.dims
    rng = np.random.default_rng(seed)
    if case.id.startswith("max_pool") or case.id.startswith("reducemax") or case.id == "global_max_pool":
        x = rng.permutation(n * int(np.prod(dims))).reshape(n, *dims) * 0.05  # no ties, gaps >> eps
        return (x - x.mean()).astype(case.dtype)
    x = rng.standard_normal((n, *dims))
    for kink in case.kinks:  # keep FD steps on one side of each kink
        near = np.abs(x - kink) < 0.1
        x[near] = kink + np.where(x[near] >= kink, 0.1, -0.1)
    return x.astype(case.dtype)


@pytest.mark.parametrize("n, targets", [(1, [-1]), (3, [-1, 0, 2])], ids=["N1", "N3"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_vjp_matches_finite_differences(case: Case, n: int, targets):
    kit = Kit(case.dtype, seed=len(case.id))
    nodes = case.build(kit)
    model = with_readout(nodes, kit, case.dims, case.runtime or case.dims, case.opset)
    x = _features(case, n, seed=n)
    out, _ = in_graph(model, x, targets)
    logits = session(model).run(None, {"f": x})[0]
    expected_class = [int(np.argmax(logits[i])) if t < 0 else t for i, t in enumerate(targets)]
    assert out["grads_class"].tolist() == expected_class
    assert out["grads"].shape == x.shape and out["grads"].dtype == x.dtype
    precise = case.dtype == np.float64 and not case.coarse
    fd = finite_differences(session(model), x, np.array(expected_class), 1e-6 if precise else 1e-2)
    tol = (1e-6 if precise else 2e-3) * max(1.0, float(np.abs(fd).max()))
    np.testing.assert_allclose(out["grads"], fd, rtol=0, atol=tol)


def test_quantize_dequantize_is_straight_through():
    # d(DQ(Q(f)) * f)/df with the pair taken as the identity: dq + f, times the read-out's column.
    kit = Kit(F32)
    nodes = [node("QuantizeLinear", ["f", kit.c("qs", 0.02), kit.c("qz", 0, np.int8)], "q"),
             node("DequantizeLinear", ["q", "qs", "qz"], "dq"), node("Mul", ["dq", "f"])]
    model = with_readout(nodes, kit, (2, 3), (2, 3), 17)
    x = np.random.default_rng(0).standard_normal((3, 2, 3)).astype(F32)
    out, _ = in_graph(model, x, [1, 0, 3])
    readout = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "R"))
    dq = np.clip(np.round(x / 0.02), -128, 127) * 0.02
    expected = readout.T[[1, 0, 3]].reshape(x.shape) * (dq + x)
    np.testing.assert_allclose(out["grads"], expected, rtol=1e-5, atol=1e-6)


def _check_against_fd(model, x, targets, precise: bool):
    out, _ = in_graph(model, x, targets)
    fd = finite_differences(session(model), x, out["grads_class"], 1e-6 if precise else 1e-2)
    tol = (1e-6 if precise else 2e-3) * max(1.0, float(np.abs(fd).max()))
    np.testing.assert_allclose(out["grads"], fd, rtol=0, atol=tol)
    return out


@pytest.mark.parametrize("activation", ["HardSwish", "Relu"])
def test_mlp_head_like_mobilenet_v3(activation):
    # GAP -> Flatten -> Gemm -> HardSwish/Relu -> Dropout -> Gemm, the head of mobilenet_v3_*.
    kit = Kit(F32, seed=3)
    nodes = [node("GlobalAveragePool", ["f"], "p"), node("Flatten", ["p"], "v"),
             node("Gemm", ["v", kit.w("W1", 16, 8), kit.w("b1", 16)], "z", transB=1),
             node(activation, ["z"], "a"), node("Dropout", ["a"], "d"),
             node("Gemm", ["d", kit.w("W2", 5, 16), kit.w("b2", 5)], "logits", transB=1)]
    model = build_model(nodes, kit.inits, (8, 4, 4), F32, output="logits")
    x = np.random.default_rng(4).standard_normal((3, 8, 4, 4)).astype(F32) * 4
    _check_against_fd(model, x, [-1, 4, 1], precise=False)


def test_token_head_like_vit():
    # LayerNormalization over [N, T, C] -> the class token -> Gemm, the head of torchvision's vit_*.
    kit = Kit(np.float64, seed=5)
    nodes = [node("LayerNormalization", ["f", kit.w("g", 6), kit.w("b", 6)], "n", epsilon=1e-6),
             node("Gather", ["n", kit.i("cls", 0)], "t", axis=1),
             node("Gemm", ["t", kit.w("W", 4, 6), kit.w("c", 4)], "logits", transB=1)]
    model = build_model(nodes, kit.inits, (5, 6), np.float64, output="logits")
    x = np.random.default_rng(6).standard_normal((3, 5, 6))
    out = _check_against_fd(model, x, [2, -1, 0], precise=True)
    assert np.abs(out["grads"][:, 1:]).max() == 0  # only the class token reaches the logits


def test_gap_linear_gradient_is_the_closed_form():
    kit = Kit(F32, seed=7)
    nodes = [node("GlobalAveragePool", ["f"], "p"), node("Flatten", ["p"], "v"),
             node("Gemm", ["v", kit.w("W", 10, 16), kit.w("b", 10)], "logits", transB=1)]
    model = build_model(nodes, kit.inits, (16, 5, 7), F32, output="logits")
    weight = numpy_helper.to_array(kit.inits[0])
    x = np.random.default_rng(8).random((2, 16, 5, 7)).astype(F32)
    out, _ = in_graph(model, x, [-1, 9])
    for n, c in enumerate(out["grads_class"]):
        closed = np.broadcast_to(head_gradients(x[n], weight, int(c)), x[n].shape)
        np.testing.assert_allclose(out["grads"][n], closed, rtol=1e-5, atol=1e-7)


def _gap_input(model: onnx.ModelProto) -> str:
    return next(n.input[0] for n in model.graph.node if n.op_type.endswith("GlobalAveragePool"))


@pytest.mark.parametrize("name", ["mobilenetv2-12-float-from-int8.onnx", "mobilenetv2-12-int8.onnx"])
def test_real_mobilenet_v2_gradients_equal_the_closed_form(name):
    model = onnx.load(shared("models", name))
    features = _gap_input(model)  # '627' (float) or '627_quantized' (uint8: gradients in real-value units)
    x = np.random.default_rng(9).random((2, 3, 224, 224)).astype(F32)
    out, _ = in_graph(model, x, [-1, 281], features=features, logits="output", feed="input")
    assert out["grads"].shape == (2, 1280, 7, 7) and out["grads"].dtype == np.float32
    assert out["grads_class"].tolist() == [int(np.argmax(out["output"][0])), 281]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    if "classifier.1.weight" in inits:
        weight_kc = inits["classifier.1.weight"].T  # MatMul's B is [C, K]
    else:
        q, scale, zero = (inits[f"classifier.1.weight_{s}"] for s in ("quantized", "scale", "zero_point"))
        weight_kc = ((q.astype(np.float64) - zero) * scale).T
    for n, c in enumerate(out["grads_class"]):
        closed = np.broadcast_to(head_gradients(np.zeros((1280, 7, 7), F32), weight_kc, int(c)), (1280, 7, 7))
        np.testing.assert_allclose(out["grads"][n], closed, rtol=1e-5, atol=1e-8)


def _mlp_head(k: Kit) -> list[onnx.NodeProto]:
    return [node("Relu", ["c1"], "a"),
            node("Conv", ["a", k.w("W2", 8, 8, 3, 3, scale=0.2), k.w("b2", 8)], "c2", pads=[1] * 4),
            node("Relu", ["c2"], "r2"), node("GlobalAveragePool", ["r2"], "p"), node("Flatten", ["p"], "v"),
            node("Gemm", ["v", k.w("W3", 16, 8), k.w("b3", 16)], "z", transB=1), node("Relu", ["z"], "y"),
            node("Gemm", ["y", k.w("W4", 5, 16), k.w("b4", 5)], "logits", transB=1)]


def _mixed_head(k: Kit) -> list[onnx.NodeProto]:
    return [node("Sigmoid", ["c1"], "s"), node("Mul", ["s", "c1"], "m"),
            node("AveragePool", ["m"], "ap", kernel_shape=[2, 2], strides=[2, 2]),
            node("LeakyRelu", ["ap"], "lr", alpha=0.5), node("Concat", ["lr", "ap"], "cat", axis=1),
            node("Add", ["cat", "cat"], "dbl"), node("GlobalAveragePool", ["dbl"], "p"), node("Flatten", ["p"], "v"),
            node("MatMul", ["v", k.w("W3", 16, 5, scale=0.3)], "z"), node("Softmax", ["z"], "logits")]


@pytest.mark.parametrize("head, features, qlinear_ops", [
    (_mlp_head, ("a", "c1_quantized", "a_DequantizeLinear_Output"),
     {"QLinearConv", "QLinearGlobalAveragePool", "QGemm"}),
    (_mixed_head, ("c1", "c1_quantized", "c1_DequantizeLinear_Output"),
     {"QLinearSigmoid", "QLinearMul", "QLinearAveragePool", "QLinearLeakyRelu", "QLinearConcat", "QLinearAdd",
      "QLinearMatMul", "QLinearSoftmax"}),
], ids=["mlp", "mixed"])
def test_quantized_heads_follow_the_float_model(tmp_path, head, features, qlinear_ops):
    # ONNX Runtime quantizes the model (QOperator: QLinear* ops, ReLUs fused away; QDQ: Q/DQ pairs around
    # float ops). The in-graph gradients must stay close to the float model's: within 25% of its largest
    # gradient everywhere and Pearson r >= 0.99 (measured: 5-16% and r >= 0.998; the error comes from
    # activation quantization and from ReLUs/LeakyReLUs whose input rounds to the other side of zero).
    quantization = pytest.importorskip("onnxruntime.quantization")
    kit = Kit(F32, seed=11)
    first = node("Conv", ["f", kit.w("W1", 8, 4, 3, 3, scale=0.3), kit.w("b1", 8)], "c1", pads=[1] * 4)
    model = build_model([first, *head(kit)], kit.inits, (4, 6, 6), F32, output="logits")
    onnx.save(model, tmp_path / "float.onnx")
    x = np.random.default_rng(13).standard_normal((3, 4, 6, 6)).astype(F32)
    reference, _ = in_graph(model, x, [0, 3, 4], features=features[0])

    class Calibration(quantization.CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(12)
            self.batches = iter([{"f": rng.standard_normal((1, 4, 6, 6)).astype(F32)} for _ in range(32)])

        def get_next(self):
            return next(self.batches, None)

    for fmt, name in (("QOperator", features[1]), ("QDQ", features[2])):
        path = tmp_path / f"{fmt}.onnx"
        quantization.quantize_static(tmp_path / "float.onnx", path, Calibration(), per_channel=True,
                                     quant_format=getattr(quantization.QuantFormat, fmt))
        quantized = onnx.load(path)
        out, _ = in_graph(quantized, x, [0, 3, 4], features=name)
        if fmt == "QOperator":
            ops = {n.op_type for n in quantized.graph.node}
            assert qlinear_ops <= ops and "Relu" not in ops
        scale = np.abs(reference["grads"]).max()
        assert np.abs(out["grads"] - reference["grads"]).max() <= 0.25 * scale, fmt
        assert np.corrcoef(out["grads"].ravel(), reference["grads"].ravel())[0, 1] >= 0.99, fmt


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.onnx's TorchScript exporter, used on purpose
def test_torch_autograd_agrees():
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Conv2d(6, 8, 3, stride=2, padding=1)
            self.l1, self.l2 = torch.nn.Linear(8, 12), torch.nn.Linear(12, 5)

        def forward(self, x):
            features = torch.relu(self.c2(torch.relu(self.c1(x))))
            pooled = torch.nn.functional.adaptive_avg_pool2d(features, 1).flatten(1)
            return self.l2(torch.relu(self.l1(pooled))), features

    torch.manual_seed(0)
    net = Net().eval()
    buffer = io.BytesIO()
    torch.onnx.export(net, torch.randn(1, 3, 10, 10), buffer, dynamo=False, input_names=["input"],
                      output_names=["logits", "features"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}, "features": {0: "N"}})
    model = onnx.load_from_string(buffer.getvalue())
    x = torch.randn(3, 3, 10, 10)
    out, _ = in_graph(model, x.numpy(), [-1, 2, 4], features="features", logits="logits", feed="input")
    logits, features = net(x)
    classes = torch.as_tensor(out["grads_class"])
    (expected,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), features)
    assert classes[0].item() == logits[0].argmax().item()
    np.testing.assert_allclose(out["grads"], expected.numpy(), rtol=1e-4, atol=1e-6)


def _tiny_family(name: str, torch, models):
    """A small seeded torchvision network of a family, and pytorch-grad-cam's usual target layer in it."""
    if name == "mobilenet_v3_small":  # squeeze-excitation (HardSigmoid * x) blocks, then the MLP head
        net = models.mobilenet_v3_small(num_classes=10)
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        return net, net.features[9], 64
    if name == "convnext":  # depthwise 7x7 conv, channels-last LayerNorm, Gelu, layer scale
        block = models.convnext.CNBlockConfig
        net = models.convnext.ConvNeXt([block(8, 16, 1), block(16, None, 1)], num_classes=10)
        return net, net.features[1], 32
    if name == "vit":  # tokens [N, 1 + 16, C] through attention, MLP, norms and the class-token head
        net = models.vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                          hidden_dim=16, mlp_dim=32, num_classes=10)
        torch.nn.init.normal_(net.heads.head.weight)  # torchvision starts it at zero: no gradient at all
        return net, net.encoder.layers[-1].ln_1, 32
    net = models.swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                                                  window_size=[2, 2], num_classes=10)
    return net, net.features[-1][-1].norm1, 32  # [N, H, W, C]: shifted windows, padding, relative bias


@pytest.mark.filterwarnings("ignore")  # the TorchScript exporter's deprecation and tracer warnings
@pytest.mark.parametrize("family", ["mobilenet_v3_small", "convnext", "vit", "swin"])
def test_torchvision_families_agree_with_torch_autograd(family):
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    net, layer, size = _tiny_family(family, torch, models)
    from realtime_cam.export.torchvision_graph import WithTarget

    wrapped = WithTarget(net, layer).eval()
    buffer = io.BytesIO()
    torch.onnx.export(wrapped, torch.randn(1, 3, size, size), buffer, dynamo=False, input_names=["input"],
                      output_names=["logits", "features"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}, "features": {0: "N"}})
    x = torch.randn(2, 3, size, size)
    out, _ = in_graph(onnx.load_from_string(buffer.getvalue()), x.numpy(), [-1, 7], features="features",
                      logits="logits", feed="input")
    logits, features = wrapped(x)
    classes = torch.as_tensor(out["grads_class"])
    (expected,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), features)
    scale = float(expected.abs().max())
    assert scale > 0
    np.testing.assert_allclose(out["grads"], expected.numpy(), rtol=1e-4, atol=1e-5 * scale)


def _head_with(extra: list[onnx.NodeProto], kit: Kit) -> onnx.ModelProto:
    nodes = [*extra, node("Gemm", ["u", kit.w("W", 4, 3)], "logits", transB=1)]
    return build_model(nodes, kit.inits, (3,), F32, output="logits")


@pytest.mark.parametrize("op, extra", [
    ("TopK", lambda k: [node("TopK", ["f", k.i("k", [3])], ["u", "idx"])]),
    ("LpNormalization", lambda k: [node("LpNormalization", ["f"], "u", axis=1)]),
])
def test_an_op_outside_the_registry_is_refused_by_name(op, extra):
    assert op not in VJPS
    kit = Kit(F32)
    model = _head_with(extra(kit), kit)
    with pytest.raises(ExportError) as err:
        add_gradient_output(model, "f", "logits")
    assert str(err.value) == f"cannot build the gradient of the head: no VJP for op '{op}' (node 'u')"


def test_unusable_requests_are_refused_in_one_line():
    kit = Kit(F32)
    model = _head_with([node("Clip", ["f", "f"], "u")], kit)  # a bound that depends on the features
    with pytest.raises(ExportError, match=r"no VJP for op 'Clip' \(node 'u'\): its input 1 \('f'\)"):
        add_gradient_output(model, "f", "logits")
    model = _head_with([node("Identity", ["f"], "u"), node("Neg", ["f"], "side")], kit)
    with pytest.raises(ExportError, match="no tensor named 'nope'"):
        add_gradient_output(model, "nope", "logits")
    with pytest.raises(ExportError, match="'logits' does not depend on 'side'"):
        add_gradient_output(model, "side", "logits")
    pool = [node("Unsqueeze", ["f", kit.i("ax", [1])], "f3"),  # [N, 1, 3] pooled by 2, stride 2: 2 windows
            node("AveragePool", ["f3"], "a3", kernel_shape=[2], strides=[2], ceil_mode=1),
            node("Flatten", ["a3"], "v"), node("Gemm", ["v", kit.w("W2", 4, 2)], "logits", transB=1)]
    pooled = build_model(pool, kit.inits, (3,), F32, output="logits")
    with pytest.raises(ExportError, match=r"'AveragePool' \(node 'a3'\): ceil_mode=1 where it changes the output"):
        add_gradient_output(pooled, "f", "logits")
    model.graph.output.append(helper.make_tensor_value_info("grads", TensorProto.FLOAT, ["N", 3]))
    model.graph.node.append(node("Identity", ["u"], "grads"))
    with pytest.raises(ExportError, match="already has a tensor 'grads'"):
        add_gradient_output(model, "f", "logits")


def test_the_registry_covers_the_ops_heads_use():
    heads = {"Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Neg", "Relu", "LeakyRelu", "Clip", "HardSigmoid",
             "HardSwish", "Sigmoid", "Tanh", "Erf", "Gelu", "Softmax", "LayerNormalization", "Pow", "Sqrt",
             "ReduceMean", "ReduceSum", "GlobalAveragePool", "AveragePool", "MaxPool", "Flatten", "Reshape",
             "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split", "Slice", "Gather", "Identity", "Dropout",
             "Cast", "Conv", "BatchNormalization", "QuantizeLinear", "DequantizeLinear", "QLinearConv",
             "QLinearMatMul", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm"}
    assert heads <= set(VJPS), heads - set(VJPS)
    tested = {n.op_type for case in CASES for n in case.build(Kit(F32))}
    assert set(VJPS) - tested - {"QuantizeLinear", "DequantizeLinear"} <= {
        "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
        "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QGemm", "QLinearConcat"}


def test_naming_a_quantized_tensor_is_one_line_not_a_model_that_cannot_load(tmp_path, capsys):
    """The real int8 MobileNetV2 (ONNX Runtime's QLinear ops, whose outputs ONNX's inference does not type): its
    map '627_quantized' is uint8. The export used to fail loading its own rewritten graph and blamed the input."""
    from realtime_cam.cli import main

    out = tmp_path / "q.onnx"
    assert main(["export", "--from-onnx", str(shared("models", "mobilenetv2-12-int8.onnx")), "--features",
                 "627_quantized", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("realtime-cam: error: cannot explain '627_quantized': it is a quantized (integer) "
                              "tensor") and not out.exists()
