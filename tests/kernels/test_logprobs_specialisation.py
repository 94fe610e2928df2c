"""A new token count never compiles a log-prob kernel again.

Triton compiles a kernel once per *specialisation*: the constexpr values, ``num_warps``, and for every other argument
its type plus, unless the kernel lists it in ``do_not_specialize`` / ``do_not_specialize_on_alignment``, whether an
integer is 1 or a multiple of 16 and whether a pointer is 16-byte aligned. Each launch is recorded here and its
specialisation computed with Triton's own ``native_specialize_impl`` (what the GPU launcher calls), honouring the
kernel's lists. Calls with different token counts, tile plans and label views must all land on one specialisation
per kernel and configuration (dtype, entropy or not). On a GPU, ``tests/gpu/test_gpu_kernels.py`` counts the
compiled kernels themselves.
"""

import inspect
from collections import defaultdict

import pytest
import torch
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

from logprobs_reference import DEVICES, random_labels
from rlmf.kernels import logprobs_from_hidden, logprobs_from_logits

DEVICE = DEVICES["triton"]


def _kernel_lists(kernel):
    """``(do_not_specialize, do_not_specialize_on_alignment)`` as parameter names, compiled or interpreted kernel."""
    names = list(inspect.signature(kernel.fn).parameters)
    options = getattr(kernel, "kwargs", None) or {
        "do_not_specialize": kernel.do_not_specialize,
        "do_not_specialize_on_alignment": kernel.do_not_specialize_on_alignment,
    }

    def as_names(items):
        items = {names[i] if isinstance(i, int) else i for i in (items or ())}
        assert items <= set(names), f"{kernel.fn.__name__}: no parameter {sorted(items - set(names))}"
        return items

    return as_names(options.get("do_not_specialize")), as_names(options.get("do_not_specialize_on_alignment"))


def _specialisation(kernel, args, kwargs):
    names = list(inspect.signature(kernel.fn).parameters)
    no_value, no_alignment = _kernel_lists(kernel)
    key = []
    for name, arg in zip(names, args):
        specialise, align = name not in no_value, name not in no_alignment
        key.append((name,) + tuple(native_specialize_impl(BaseBackend, arg, False, specialise, align)))
    return tuple(key) + tuple(sorted((k, str(v)) for k, v in kwargs.items()))


@pytest.fixture
def launches(monkeypatch):
    """``{kernel name: [specialisation of each launch]}`` for every kernel of both Triton modules.

    The launches are recorded, not run (the interpreter would take seconds): the values the ops return are then
    meaningless, and only what the ops pass to their kernels is checked here; tests/kernels/test_logprobs_from_*.py
    check the values."""
    from rlmf.kernels import logprobs_hidden_triton, logprobs_logits_triton

    seen = defaultdict(list)
    for module in (logprobs_hidden_triton, logprobs_logits_triton):
        for name, kernel in vars(module).items():
            if not name.endswith("_kernel"):
                continue

            def recording_run(*args, _kernel=kernel, _name=name, grid, warmup, **kwargs):
                seen[_name].append(_specialisation(_kernel, args, kwargs))

            monkeypatch.setattr(kernel, "run", recording_run)
    return seen


def _labels(n, v, offset, generator):
    """Labels for ``n`` tokens as a view ``offset`` elements into a larger tensor (a shifted ``[1, T]`` batch is)."""
    return random_labels(n + offset, v, "some", generator)[offset:].to(DEVICE)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_hidden_op_compiles_once_whatever_the_token_count(launches, dtype):
    generator = torch.Generator().manual_seed(0)
    h, v = 16, 70
    weight = torch.randn(v, h, generator=generator).to(dtype).to(DEVICE).requires_grad_()
    # Token counts 1, 16, 17, 40 and 33 give tiles whose row and column counts are 1, multiples of 16 or neither.
    for n, chunk_size, offset in ((1, 1 << 20, 0), (16, (16, 32), 1), (17, (8, 16), 3), (40, 600, 0), (33, 96, 2)):
        hidden = torch.randn(n, h, generator=generator).to(dtype).to(DEVICE).requires_grad_()
        labels = _labels(n, v, offset, generator)
        logp, entropy = logprobs_from_hidden(
            hidden, weight, labels, return_entropy=True, backend="triton", chunk_size=chunk_size
        )
        (logp.sum() + entropy.sum()).backward()
        logprobs_from_hidden(hidden, weight, labels, backend="triton", chunk_size=chunk_size).sum().backward()
    assert set(launches) == {"_tile_stats_kernel", "_tile_grad_kernel"}
    for name, keys in launches.items():
        assert len(keys) > 10, name
        # Two configurations each (with and without the entropy): nothing more.
        assert len(set(keys)) == 2, f"{name}: {len(set(keys))} specialisations over {len(keys)} launches"


def test_logits_op_compiles_once_whatever_the_token_count(launches):
    generator = torch.Generator().manual_seed(1)
    v = 50
    for n, offset in ((1, 0), (16, 1), (17, 2), (40, 0)):
        logits = torch.randn(n, v, generator=generator).to(DEVICE).requires_grad_()
        logp, entropy = logprobs_from_logits(logits, _labels(n, v, offset, generator), return_entropy=True,
                                             backend="triton")
        (logp.sum() + entropy.sum()).backward()
    assert set(launches) == {"_logits_forward_kernel", "_logits_backward_kernel"}
    for name, keys in launches.items():
        assert len(set(keys)) == 1, f"{name}: {len(set(keys))} specialisations over {len(keys)} launches"


def test_the_probe_tells_widths_apart_unless_the_kernel_lists_them():
    """Control: Triton's specialisation separates a tile width of 16 from one of 17 (a multiple of 16 or not), so
    the checks above would see a width that changes; with ``n_cols`` in the kernel's ``do_not_specialize`` they
    do not."""
    from rlmf.kernels import logprobs_hidden_triton

    kernel = logprobs_hidden_triton._tile_stats_kernel
    assert list(inspect.signature(kernel.fn).parameters)[3] == "n_cols"
    assert native_specialize_impl(BaseBackend, 16, False, True, True) != \
        native_specialize_impl(BaseBackend, 17, False, True, True)
    z = torch.zeros(4, 32, device=DEVICE)
    assert len({_specialisation(kernel, (z, z.stride(0), 1, cols, 0, 0), {}) for cols in (16, 17)}) == 1
    assert "n_cols" in _kernel_lists(kernel)[0]
