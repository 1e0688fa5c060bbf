"""Tests of the fused relative-perceptual-L1 op (paper §3.1, eq. (3)-(4)): csrc/, fused_op.py.

The op must equal the pure-PyTorch reference ``losses.rel_perc_l1_torch`` (forward and
gradients, with the eq. (4) denominator a constant in backward) on all shapes and layouts, pass
``torch.library.opcheck`` and ``gradcheck``, and keep the loss' properties. Everything is
skipped when the extension is not built; CUDA tests are skipped without a GPU.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_op

from losses import rel_perc_l1_torch  # the pure-PyTorch reference

pytestmark = pytest.mark.skipif(
    not fused_op.is_built(), reason="extension piad_C not built: pip install --no-build-isolation -e .")
CUDA = pytest.mark.skipif(
    not (torch.cuda.is_available() and fused_op.available("cuda")),
    reason="CUDA not available" if not torch.cuda.is_available() else "piad_C built without CUDA kernels")
op, op_bw = (torch.ops.piad.rel_perc_l1, torch.ops.piad.rel_perc_l1_backward) if fused_op.is_built() else (None, None)
EPS = 1e-6
TOL = {torch.float64: dict(rtol=1e-10, atol=0.0), torch.float32: dict(rtol=1e-5, atol=0.0)}

SHAPES = [(1, 1, 1, 1), (1, 3, 1, 1), (4, 1, 5, 5), (3, 7, 5, 3), (2, 16, 13, 11), (5, 8),
          (2, 600, 3), (2, 3, 4, 5, 6), (3, 64, 32, 32), (1, 8, 128, 128), (2, 33, 1, 17)]
LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced", "mixed"]


def make(shape, dtype=torch.float64, seed=0, gap=0.0, device="cpu"):
    """fx, fy, mean, std; |fx - fy| >= gap keeps inputs away from the kinks of |.|."""
    g = torch.Generator().manual_seed(seed)
    fx = torch.randn(shape, generator=g, dtype=torch.float64)
    d = torch.randn(shape, generator=g, dtype=torch.float64)
    fy = fx + torch.where(d >= 0, 1.0, -1.0) * d.abs().clamp_min(gap)
    C = shape[1]
    mean = 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    std = 0.5 + torch.rand(C, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (fx, fy, mean, std)]


def relayout(t, layout, which=0):
    """Same values, other memory layout (a view or copy that is not plain contiguous)."""
    if layout == "contiguous" or t.dim() < 3:
        return t
    if layout == "channels_last" or (layout == "mixed" and which == 0):
        return t.movedim(1, -1).contiguous().movedim(-1, 1)  # channels_last(_3d) strides
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    return t  # "mixed": fy stays contiguous


def compare(fx, fy, mean, std, eps=EPS, tol=None, ref_dtype=None, layout="contiguous"):
    """Forward and both gradients of the op (inputs in `layout`) against the reference."""
    tol = tol or TOL[fx.dtype]
    a, b = fx.detach().clone().requires_grad_(), fy.detach().clone().requires_grad_()
    rd = ref_dtype or fx.dtype
    ra, rb = fx.detach().to(rd).requires_grad_(), fy.detach().to(rd).requires_grad_()
    out = fused_op.rel_perc_l1(relayout(a, layout), relayout(b, layout, 1), mean, std, eps)
    ref = rel_perc_l1_torch(ra, rb, mean, std, eps)
    assert out.shape == (fx.shape[0],) and out.dtype == fused_op.loss_dtype(fx.dtype)  # bf16, half: float32
    torch.testing.assert_close(out.to(rd), ref, **tol)
    g = torch.rand(fx.shape[0], dtype=rd, device=fx.device) + 0.5
    ga, gb = torch.autograd.grad(out, (a, b), g.to(out.dtype))
    gra, grb = torch.autograd.grad(ref, (ra, rb), g)
    scale = gra.abs().max().item() if gra.numel() else 0.0  # atol relative to the gradient size
    kw = dict(rtol=tol["rtol"], atol=tol["rtol"] * scale)
    torch.testing.assert_close(ga.to(rd), gra, **kw)
    torch.testing.assert_close(gb.to(rd), grb, **kw)
    assert ga.shape == fx.shape and ga.dtype == fx.dtype


@pytest.fixture(params=LAYOUTS)
def layout(request):
    return request.param


# --------------------------------------------------------------------------------------------
# equality with the reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, layout):
    compare(*make(shape, dtype, seed=sum(shape), gap=1e-3), layout=layout)


@settings(max_examples=60)
@given(n=st.integers(1, 4), c=st.integers(1, 9), h=st.integers(1, 9), w=st.integers(1, 9),
       seed=st.integers(0, 2**31), scale=st.floats(1e-3, 1e3), dtype=st.sampled_from([torch.float64, torch.float32]),
       lay=st.sampled_from(LAYOUTS))
def test_matches_reference_hypothesis(n, c, h, w, seed, scale, dtype, lay):
    fx, fy, mean, std = make((n, c, h, w), torch.float64, seed=seed, gap=1e-4)
    compare((fx * scale).to(dtype), (fy * scale).to(dtype), mean * scale, std * scale, layout=lay)


@settings(max_examples=40)
@given(data=st.data(), shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)))
def test_matches_reference_on_drawn_values(data, shape):
    """Hypothesis-drawn values, including exact ties fx == fy (gradient sign(0) = 0).

    Values lie on a grid of 1/8 so that fx != fy implies fx~ != fy~ after rounding (the
    reference takes the sign of fx~ - fy~, the kernels the sign of fx - fy)."""
    k = shape[0] * shape[1] * shape[2]
    vals = st.integers(-800, 800).map(lambda v: v / 8)
    fx = torch.tensor(data.draw(st.lists(vals, min_size=k, max_size=k)), dtype=torch.float64)
    tie = data.draw(st.lists(st.booleans(), min_size=k, max_size=k))
    fy = torch.tensor(data.draw(st.lists(vals, min_size=k, max_size=k)), dtype=torch.float64)
    fy = torch.where(torch.tensor(tie), fx, fy)
    mean = torch.tensor(data.draw(st.lists(vals, min_size=shape[1], max_size=shape[1])), dtype=torch.float64)
    std = torch.tensor(data.draw(st.lists(st.floats(0.1, 10), min_size=shape[1], max_size=shape[1])),
                       dtype=torch.float64)
    compare(fx.view(shape), fy.view(shape), mean, std, tol=dict(rtol=1e-9, atol=1e-12))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_of_one_input(dtype):
    """Only fy (training: fx = features of the real image) or only fx requires grad."""
    fx, fy, mean, std = make((3, 6, 5, 4), dtype, gap=1e-3)
    g = torch.rand(3, dtype=dtype)
    gx, gy = torch.autograd.grad(rel_perc_l1_torch(fx.requires_grad_(), fy.requires_grad_(), mean, std), (fx, fy), g)
    fx, fy = fx.detach(), fy.detach()
    (got,) = torch.autograd.grad(op(fx, fy.requires_grad_(), mean, std, EPS), (fy,), g)
    torch.testing.assert_close(got, gy, **TOL[dtype])
    (got,) = torch.autograd.grad(op(fx.requires_grad_(), fy.detach(), mean, std, EPS), (fx,), g)
    torch.testing.assert_close(got, gx, **TOL[dtype])


def test_stats_in_other_dtype_and_eps():
    fx, fy, mean, std = make((3, 5, 4, 4), torch.float32, seed=3)
    compare(fx, fy, mean.double(), std.double(), eps=0.0)
    compare(fx, fy, mean, std, eps=10.0)


def test_empty_and_zero_denominator():
    fx, fy, mean, std = make((0, 3, 2, 2))
    assert op(fx, fy, mean, std, EPS).shape == (0,)
    fx, fy, mean, std = make((2, 3, 0, 2))
    assert torch.equal(op(fx, fy, mean, std, EPS), torch.zeros(2, dtype=fx.dtype))
    assert op_bw(torch.ones(2, dtype=fx.dtype), fx, fy, mean, std, EPS).shape == fx.shape


# --------------------------------------------------------------------------------------------
# opcheck / gradcheck / torch.compile


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,lay", [((2, 3, 4, 5), "contiguous"), ((1, 1, 1, 1), "contiguous"),
                                       ((3, 4), "contiguous"), ((2, 3, 4, 5), "channels_last"),
                                       ((2, 5, 3, 3, 2), "transposed")], ids=str)
def test_opcheck(shape, lay, dtype):
    fx, fy, mean, std = make(shape, dtype, gap=1e-3)
    fx, fy = relayout(fx, lay).requires_grad_(), relayout(fy, lay, 1).requires_grad_()
    torch.library.opcheck(op, (fx, fy, mean, std, EPS))
    grad = torch.rand(shape[0], dtype=dtype, requires_grad=True)
    torch.library.opcheck(op_bw, (grad, fx.detach(), fy.detach(), mean, std, EPS))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,lay", [((2, 3, 4, 5), "contiguous"), ((4, 512, 4, 4), "channels_last"),
                                       ((3, 4), "contiguous")], ids=str)
def test_opcheck_reduced_precision(shape, lay, dtype):
    """bf16 (--precision bf16) and half features: the fake kernels give the real kernels' dtypes
    (float32 loss, gradients in the features' dtype), autograd included."""
    fx, fy, mean, std = (t.to(dtype) if i < 2 else t for i, t in enumerate(make(shape, torch.float32, gap=1e-2)))
    fx, fy = relayout(fx, lay).requires_grad_(), relayout(fy, lay, 1).requires_grad_()
    torch.library.opcheck(op, (fx, fy, mean, std, EPS))
    torch.library.opcheck(op_bw, (torch.rand(shape[0]), fx.detach(), fy.detach(), mean, std, EPS))
    assert op(fx, fy, mean, std, EPS).dtype == torch.float32
    assert op_bw(torch.rand(shape[0]), fx, fy, mean, std, EPS).dtype == dtype


def test_bf16_sums_are_fp32():
    """Eq. (4)'s reduction over bf16 features of a 32×32 image's relu4_2 (and a larger map) is the
    float32 formula on the same bf16 values to float32 rounding, not to bf16's: the sums are fp32."""
    for shape in ((32, 512, 4, 4), (4, 512, 16, 16)):
        fx, fy, mean, std = make(shape, torch.float32, seed=3)
        fx, fy = fx.bfloat16(), fy.bfloat16()
        ref = rel_perc_l1_torch(fx.double(), fy.double(), mean.double(), std.double(), EPS)
        out = op(fx.to(memory_format=torch.channels_last), fy.to(memory_format=torch.channels_last), mean, std, EPS)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=0)  # bf16 sums would be off by ~1e-2


def test_gradcheck():
    fx, fy, mean, std = make((2, 3, 4, 3), gap=1e-2)
    fx.requires_grad_(), fy.requires_grad_()
    # fy: the op is an ordinary differentiable function of fy (the denominator only has fx).
    assert torch.autograd.gradcheck(lambda b: op(fx.detach(), b, mean, std, EPS), (fy,))
    # fx: the denominator is a constant in backward; h(a) = num(a) / (den(fx) + eps) exactly,
    # so its numerical gradient is the constant-denominator gradient the op must return.
    def den(a):  # sum |fx~|, eq. (3), without gradient
        return ((a.detach() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).abs().flatten(1).sum(1)

    den0 = den(fx)

    def h(a):
        return op(a, fy.detach(), mean, std, EPS) * (den(a) + EPS) / (den0 + EPS)

    assert torch.autograd.gradcheck(h, (fx,))


def test_torch_compile_fullgraph():
    fx, fy, mean, std = make((3, 4, 5, 5), torch.float32, gap=1e-3)

    def f(a, b):
        return (fused_op.rel_perc_l1(a, b, mean, std, EPS) * torch.arange(1.0, 4.0)).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    outs = []
    for fn in (f, compiled):
        a, b = fx.clone().requires_grad_(), fy.clone().requires_grad_()
        v = fn(a, b)
        outs.append((v, *torch.autograd.grad(v, (a, b))))
    for e, c in zip(*outs):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# properties of eq. (4)

f64_case = dict(n=st.integers(1, 5), c=st.integers(1, 6), s=st.integers(1, 40), seed=st.integers(0, 2**31))


@given(**f64_case)
def test_nonnegative_and_zero_on_identical(n, c, s, seed):
    fx, fy, mean, std = make((n, c, s), seed=seed)
    assert (op(fx, fy, mean, std, EPS) >= 0).all()
    assert torch.equal(op(fx, fx.clone(), mean, std, EPS), torch.zeros(n, dtype=fx.dtype))


@given(a=st.floats(1e-3, 1e3), **f64_case)
def test_invariant_to_scaling_normalised_features(a, n, c, s, seed):
    """fx~ -> a fx~, fy~ -> a fy~ (a > 0) leaves eq. (4) unchanged (exactly when eps = 0)."""
    fx, fy, mean, std = make((n, c, s), seed=seed)
    m = mean.view(1, -1, 1)
    l0 = op(fx, fy, mean, std, 0.0)
    l1 = op(m + a * (fx - m), m + a * (fy - m), mean, std, 0.0)
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=0)


@given(perm_seed=st.integers(0, 2**31), **f64_case)
def test_follows_batch_permutation(perm_seed, n, c, s, seed):
    fx, fy, mean, std = make((n, c, s), torch.float32, seed=seed)
    p = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    assert torch.equal(op(fx[p], fy[p], mean, std, EPS), op(fx, fy, mean, std, EPS)[p])


@pytest.mark.parametrize("n", [1, 3, 16])
def test_independent_of_thread_count(n):
    """Each sample is summed in a fixed order: 1 and 2 threads give bitwise equal results
    (n = 3 and 16 are above the size under which the CPU kernels stay on one thread)."""
    fx, fy, mean, std = make((n, 64, 64, 64), torch.float32, seed=5)
    g = torch.rand(n)
    threads = torch.get_num_threads()
    try:
        res = []
        for t in (1, max(2, threads)):
            torch.set_num_threads(t)
            res.append((op(fx, fy, mean, std, EPS), op_bw(g, fx, fy, mean, std, EPS)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


# --------------------------------------------------------------------------------------------
# reduced precision, errors, availability


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 16, 13, 11), (3, 64, 32, 32), (2, 600, 3)], ids=str)
def test_half_precision_cpu(shape, dtype, layout):
    fx, fy, mean, std = make(shape, torch.float32, gap=1e-2)
    fx, fy = fx.to(dtype), fy.to(dtype)  # the reference sees exactly the same values in float32
    compare(fx, fy, mean, std, tol=dict(rtol=1e-2, atol=0.0), ref_dtype=torch.float32, layout=layout)


BAD_INPUTS = [
    (((2, 3, 4, 4), (2, 3, 4, 5), 3, None), "same shape"),
    (((2, 3, 4, 4), (2, 3, 4, 4), 4, None), "one entry per channel"),
    (((2, 3, 4, 4), (2, 3, 4, 4), 3, torch.float64), "same dtype"),
    (((6,), (6,), 6, None), r"\(N, C, \*\)"),
]


@pytest.mark.parametrize("args,match", BAD_INPUTS)
def test_clear_errors(args, match):
    sx, sy, c, ydtype = args
    fx, fy = torch.randn(sx), torch.randn(sy, dtype=ydtype or torch.float32)
    with pytest.raises(RuntimeError, match=match):
        op(fx, fy, torch.zeros(c), torch.ones(c), EPS)
    with pytest.raises(RuntimeError, match=match):
        op_bw(torch.ones(sx[0]), fx, fy, torch.zeros(c), torch.ones(c), EPS)


@pytest.mark.parametrize("args,match", BAD_INPUTS)
def test_fake_kernel_errors(args, match):
    """The fake kernels (meta tensors, torch.compile tracing) reject what the C++ kernels reject."""
    sx, sy, c, ydtype = args
    fx, fy = torch.empty(sx, device="meta"), torch.empty(sy, dtype=ydtype or torch.float32, device="meta")
    stats = torch.empty(c, device="meta")
    with pytest.raises(RuntimeError, match=match):
        op(fx, fy, stats, stats, EPS)
    with pytest.raises(RuntimeError, match=match):
        op_bw(torch.empty(sx[0], device="meta"), fx, fy, stats, stats, EPS)


def test_fake_kernels():
    fx = torch.empty(2, 3, 4, 5, device="meta").to(memory_format=torch.channels_last)
    stats = torch.empty(3, device="meta")
    assert op(fx, fx, stats, stats, EPS).shape == (2,)
    gx = op_bw(torch.empty(2, device="meta"), fx, fx, stats, stats, EPS)
    assert gx.shape == fx.shape and gx.stride() == fx.stride()
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        op(fx, fx, stats, stats, -1.0)
    with pytest.raises(RuntimeError, match=r"grad must have shape \(N,\)"):
        op_bw(torch.empty(3, device="meta"), fx, fx, stats, stats, EPS)


def test_more_errors():
    fx = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        op(fx, fx, torch.zeros(3), torch.ones(3), -1.0)
    with pytest.raises(RuntimeError, match="floating point"):
        op(fx.long(), fx.long(), torch.zeros(3), torch.ones(3), EPS)
    with pytest.raises(RuntimeError, match="std must be 1-D"):
        op(fx, fx, torch.zeros(3), torch.ones(1, 3), EPS)
    with pytest.raises(RuntimeError, match=r"grad must have shape \(N,\)"):
        op_bw(torch.ones(3), fx, fx, torch.zeros(3), torch.ones(3), EPS)
    with pytest.raises(RuntimeError, match="unavailable"):
        fused_op.rel_perc_l1(fx.to("meta"), fx.to("meta"), torch.zeros(3), torch.ones(3))


def test_available():
    assert fused_op.is_built() is True and fused_op.is_built() is True  # cached
    assert fused_op.available("cpu") and fused_op.available(torch.device("cpu"))
    assert not fused_op.available("meta")
    if fused_op.available("cuda"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("piad::rel_perc_l1_backward", "CUDA")


# --------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@CUDA
class TestCUDA:
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    @pytest.mark.parametrize("shape", SHAPES + [(32, 512, 16, 16), (2, 8, 3, 5)], ids=str)
    def test_matches_reference(self, shape, dtype, layout):
        compare(*make(shape, dtype, seed=1, gap=1e-3, device="cuda"), layout=layout)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("shape", [(2, 16, 13, 11), (32, 512, 16, 16), (2, 600, 3)], ids=str)
    def test_half_precision(self, shape, dtype, layout):
        fx, fy, mean, std = make(shape, torch.float32, gap=1e-2, device="cuda")
        compare(fx.to(dtype), fy.to(dtype), mean, std, tol=dict(rtol=1e-2, atol=0.0),
                ref_dtype=torch.float32, layout=layout)

    def test_matches_cpu_and_opcheck(self):
        fx, fy, mean, std = make((4, 32, 9, 7), torch.float32, gap=1e-3)
        dev = [t.cuda() for t in (fx, fy, mean, std)]
        torch.testing.assert_close(op(*dev, EPS).cpu(), op(fx, fy, mean, std, EPS), rtol=1e-5, atol=0)
        torch.library.opcheck(op, (dev[0].requires_grad_(), dev[1].requires_grad_(), dev[2], dev[3], EPS))
        torch.library.opcheck(op_bw, (torch.rand(4, device="cuda"), fx.cuda(), fy.cuda(), dev[2], dev[3], EPS))

    def test_errors(self):
        fx = torch.randn(2, 3, 4, device="cuda")
        with pytest.raises(RuntimeError, match="mean is on"):
            op(fx, fx, torch.zeros(3), torch.ones(3, device="cuda"), EPS)
