"""The diffusers processors on the Triton backend: a tiny Flux transformer against the same processors on the reference.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before the kernel
modules are imported). This checks the processors' BSHD views and masks reach the kernels intact.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
pytest.importorskip("diffusers")

from quantattn_hf.backends.reference import ReferenceBackend  # noqa: E402
from quantattn_hf.integrations.diffusers import apply, remove  # noqa: E402
from quantattn_hf.tiny import tiny_flux_pipeline  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 set before triton kernels load",
)


def _no_fallback(*args, **kwargs):
    raise AssertionError("the Triton backend fell back to the reference backend")


def _inputs(transformer, side=4, text=8):
    gen = torch.Generator().manual_seed(0)
    n = side * side
    img_ids = torch.stack([torch.zeros(n), torch.arange(n) // side, torch.arange(n) % side], 1)
    mask = torch.ones(2, text + n, dtype=torch.bool)
    mask[1, 2:text] = False  # padding text tokens of the second prompt
    tensors = {
        "hidden_states": torch.randn(2, n, transformer.config.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(2, text, transformer.config.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(2, transformer.config.pooled_projection_dim, generator=gen),
        "timestep": torch.rand(2, generator=gen),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.full((2,), 3.5),
    }
    out = {k: v.to(DEVICE) for k, v in tensors.items()}
    out["joint_attention_kwargs"] = {"attention_mask": mask.to(DEVICE)}
    return out


@pytest.mark.parametrize("preset", ["fp16", "kv-int8", "kv-int4", "qk-int8-pv-fp8"])
def test_flux_transformer_triton_matches_reference(preset, monkeypatch):
    transformer = tiny_flux_pipeline(head_dim=32).transformer.to(DEVICE)
    inputs = _inputs(transformer)
    with torch.no_grad():
        exact = transformer(**inputs, return_dict=False)[0]
        apply(transformer, preset, backend="reference")
        reference = transformer(**inputs, return_dict=False)[0]
        apply(transformer, preset, backend="triton")
        with monkeypatch.context() as m:  # a fallback to the reference backend would fail here
            m.setattr(ReferenceBackend, "attention", _no_fallback)
            triton = transformer(**inputs, return_dict=False)[0]
        remove(transformer)
    assert torch.isfinite(triton).all()
    kernel = (triton - reference).abs().max().item()
    # measured max |diff| (outputs up to ~2): kernel vs reference 4.8e-7 (qk-int8-pv-fp8) .. 2.1e-5 (fp16 compute
    # of float32 inputs); reference vs exact attention 3e-7 (fp16), 5.0e-4 (kv-int8), 1.7e-3 (qk), 5.3e-3 (kv-int4)
    assert kernel < 6e-5
    if preset != "fp16":
        assert kernel < (reference - exact).abs().max().item() / 8
