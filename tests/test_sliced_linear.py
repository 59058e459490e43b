"""The sliced linear's fused weight gradient (elastic/sliced_linear.py) equals plain autograd of
the weight view, bit for bit: for one layer, and for whole elastic models (dense MLP, experts,
shared expert) at TP=1 and TP=2, under megatron DDP (main_grad) and without it (.grad)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed
from helpers import batch, random_canonical_state, tiny_config, tiny_moe, train_step, wrap_ddp
from megatron.core import tensor_parallel

import megatron_flextron.elastic.sliced_linear as fused_grad
from megatron_flextron.config import ElasticConfig
from megatron_flextron.elastic import build_elastic_model, linear, set_subnetwork
from megatron_flextron.elastic.sliced_linear import sliced_linear
from megatron_flextron.elastic.tp_layout import load_canonical_state_dict

CASES = {  # name: (model config, elastic choices, sub-network)
    "dense": (
        lambda: tiny_config("llama"),
        ElasticConfig(mlp_choices=(64,), head_choices=(4,)),
        {"mlp": 64, "heads": 4},
    ),
    "moe": (
        lambda: tiny_moe(moe_shared_expert_intermediate_size=64),
        ElasticConfig(expert_choices=(6,), moe_ffn_choices=(16,), topk_choices=(1,)),
        {"experts": 6, "moe_ffn": 16, "topk": 1},
    ),
}


def _view_linear(x, weight, sel, dim):
    return F.linear(x, weight[sel] if dim == 0 else weight[:, sel])


@pytest.mark.parametrize(
    "dim, shape, sel", [(0, (48, 16), slice(24, 36)), (1, (16, 48), slice(0, 20))]
)
@pytest.mark.parametrize("x_shape", [(7, 3), (5,)])
def test_one_layer_equals_autograd_of_the_view(dim, shape, sel, x_shape):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape))
    twin = torch.nn.Parameter(weight.detach().clone())
    in_features = shape[1] if dim == 0 else sel.stop
    x = torch.randn(*x_shape, in_features, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    for _ in range(2):  # the second backward accumulates into the existing gradient
        out, ref = sliced_linear(x, weight, sel, dim), _view_linear(x_twin, twin, sel, dim)
        assert torch.equal(out, ref)
        grad = torch.randn_like(ref)
        out.backward(grad)
        ref.backward(grad)
        assert torch.equal(weight.grad, twin.grad) and torch.equal(x.grad, x_twin.grad)
    outside = weight.grad[sel.stop :] if dim == 0 else weight.grad[:, sel.stop :]
    assert outside.abs().sum() == 0 and weight.grad.abs().sum() > 0


def test_small_weights_keep_plain_autograd():
    small = torch.nn.Parameter(torch.zeros(1024, 256))  # a benchmark expert's fc1: plain is faster
    large = torch.nn.Parameter(torch.zeros(2048, 1024))
    assert not fused_grad.fusable(small, slice(0, 256)) and fused_grad.fusable(large, slice(0, 512))
    assert not fused_grad.fusable(large, torch.arange(4))  # an index selection: a gather
    with torch.no_grad():
        assert not fused_grad.fusable(large, slice(0, 512))


def test_gradient_of_the_input_only_leaves_the_weight_alone():
    weight = torch.nn.Parameter(torch.randn(8, 4))
    x = torch.randn(3, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(sliced_linear(x, weight, slice(0, 2), 0).sum(), [x])
    assert torch.equal(gx, weight[:2].sum(0).expand(3, 4)) and weight.grad is None
    sliced_linear(x, weight, slice(0, 2), 0).sum().backward(inputs=[x])
    assert weight.grad is None


def _canonical() -> dict:
    """Each case's random weights (a TP=1 state dict: built in a single process)."""
    return {case: random_canonical_state(make(), seed=3) for case, (make, _, _) in CASES.items()}


def _grads(case: str, canonical: dict, tp: int, ddp: bool, fused: bool, counter: list) -> dict:
    """Every parameter's gradient (main_grad under DDP) after one step of the sub-network."""
    make, choices, spec = CASES[case]
    model_cfg = make()
    config = model_cfg.transformer_config(tp, 1, sequence_parallel=tp > 1)
    model = build_elastic_model(model_cfg, config)
    load_canonical_state_dict(model, canonical, model_cfg)
    tokens, labels = batch()
    original = linear.sliced_linear

    def counted(*args):
        counter.append(1)
        return original(*args)

    # the tiny models' weights are below the size where the fused gradient pays: force it on
    patches = {"fusable": linear.fusable if fused else (lambda *a: False), "sliced_linear": counted}
    saved = {k: getattr(linear, k) for k in patches}
    for k, v in patches.items():
        setattr(linear, k, v)
    fused_grad.FUSED_MIN_NUMEL, min_numel = 0, fused_grad.FUSED_MIN_NUMEL
    try:
        if ddp:
            wrapped = wrap_ddp(model, config)
            set_subnetwork(wrapped, spec, model_cfg, choices)
            train_step(wrapped, tokens, labels)
            return {n: p.main_grad.clone() for n, p in model.named_parameters()}
        set_subnetwork(model, spec, model_cfg, choices)
        logits = model(tokens, torch.arange(tokens.size(1)).expand_as(tokens), None)
        tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    finally:
        fused_grad.FUSED_MIN_NUMEL = min_numel
        for k, v in saved.items():
            setattr(linear, k, v)


def _compare(case: str, canonical: dict, tp: int, ddp: bool) -> None:
    fused_calls, plain_calls = [], []
    fused = _grads(case, canonical, tp, ddp, True, fused_calls)
    plain = _grads(case, canonical, tp, ddp, False, plain_calls)
    assert fused_calls and not plain_calls, "the fused path must run (and only in the fused run)"
    assert set(fused) == set(plain) and len(fused) > 8, set(fused) ^ set(plain)
    for name, grad in fused.items():
        diff = (grad - plain[name]).abs().max().item()
        assert torch.equal(grad, plain[name]), (case, tp, ddp, name, diff)
    narrowed = [n for n in fused if "linear_fc1.weight" in n]
    assert narrowed and any(fused[n].any() for n in narrowed)  # the compared gradients are real


@pytest.mark.parametrize("ddp", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_model_gradients_equal_plain_autograd_tp1(megatron_single_process, case, ddp):
    _compare(case, random_canonical_state(CASES[case][0](), seed=3), 1, ddp)


def _tp2_body(rank, world_size, canonical):
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(2, 1)
    for case in CASES:
        for ddp in (False, True):
            _compare(case, canonical[case], 2, ddp)


def test_model_gradients_equal_plain_autograd_tp2(megatron_single_process):
    run_distributed(_tp2_body, 2, _canonical())
