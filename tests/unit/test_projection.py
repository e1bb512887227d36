import torch

from refusal_atlas.edits.projection import orthonormal_basis, project_out, project_out_sequential


def test_project_out_removes_span_and_is_idempotent():
    torch.manual_seed(0)
    dirs = torch.randn(3, 16)
    basis = orthonormal_basis(dirs)
    x = torch.randn(5, 7, 16)
    y = project_out(x, basis)
    assert torch.allclose(y @ dirs.T, torch.zeros(5, 7, 3), atol=1e-5)
    assert torch.allclose(project_out(y, basis), y, atol=1e-6)
    # the part orthogonal to the span is untouched
    z = torch.randn(16)
    z_perp = z - basis.T @ (basis @ z)
    assert torch.allclose(project_out(z_perp, basis), z_perp, atol=1e-6)


def test_orthonormal_basis_drops_dependent_rows():
    a, b = torch.randn(8), torch.randn(8)
    basis = orthonormal_basis(torch.stack([a, b, 2 * a - b]))
    assert basis.shape == (2, 8)
    assert torch.allclose(basis @ basis.T, torch.eye(2), atol=1e-5)


def test_sequential_differs_for_correlated_and_agrees_for_orthogonal():
    torch.manual_seed(1)
    x = torch.randn(10, 16)
    u = torch.nn.functional.normalize(torch.randn(16), dim=0)
    v = torch.nn.functional.normalize(u + 0.5 * torch.randn(16), dim=0)
    corr = torch.stack([u, v])
    exact, seq = project_out(x, orthonormal_basis(corr)), project_out_sequential(x, corr)
    assert (exact - seq).abs().max() > 1e-2
    # sequential leaves a component along the earlier direction u
    assert (seq @ u).abs().max() > 1e-2 and (seq @ v).abs().max() < 1e-5
    q = orthonormal_basis(torch.randn(2, 16))
    assert torch.allclose(project_out(x, q), project_out_sequential(x, q), atol=1e-5)


def test_projection_in_bf16_removes_the_direction_to_float32_precision():
    """bf16 activations: the projection is computed in float32, so only the final bf16 rounding remains."""
    torch.manual_seed(0)
    d = torch.randn(64, dtype=torch.float32)
    u = d / d.norm()
    x = (torch.randn(8, 64) * 4 + 30 * u).to(torch.bfloat16)
    out = project_out(x, u.unsqueeze(0))
    assert out.dtype == torch.bfloat16
    residual = (out.float() @ u).abs().max().item()
    naive = x - ((x @ u.to(torch.bfloat16)).unsqueeze(-1) * u.to(torch.bfloat16))  # the old in-dtype projection
    # what is left is the bf16 rounding of the output (≤ 2^-8 relative per element), far below the naive rest
    bound = (out.float().abs().max() * 2 ** -8 * 64 ** 0.5).item()
    assert residual <= bound
    assert residual < (naive.float() @ u).abs().max().item()
    exact = x.float() - (x.float() @ u).unsqueeze(-1) * u
    assert torch.allclose(out.float(), exact, atol=bound)
