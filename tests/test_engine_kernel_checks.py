"""The C++ kernels check every tensor they index (dtype, contiguity, element count), every index they follow and
every shift they round with: a wrong call raises a RuntimeError naming the argument, it never reads or writes outside
a buffer. One valid call per kernel, then one wrong argument at a time."""
import pytest
import torch

from ibert_plugin.engine import kernels
from ibert_plugin.quant import nonlinear as NL

K = kernels.load()
I64, I32, U8, S8 = torch.int64, torch.int32, torch.uint8, torch.int8
M, C, V, P, B, T, H = 6, 8, 11, 9, 2, 3, 2  # rows, channels, vocabulary, positions, batch, time, heads


def _const(n, v):
    return torch.full((n,), v, dtype=I64)


def _embed_ln():
    return dict(tokens=torch.arange(M, dtype=I64) % V, positions=torch.arange(M, dtype=I64) % P,
                pad_rows=torch.zeros(M, dtype=U8), tok_w=torch.ones(V, C, dtype=S8), pos_w=torch.ones(P, C, dtype=S8),
                m_t=3, e_t=2, m_p=3, e_p=2, qmax16=2 ** 15 - 1, shift=0, ln_bint=_const(C, 5), next_m=_const(C, 3),
                next_e=_const(C, 4), next_qmax=127, out_u8=torch.empty(M * C, dtype=U8),
                out_q=torch.empty(M * C, dtype=I64), out_q16=torch.empty(M * C, dtype=I64))


def _resid_ln():
    return dict(acc=torch.ones(M, C, dtype=I32), bias=_const(C, 1), m_a=_const(C, 3), e_a=_const(C, 2),
                resid_u8=torch.full((M * C,), 130, dtype=U8), m_r=3, e_r=2, qmax22=2 ** 21 - 1, shift=0,
                ln_bint=_const(C, 5), next_m=_const(C, 3), next_e=_const(C, 4), next_qmax=127,
                out_u8=torch.empty(M * C, dtype=U8), out_q=torch.empty(M * C, dtype=I64),
                out_q22=torch.empty(M * C, dtype=I64))


def _gelu_u8():
    return dict(acc=torch.ones(M, C, dtype=I32), bias=_const(C, 1), k_sh=_const(C, 0), b_int=_const(C, -100),
                c_int=_const(C, -5000), one=_const(C, 100), m=_const(C, 3), e=_const(C, 4), qmax=127, acc_bound=1000,
                out=torch.empty(M * C, dtype=U8), out_g=torch.empty(M * C, dtype=I64))


def _attention_u8():
    D = H * 4
    return dict(acc=torch.ones(B * T, 3 * D, dtype=I32), bias=_const(3 * D, 1), m=_const(3 * D, 3),
                e=_const(3 * D, 4), qmax=127, batch=B, seq_len=T, heads=H, key_pad=torch.zeros(B, T, dtype=U8),
                lut=NL.exp_lut(torch.tensor([3.1e-4])), ctx_m=3, ctx_e=4, out=torch.empty(B * T, D, dtype=U8),
                q_out=torch.empty(B, H, T, 4, dtype=U8), k_out=torch.empty(B, H, T, 4, dtype=U8),
                v_out=torch.empty(B, H, T, 4, dtype=U8), p_out=torch.empty(B, H, T, T, dtype=U8))


def _softmax_u8():
    return dict(scores=torch.zeros(B, H, T, T, dtype=I32), key_pad=torch.zeros(B, T, dtype=U8),
                lut=NL.exp_lut(torch.tensor([3.1e-4])), out=torch.empty(B, H, T, T, dtype=U8))


CALLS = {"embed_ln": _embed_ln, "resid_ln": _resid_ln, "gelu_u8": _gelu_u8, "attention_u8": _attention_u8,
         "softmax_u8": _softmax_u8}


def _wrong_dtype(t):
    return t.to(torch.float32 if t.dtype != torch.float32 else I64)


def _short(t):
    return t.reshape(-1)[:-1].clone()


def _strided(t):
    return torch.stack([t.reshape(-1), t.reshape(-1)], dim=1)[:, 0]  # same values, stride 2


def _cases():
    for kernel, make in CALLS.items():
        for name, value in make().items():
            if not isinstance(value, torch.Tensor):
                continue
            muts = {"dtype": _wrong_dtype, "numel": _short, "noncontiguous": _strided}
            if name in ("acc", "scores", "tok_w", "pos_w"):
                muts.pop("numel")  # their shape defines the others'
            if name in ("tokens", "lut"):
                muts.pop("numel")  # any length is valid (the table clamps its index at its end)
            for mut in muts:
                yield pytest.param(kernel, name, mut, id=f"{kernel}-{name}-{mut}")


def test_every_kernel_accepts_its_valid_call():
    for kernel, make in CALLS.items():
        getattr(K, kernel)(**make())


@pytest.mark.parametrize("kernel, name, mut", list(_cases()))
def test_a_wrong_tensor_argument_raises_naming_it(kernel, name, mut):
    args = CALLS[kernel]()
    args[name] = {"dtype": _wrong_dtype, "numel": _short, "noncontiguous": _strided}[mut](args[name])
    with pytest.raises(RuntimeError) as err:
        getattr(K, kernel)(**args)
    assert name in str(err.value).splitlines()[0], str(err.value)


@pytest.mark.parametrize("kernel, name, value", [
    ("embed_ln", "tokens", V), ("embed_ln", "tokens", -1), ("embed_ln", "positions", P),
    ("embed_ln", "positions", -2)])
def test_an_index_outside_its_table_raises(kernel, name, value):
    args = CALLS[kernel]()
    args[name][2] = value
    with pytest.raises(RuntimeError, match=f"{kernel} {name}: index {value} outside"):
        getattr(K, kernel)(**args)


@pytest.mark.parametrize("kernel, name", [
    ("embed_ln", "next_e"), ("resid_ln", "e_a"), ("resid_ln", "next_e"), ("attention_u8", "e"), ("gelu_u8", "e")])
def test_a_rounding_shift_below_one_raises(kernel, name):
    args = CALLS[kernel]()
    args[name][1] = 0
    with pytest.raises(RuntimeError, match="shift"):
        getattr(K, kernel)(**args)


@pytest.mark.parametrize("kernel, name, value", [
    ("embed_ln", "e_t", 0), ("embed_ln", "shift", 63), ("embed_ln", "next_qmax", 128), ("resid_ln", "e_r", 0),
    ("resid_ln", "shift", -1), ("resid_ln", "qmax22", 0), ("attention_u8", "ctx_e", 0), ("attention_u8", "qmax", 128),
    ("gelu_u8", "qmax", 0), ("gelu_u8", "acc_bound", -1)])
def test_a_scalar_outside_its_range_raises(kernel, name, value):
    args = CALLS[kernel]()
    args[name] = value
    with pytest.raises(RuntimeError):
        getattr(K, kernel)(**args)


# Prepared plans (what the engine runs: constants checked and prepared once per layer, then one call per batch).
PLANS = {  # kernel: (plan function, run function, the plan's arguments; the rest go to the run)
    "attention_u8": ("attention_plan", "attention_run", ("bias", "m", "e", "qmax", "heads", "lut", "ctx_m", "ctx_e")),
    "resid_ln": ("resid_ln_plan", "resid_ln_run", ("bias", "m_a", "e_a", "m_r", "e_r", "qmax22", "shift", "ln_bint",
                                                   "next_m", "next_e", "next_qmax")),
    "gelu_u8": ("gelu_plan", "gelu_run", ("bias", "k_sh", "b_int", "c_int", "one", "m", "e", "qmax", "acc_bound")),
}


def _plan_and_run_args(kernel):
    args = CALLS[kernel]()
    keys = PLANS[kernel][2]
    return {k: args.pop(k) for k in keys}, args


def _outputs(kernel, run_args):
    return [v.clone() for k, v in run_args.items() if isinstance(v, torch.Tensor) and (k.startswith("out") or
                                                                                    k.endswith("_out"))]


@pytest.mark.parametrize("kernel", list(PLANS))
def test_a_plan_owns_its_constants(kernel):
    """A plan copies what it needs: overwriting the tensors it was built from changes nothing it computes (the
    engine's model tensors may be freed or reused after load)."""
    plan_args, run_args = _plan_and_run_args(kernel)
    run_args["acc"].fill_(20)  # away from 0, where both sets of constants would give the same integers
    mk, run, _ = PLANS[kernel]
    plan = getattr(K, mk)(**plan_args)
    getattr(K, run)(plan=plan, **run_args)
    before = _outputs(kernel, run_args)
    for v in plan_args.values():
        if isinstance(v, torch.Tensor):
            v.mul_(2)  # still valid constants, other values
    getattr(K, run)(plan=plan, **run_args)
    for a, b in zip(before, _outputs(kernel, run_args)):
        assert torch.equal(a, b)
    # and the one-shot call on the overwritten constants does differ (the check above can fail)
    getattr(K, kernel)(**plan_args, **run_args)
    assert any(not torch.equal(a, b) for a, b in zip(before, _outputs(kernel, run_args)))


@pytest.mark.parametrize("kernel", list(PLANS))
def test_a_plan_refuses_an_accumulator_of_another_width(kernel):
    plan_args, run_args = _plan_and_run_args(kernel)
    mk, run, _ = PLANS[kernel]
    plan = getattr(K, mk)(**plan_args)
    acc = run_args["acc"]
    run_args["acc"] = torch.ones(acc.shape[0], acc.shape[1] + 3, dtype=I32)
    with pytest.raises(RuntimeError, match="acc"):
        getattr(K, run)(plan=plan, **run_args)


def test_a_resid_plan_without_next_requant_refuses_a_u8_output():
    """The last layer's plan has no next requant: it serves the int64 output only."""
    plan_args, run_args = _plan_and_run_args("resid_ln")
    plan_args["next_m"] = plan_args["next_e"] = torch.empty(0, dtype=I64)
    plan = K.resid_ln_plan(**plan_args)
    with pytest.raises(RuntimeError, match="next requant"):
        K.resid_ln_run(plan=plan, **run_args)
    run_args["out_u8"] = torch.empty(0, dtype=U8)
    K.resid_ln_run(plan=plan, **run_args)  # int64 outputs only: fine
