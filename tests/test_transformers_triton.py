"""QuantizedKVCache read in place by the Triton kernels (CPU interpreter here), against the reference backend."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
pytest.importorskip("transformers")

from conftest import rel_l1  # noqa: E402
from test_transformers import make, padded_batch, stepwise_logits  # noqa: E402

from quantattn_hf.integrations.kv_cache import QuantizedKVCache  # noqa: E402
from quantattn_hf.integrations.transformers import configure  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 set before triton kernels load",
)


@pytest.mark.parametrize(("preset", "pads"), [("kv-int8", (0, 3)), ("kv-int4", (0, 3)), ("kv-int8", (0, 0))])
def test_cache_through_triton_kernels_matches_reference(preset, pads):
    """Prefill of 14 tokens (padded: a mask; unpadded: causal without one), then 2 decode steps, GQA 4/2, D 32."""
    ids, mask = padded_batch(seed=13, length=16, pads=pads)
    model = make("llama", num_hidden_layers=1, head_dim=32, hidden_size=128)
    outs = {}
    for backend in ("reference", "triton"):
        configure(model, preset, backend=backend)
        cache = QuantizedKVCache(model, block_size=8, residual_length=2)
        outs[backend] = stepwise_logits(model, ids, mask, cache, prefill=14)
        assert cache.layers[0].n_quant == 8 and cache.layers[0].keys.shape[2] == 8
    err = rel_l1(outs["triton"], outs["reference"])
    assert err < 5e-4, err  # measured 1.4e-4 (int8), 1.7e-4 (int4), 1.4e-4 (unpadded): P, V' rounded to 16 bits
