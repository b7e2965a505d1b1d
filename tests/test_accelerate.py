"""vqfast.accelerate itself: argument checks, what it imports, the table, and vqfast's own compat classes.
(Each library's conversions are tested in tests/test_compat_<library>.py.)"""
import subprocess
import sys
import textwrap

import pytest
import torch

import vqfast
from vqfast.compat import RECOGNISED, SEARCH_FREE, recognise


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
    # Recognition reads classes and their source files only: accelerating a plain model imports none of
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
    # A class that shares a recognised name and nothing else (no method of a release) is not recognised.
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


# ---- verbose=True always says what it found -----------------------------------------------------------------

def _lines(capsys):
    return capsys.readouterr().out.strip().splitlines()


def test_nothing_found_says_so_naming_the_model(capsys):
    vqfast.accelerate(torch.nn.Linear(2, 2), verbose=True)
    assert _lines(capsys) == [
        "vqfast.accelerate: nothing converted in Linear (torch.nn.modules.linear): no quantizer vqfast recognises"]
    vqfast.accelerate(torch.nn.Linear(2, 2))  # silent without verbose
    assert _lines(capsys) == []


def test_fsq_and_lfq_need_no_search_and_are_left_as_they_are(capsys):
    vqp = pytest.importorskip("vector_quantize_pytorch")

    class Tokenizer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 3)
            self.fsq = vqp.FSQ(levels=[8, 5, 5])
            self.lfq = vqp.LFQ(dim=4, codebook_size=16)
            self.rfsq = vqp.ResidualFSQ(dim=4, levels=[8, 5], num_quantizers=2)

    torch.manual_seed(0)
    model = Tokenizer()
    classes = {name: type(m) for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 6, 3)
    before = model.fsq(x)
    assert vqfast.accelerate(model, verbose=True) is model
    assert _lines(capsys) == [
        "vqfast.accelerate: fsq: vector-quantize-pytorch FSQ needs no nearest-codeword search "
        "(it rounds each dimension to a fixed set of levels): left as it is",
        "vqfast.accelerate: lfq: vector-quantize-pytorch LFQ needs no nearest-codeword search "
        "(it takes the sign of each dimension): left as it is",
        # its FSQ stages (rfsq.layers.*) get no lines of their own
        "vqfast.accelerate: rfsq: vector-quantize-pytorch ResidualFSQ needs no nearest-codeword search "
        "(its stages are FSQs): left as it is",
        f"vqfast.accelerate: nothing converted in Tokenizer ({__name__}): no quantizer vqfast recognises",
    ]
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    after = model.fsq(x)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_the_search_free_table_names_classes_of_the_installed_library():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    for entry in SEARCH_FREE:
        cls = getattr(vqp, entry.class_name)
        assert entry.matches(cls), entry
        assert not any(r.matches(cls) for r in RECOGNISED)


def test_a_recognised_and_an_unrecognised_quantizer_are_each_reported(capsys):
    vqp = pytest.importorskip("vector_quantize_pytorch")

    class MyQuantizer(torch.nn.Module):
        def forward(self, x):
            return x

    model = torch.nn.ModuleDict({"vq": vqp.VectorQuantize(dim=4, codebook_size=16), "mine": MyQuantizer()})
    vqfast.accelerate(model, verbose=True)
    assert _lines(capsys) == [
        "vqfast.accelerate: vq: vector-quantize-pytorch VectorQuantize replaced (backend='auto', precision='exact')",
        f"vqfast.accelerate: mine: {__name__}.MyQuantizer left: not a class vqfast recognises",
    ]
    assert type(model["mine"]) is MyQuantizer and type(model["vq"]) is not vqp.VectorQuantize


def test_recognised_but_unsupported_quantizers_are_named_in_the_summary(capsys):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    model = torch.nn.Sequential(vqp.VectorQuantize(dim=4, codebook_size=16, stochastic_sample_codes=True))
    vqfast.accelerate(model, verbose=True)
    lines = _lines(capsys)
    assert len(lines) == 2 and "0: vector-quantize-pytorch VectorQuantize left on its original code" in lines[0]
    assert lines[1] == ("vqfast.accelerate: nothing converted in Sequential (torch.nn.modules.container): "
                        "its 1 recognised quantizer(s) are left on their original code")


def test_vqfasts_own_quantizers_are_named_as_such(capsys):
    model = torch.nn.Sequential(vqfast.ResidualVectorQuantizer(2, 8, 4))
    vqfast.accelerate(model, verbose=True)
    assert _lines(capsys) == ["vqfast.accelerate: 0: vqfast.modules.ResidualVectorQuantizer is vqfast's own "
                              "quantizer (it searches with vqfast already): left as built"]


def _overridden(compat: type, original: type) -> set[str]:
    """The methods of ``original`` (defined in its own class body or its library's bases) that ``compat``'s
    classes define: what a conversion replaces."""
    ours = {n for k in compat.__mro__ if k.__module__.startswith("vqfast.") for n, v in vars(k).items()
            if callable(v) and not n.startswith("__")}
    theirs = {n for k in original.__mro__ if not k.__module__.startswith(("torch", "builtins"))
              for n, v in vars(k).items() if callable(v) and not n.startswith("__")
              and getattr(v, "__name__", n) == n}  # an alias (update_ema_indices = update_indices) is its target's
    return ours & theirs


@pytest.mark.parametrize("key,module,name", [
    ("diffusers", "diffusers.models.autoencoders.vae", "VectorQuantizer"),
    ("vector-quantize", "vector_quantize_pytorch.vector_quantize_pytorch", "VectorQuantize"),
    ("taming-v1", "taming.modules.vqvae.quantize", "VectorQuantizer"),
])
def test_each_entry_fingerprints_every_method_its_compat_class_replaces(key, module, name):
    from vqfast.compat import RECOGNISED_BY_KEY

    entry = RECOGNISED_BY_KEY[key]
    library = pytest.importorskip(module)
    methods = {p for p in entry.replaces if "." not in p and not p.endswith("()")}
    assert _overridden(entry.compat_class(), getattr(library, name)) == methods
    if key == "vector-quantize":  # its codebook's class is swapped too
        from vqfast.compat.vector_quantize import Codebook

        codebook = {p.split(".", 1)[1] for p in entry.replaces if p.startswith("Codebook.")}
        assert _overridden(Codebook, library.Codebook) == codebook
