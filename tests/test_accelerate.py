"""vqfast.accelerate itself: argument checks, what it imports, the table, and vqfast's own compat classes.
(Each library's conversions are tested in tests/test_compat_<library>.py.)"""
import subprocess
import sys
import textwrap

import pytest
import torch

import vqfast
from vqfast.compat import RECOGNISED, recognise


def test_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match="model"):
        vqfast.accelerate("not a module")
    with pytest.raises(ValueError, match="backend"):
        vqfast.accelerate(torch.nn.Linear(2, 2), backend="gpu")
    with pytest.raises(ValueError, match="precision"):
        vqfast.accelerate(torch.nn.Linear(2, 2), precision="approximate")
    with pytest.raises(TypeError, match="verbose"):
        vqfast.accelerate(torch.nn.Linear(2, 2), verbose=1)


def test_a_model_without_quantizers_is_returned_unchanged_and_no_library_is_imported():
    # Recognition reads class names and module paths only: accelerating a plain model imports none of
    # the libraries in the table (each is checked in a fresh interpreter).
    script = textwrap.dedent("""
        import sys, torch, vqfast
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert vqfast.accelerate(model, verbose=True) is model
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        print(sorted(m for m in ("diffusers", "vector_quantize_pytorch", "taming", "models") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_unrecognised_quantizers_are_reported_and_left_alone(capsys):
    class VectorQuantizerOfMyOwn(torch.nn.Module):
        def forward(self, x):
            return x

    model = torch.nn.Sequential(VectorQuantizerOfMyOwn())
    vqfast.accelerate(model, verbose=True)
    assert type(model[0]) is VectorQuantizerOfMyOwn
    assert "VectorQuantizerOfMyOwn left: not a class vqfast recognises" in capsys.readouterr().out


def test_the_table_names_importable_compat_classes():
    for entry in RECOGNISED:
        cls = entry.compat_class()
        assert callable(getattr(cls, "unsupported_reason")) and callable(getattr(cls, "_vqfast_adopt"))
    # A class with a recognised name under another module path is not recognised.
    lookalike = type("VectorQuantizer2", (torch.nn.Module,), {"__module__": "mypackage.quant"})
    assert recognise(lookalike()) is None


def test_vqfast_compat_instances_take_the_new_backend(capsys):
    from vqfast.compat.taming import VectorQuantizer2

    vq = VectorQuantizer2(16, 4, 0.25)
    z = torch.randn(2, 4, 3, 3)
    before = vq(z)
    vqfast.accelerate(vq, backend="torch", precision="exact", verbose=True)
    assert "is vqfast's already (backend='torch'" in capsys.readouterr().out
    after = vq(z)
    assert torch.equal(before[2][2], after[2][2]) and torch.equal(before[0], after[0])
    assert (vq.vqfast_backend, vq.vqfast_precision) == ("torch", "exact")
    vqfast.accelerate(vq, backend="cpu", precision="fast")
    assert (vq.vqfast_backend, vq.vqfast_precision) == ("cpu", "fast")
