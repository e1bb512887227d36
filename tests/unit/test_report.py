import base64
import re

import torch

from refusal_atlas.analysis.geometry import classical_mds, cosine_matrix
from refusal_atlas.config import load_config
from refusal_atlas.pipeline import run
from refusal_atlas.report import build_report


def test_mds_preserves_cosine_geometry():
    torch.manual_seed(0)
    basis = torch.randn(2, 50)
    vecs = torch.randn(6, 2) @ basis  # rank 2: MDS in 2-D with unit-normalised rows is exact
    coords = classical_mds(vecs)
    unit = torch.nn.functional.normalize(vecs.double(), dim=1)
    d_true = torch.cdist(unit, unit)
    d_mds = torch.cdist(coords, coords)
    assert torch.allclose(d_true, d_mds, atol=1e-6)
    assert torch.allclose(cosine_matrix(vecs).diagonal(), torch.ones(6, dtype=torch.float64))


def test_report_has_tables_and_real_pngs(tmp_path, tiny_model_dir):
    cfg = load_config(None, dict(model=str(tiny_model_dir), n_train=4, n_val=3, n_eval=3, filter_train=False,
                                 layers=[0, 1, 2], positions=[-2, -1], max_new_tokens=2, device="cpu"))
    run(cfg, tmp_path / "r")
    page = build_report(tmp_path / "r").read_text()
    assert "Held-out results" in page and "Direction selection" in page and "DIM across layers" in page
    images = re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)', page)
    assert len(images) >= 3
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert (tmp_path / "r" / "plots" / "selection.png").stat().st_size > 5000
