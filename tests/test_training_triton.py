"""Triton path of token_logps (kernels/token_logps.py) against the full-logits reference.

On a machine without CUDA this runs under TRITON_INTERPRET=1 (set by conftest), small shapes only.
Under the interpreter the kernels multiply bf16/fp16 tiles as fp32 values (the interpreter's
tl.dot mishandles bf16) and round the bf16 gradient operand to nearest even by hand (the
interpreter truncates fp32 -> bf16 casts), so the low-precision MMA itself runs only on a GPU.
Tolerances: fp32 values 2e-5 abs, gradients 1e-4 relative; bf16 as Cut Cross-Entropy (no worse
than the same-dtype torch reference against the float64 truth, plus 5% and a small slack).
"""
import pytest
import torch

from fastsafe.training import token_logps
from fastsafe.training.reference import token_logps_reference
from tests.conftest import require_backend

from .test_training_token_logps import make_inputs, max_rel, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton():
    require_backend("triton")


def triton_logps(*args, **kw):
    return token_logps(*args, backend="triton", **kw)


def to_dev(*xs):
    return [None if x is None else (x.detach().to(DEVICE).requires_grad_(x.requires_grad) if torch.is_tensor(x) else x)
            for x in xs]


@pytest.mark.parametrize("shape", [(3, 11, 31, 123), (1, 3, 8, 5), (2, 20, 40, 70)])
def test_triton_fp32_matches_reference(shape):
    hidden, weight, b, targets, rh, rw, up = to_dev(*make_inputs(*shape))
    for kw in [dict(temperature=0.8),
               dict(ref_hidden=rh, ref_weight=rw, return_kl=True, return_entropy=True)]:
        out, grads = run(triton_logps, hidden, weight, b, targets, up, **kw)
        ref, ref_grads = run(token_logps_reference, hidden, weight, b, targets, up, **kw)
        for o, r in zip(out, ref):
            assert o.dtype == torch.float32
            torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-5)
        for g, r in zip(grads, ref_grads):
            assert max_rel(g, r) < 1e-4, kw


def test_triton_without_bias_and_frozen_weight():
    hidden, weight, _, targets, rh, rw, up = to_dev(*make_inputs(2, 9, 16, 45, bias=False))
    weight = weight.detach()
    lp, ent = triton_logps(hidden, weight, targets, return_entropy=True)
    ref_lp, ref_ent = token_logps_reference(hidden, weight, targets, return_entropy=True)
    torch.testing.assert_close(lp, ref_lp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=2e-5, rtol=1e-5)
    (g,) = torch.autograd.grad((lp * up[0] + ent * up[2]).sum(), hidden)
    (rg,) = torch.autograd.grad((ref_lp * up[0] + ref_ent * up[2]).sum(), hidden)
    assert max_rel(g, rg) < 1e-4


def test_triton_kl_gradient_alone_and_split_merge():
    from fastsafe.kernels.token_logps import token_logps_triton_forward
    hidden, weight, b, targets, rh, rw, up = to_dev(*make_inputs(2, 8, 16, 97, ignore_frac=0.0))
    h2, t2 = hidden.detach().reshape(16, 16), targets.reshape(16)
    ref_lp, ref_kl, ref_ent = token_logps_reference(h2, weight.detach(), t2, b.detach(), ref_hidden=rh.reshape(16, 16),
                                                    ref_weight=rw, return_kl=True, return_entropy=True)
    for splits in (1, 2, 4):  # the split partials must merge to the same logsumexp
        lp, kl, ent, *_ = token_logps_triton_forward(h2, weight.detach(), b.detach(), t2, rh.reshape(16, 16), rw,
                                                     None, 1.0, True, n_splits=splits)
        torch.testing.assert_close(lp, ref_lp, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(kl, ref_kl, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(ent, ref_ent, atol=2e-5, rtol=1e-5)
    _, kl = triton_logps(hidden, weight, targets, b, ref_hidden=rh, ref_weight=rw, return_kl=True)
    _, ref_kl = token_logps_reference(hidden, weight, targets, b, ref_hidden=rh, ref_weight=rw, return_kl=True)
    g = torch.autograd.grad((kl * up[1]).sum(), (hidden, weight, b))
    rg = torch.autograd.grad((ref_kl * up[1]).sum(), (hidden, weight, b))
    for x, y in zip(g, rg):
        assert max_rel(x, y) < 1e-4


def test_triton_fully_masked_and_active():
    hidden, weight, b, targets, rh, rw, up = to_dev(*make_inputs(2, 6, 8, 20, ignore_frac=0.0))
    active = torch.zeros(2, 6, device=DEVICE)
    lp = triton_logps(hidden, weight, targets, b, active=active)
    assert (lp == 0).all()
    lp.sum().backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all() and (b.grad == 0).all()
    active[1, 2:] = 1
    hidden.grad = weight.grad = b.grad = None
    out, grads = run(triton_logps, hidden, weight, b, targets, up, active=active)
    ref, ref_grads = run(token_logps_reference, hidden, weight, b, targets, up, active=active)
    torch.testing.assert_close(out[0], ref[0], atol=2e-5, rtol=1e-5)
    for x, y in zip(grads, ref_grads):
        assert max_rel(x, y) < 1e-4


def test_triton_bf16_no_worse_than_same_dtype_reference():
    hidden, weight, b, targets, rh, rw, up = to_dev(*make_inputs(2, 9, 24, 75, dtype=torch.bfloat16))
    kw = dict(ref_hidden=rh, ref_weight=rw, return_kl=True, return_entropy=True)
    out, grads = run(triton_logps, hidden, weight, b, targets, up, **kw)
    ref, ref_grads = run(token_logps_reference, hidden, weight, b, targets, up, **kw)
    kw64 = dict(ref_hidden=rh.double(), ref_weight=rw.double(), return_kl=True, return_entropy=True)
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, b))
    truth, truth_grads = run(token_logps_reference, h64, w64, b64, targets, up, **kw64)
    for o, r, t in zip(out, ref, truth):
        err, err_ref = (o.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        assert err <= 1.05 * err_ref + 1e-3, (err, err_ref)
    for g, r, t in zip(grads, ref_grads, truth_grads):
        assert g.dtype == torch.bfloat16
        err, err_ref = (g.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        assert err <= 1.05 * err_ref + 2e-3 * t.abs().max().item(), (err, err_ref)


def test_triton_rejects_float64():
    hidden, weight, b, targets, *_ = to_dev(*make_inputs(1, 2, 4, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="backend='torch'"):
        triton_logps(hidden, weight, targets, b)


_COMPILE_CHECK = r"""
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from fastsafe.kernels import token_logps as K
from fastsafe.kernels.aot import compile_kernel

for dtype in ("bf16", "fp32"):
    cfg = K.launch_config(torch.bfloat16 if dtype == "bf16" else torch.float32, torch.device("cuda"))
    common = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"],
                  PREC="tf32" if dtype == "bf16" else "ieee", UPCAST=False)
    consts = {
        K._token_logps_fwd_kernel: dict(HAS_BIAS=True, HAS_REF=True, HAS_REF_BIAS=True, WANT_ENT=True, **common),
        K._token_logps_bwd_kernel: dict(HAS_BIAS=True, HAS_REF_BIAS=True, HAS_GLP=True, HAS_KL=True, HAS_ENT=True,
                                        NEED_H=True, NEED_W=True, NEED_B=True, **common),
    }
    for fn, const in consts.items():
        sig = {}
        for name in fn.arg_names:
            if name in const:
                continue
            elif name in ("h_ptr", "w_ptr", "b_ptr", "rh_ptr", "rw_ptr", "rb_ptr"):
                sig[name] = "*" + dtype
            elif name == "t_ptr":
                sig[name] = "*i64"
            elif name.endswith("_ptr"):
                sig[name] = "*fp32"
            else:
                sig[name] = "fp32" if name == "inv_temp" else "i32"
        try:
            k = compile_kernel(fn, sig, const, GPUTarget("cuda", 90, 32), num_warps=cfg["num_warps"],
                               num_stages=cfg["num_stages"])
        except Exception as exc:
            if "ptxas" in str(exc).lower():
                print("NO-PTXAS", exc)
                sys.exit(0)
            raise
        assert "cubin" in k.asm and k.metadata.shared <= 227 * 1024, (fn.__name__, dtype, k.metadata.shared)
        print("OK", fn.__name__, dtype, k.metadata.shared)
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """Ahead-of-time compile of both kernels (bf16 and fp32) to sm_90 cubins: catches GPU-only compile
    errors the interpreter cannot see. Needs Triton's bundled ptxas, no device. Runs in a subprocess
    with TRITON_INTERPRET=0 (under the interpreter @triton.jit functions cannot be compiled)."""
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    if "NO-PTXAS" in res.stdout:
        pytest.skip(f"Triton cannot run ptxas here: {res.stdout[-500:]}")
    assert res.stdout.count("OK") == 4, res.stdout
