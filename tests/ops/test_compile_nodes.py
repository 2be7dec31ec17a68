"""Under torch.compile(fullgraph=True) each fused op is exactly one node of the AOT graphs (forward,
and for the loss its backward), traced through the fake impls; no decomposition, no graph break."""

from __future__ import annotations

import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from soar_fast.ops import soar_aux_states, soar_fused_mse, soar_fused_mse_and_grad


def _capture():
    graphs = []

    def compiler(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return graphs, aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def _count(gm, name):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target))


def _inputs(b=2, m=3):
    z = [torch.randn(b, 3, 5, 7) for _ in range(4)]
    s0 = torch.rand(b) * 0.8 + 0.1
    s1 = s0 - 0.02
    sa = s1 + torch.rand(m, b) * (1 - s1)
    return z, s0, s1, sa


def test_aux_states_is_one_node():
    torch._dynamo.reset()
    graphs, backend = _capture()
    z, s0, s1, sa = _inputs()
    fn = torch.compile(
        lambda *a: soar_aux_states(*a, 4.5, backend="triton"), fullgraph=True, backend=backend
    )
    fn(*z, s0, s1, sa)
    assert len(graphs) == 1 and _count(graphs[0], "soar_fast.aux_states") == 1


def test_fused_mse_forward_and_backward_are_one_node_each():
    torch._dynamo.reset()
    graphs, backend = _capture()
    z, s0, s1, sa = _inputs()
    z_aux = torch.randn(3 * 2, 3, 5, 7)
    v = torch.randn(4 * 2, 3, 5, 7, requires_grad=True)
    fn = torch.compile(
        lambda *a: soar_fused_mse(*a, backend="triton").sum(), fullgraph=True, backend=backend
    )
    fn(v, z[0], z[1], z_aux, sa, torch.ones(8)).backward()
    assert len(graphs) == 2, "one forward and one backward graph"
    fw, bw = graphs
    assert _count(fw, "soar_fast.fused_mse.default") == 1 and _count(fw, "fused_mse_backward") == 0
    assert _count(bw, "soar_fast.fused_mse_backward") == 1
    assert v.grad is not None and torch.isfinite(v.grad).all()


def test_fused_mse_and_grad_is_one_node():
    torch._dynamo.reset()
    graphs, backend = _capture()
    z, s0, s1, sa = _inputs()
    z_aux = torch.randn(3 * 2, 3, 5, 7)
    v = torch.randn(4 * 2, 3, 5, 7)
    fn = torch.compile(
        lambda *a: soar_fused_mse_and_grad(*a, backend="triton"), fullgraph=True, backend=backend
    )
    fn(v, z[0], z[1], z_aux, sa, torch.ones(8))
    assert len(graphs) == 1 and _count(graphs[0], "soar_fast.fused_mse_and_grad") == 1
