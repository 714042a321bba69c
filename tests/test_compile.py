"""torch.compile of a patched model (dynamo with a counting backend: no C++ compiler needed, fast;
and once through the default inductor backend on a tiny model): the same outputs as eager;
fixed-count methods trace into one graph; threshold methods break the graph only where the
data-dependent count is read, and stop recompiling once shapes are dynamic."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounter

import atmerge
from conftest import blocky_images, small_vit


@pytest.fixture()
def images():
    return [blocky_images(4, cells=4, noise=n, seed=s) for n, s in [(0.1, 1), (0.3, 2), (0.05, 3), (0.2, 4)]]


def compiled_run(method, images, **options):
    """Frames compiled after each call.  Hermetic: dynamo's profile-guided dynamic shapes
    (``automatic_dynamic_local_pgo``, on by default) would otherwise carry decisions from earlier
    runs and tests through a disk cache and change which call recompiles."""
    torch.manual_seed(0)
    model = small_vit()
    atmerge.patch(model, method, **options)
    dynamo.reset()
    torch._dynamo.pgo.reset_code_state()
    counter = CompileCounter()
    frames = []
    with dynamo.config.patch(automatic_dynamic_local_pgo=False), torch.no_grad():
        compiled = torch.compile(model, backend=counter)
        for x in images:
            assert (compiled(x) - model(x)).abs().max() == 0  # the same ops as eager
            frames.append(counter.frame_count)
    dynamo.reset()
    return frames


def test_fixed_count_methods_compile_into_one_graph(images):
    assert compiled_run(atmerge.ToMe(r=3), images) == [1, 1, 1, 1]
    assert compiled_run(atmerge.ToMe(r=3), images, prop_attn=False) == [1, 1, 1, 1]


@pytest.mark.parametrize("batch_adaptive", [True, False])
def test_threshold_methods_stop_recompiling_once_shapes_are_dynamic(batch_adaptive):
    """The count above θ is read once per block (a graph break: the token count after it depends
    on the data); new images with new counts compile nothing new after the second call.  Run in a
    fresh process: dynamo keeps state across ``dynamo.reset()`` that earlier tests of the suite
    leave behind (the count of frames then depends on the test order)."""
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import atmerge; "
        "from test_compile import compiled_run; from conftest import blocky_images; "
        "images = [blocky_images(4, cells=4, noise=n, seed=s) for n, s in [(0.1, 1), (0.3, 2), (0.05, 3), (0.2, 4)]]; "
        "print(json.dumps(compiled_run(atmerge.ATM(alpha=0.9, beta=0.1, theta_min=0.3, "
        "batch_adaptive=sys.argv[2] == 'True'), images)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(batch_adaptive)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    frames = json.loads(done.stdout.strip().splitlines()[-1])
    assert frames[1] == frames[2] == frames[3], frames


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="inductor on CPU needs a C++ compiler"
)
def test_inductor_compiled_tome_equals_eager():
    """The default backend (inductor: generated, fused C++ kernels) on a tiny model: ToMe's outputs
    and statistics as eager.  Fused kernels sum in another order: equal to float32 rounding
    (measured 7e-8 on logits of ~0.3).  Time, on 2 shared CPU cores: 28-50 s with an empty
    inductor cache (the C++ build; load-dependent), 7 s with a warm one."""
    torch.manual_seed(0)
    model = atmerge.patch(small_vit(patch_size=8, embed_dim=32, depth=2, num_heads=2), atmerge.ToMe(r=3))
    dynamo.reset()
    compiled = torch.compile(model)
    try:
        with torch.no_grad():
            for seed in (1, 2):
                x = blocky_images(2, cells=4, noise=0.1, seed=seed)
                expected, stats = model(x), atmerge.last_stats(model)
                out = compiled(x)
                assert out.shape == expected.shape and (out - expected).abs().max() < 1e-6
                assert atmerge.last_stats(model) == stats and stats.tokens_per_block == [17, 14]
    finally:
        dynamo.reset()
