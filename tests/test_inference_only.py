"""A backward through quantized linears raises an error naming them; inference is untouched."""
import pytest
import torch

from quantvla_fx import QuantVLAConfig


def partly_quantized():
    torch.manual_seed(0)
    m = torch.nn.Sequential()
    m.add_module("head", torch.nn.Linear(16, 16))
    m.add_module("mlp", torch.nn.Linear(16, 8))
    return m


OPTS = QuantVLAConfig(include=("mlp",), exclude=()).to_options()


def test_backward_through_a_quantized_linear_names_it():
    m = partly_quantized().train()
    out = torch.compile(m, backend="quantvla", options=OPTS)(torch.randn(4, 16))
    with pytest.raises(RuntimeError, match=r"cannot backpropagate through quantized linears \(mlp\).*torch.no_grad"):
        out.sum().backward()


def test_input_that_requires_grad_is_refused_at_backward():
    m = partly_quantized().requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    out = torch.compile(m, backend="quantvla", options=OPTS)(x)
    with pytest.raises(RuntimeError, match="inference only"):
        out.sum().backward()


def test_no_grad_and_inference_mode_outputs_are_plain():
    m = partly_quantized().eval()
    fn = torch.compile(m, backend="quantvla", options=OPTS)
    x = torch.randn(4, 16)
    with torch.no_grad():
        a = fn(x)
    with torch.inference_mode():
        b = fn(x)
    assert not a.requires_grad and a.grad_fn is None and torch.equal(a, b)
