"""CPU compatibility for Megatron-Core's local (non Transformer Engine) path.

Megatron-Core assumes CUDA in a handful of places even when the model uses the local layer
spec: `device='cuda'` literals in the optimizer, the grad scaler, gradient clipping and the DDP
buffers; `torch.cuda.current_device()` as an allocation device; an RNG tracker built on CUDA
generator states; CUDA streams and events around gradient communication; and checks of the form
`param.type() == 'torch.cuda.FloatTensor'` that use the legacy type string as a dtype check.

`install()` maps each of these onto the CPU, in this one module, without touching Megatron's
files. It is called by `runtime.distributed.initialize` only when CUDA is absent, and refuses to
run when CUDA is present, so a cluster never executes any of it.

What is mapped, and why each choice:

* Device arguments: a `TorchFunctionMode` rewrites a CUDA `device` (``'cuda'``, ``'cuda:N'``,
  ``torch.device('cuda')`` or a bare index, which torch reads as a CUDA ordinal) to the CPU, and
  makes `Tensor.cuda()` / `Tensor.pin_memory()` return the tensor itself. A mode catches every
  literal at once, including ones a future Megatron release adds, at the cost of one Python call
  per torch function (well under 1% of a training step, measured in benchmarks/).
* Legacy type strings: `Tensor.type()` reports a CPU tensor as its CUDA twin
  (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``). Megatron only ever compares these strings
  to pick fp32 / fp16 / bf16 handling (gradient clipping, the FP32 and distributed optimizers),
  so this keeps its dtype logic, and gradient clipping, intact.
* RNG: the CUDA generator that Megatron's `CudaRNGStatesTracker` forks is mapped onto the CPU
  default generator. `torch.cuda.manual_seed` must really seed it (not be a no-op): that is what
  makes tensor-parallel ranks initialize identical replicated weights.
* Streams, events, synchronize, NVTX: inert stand-ins. The CPU runs every op synchronously, so a
  stream wait or an event query is already satisfied.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_installed = False
_mode: "_CpuDeviceMode | None" = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal for torch factories and `.to()`; bool is an int too, but is
    # never a device.
    return isinstance(device, int) and not isinstance(device, bool)


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU; see the module docstring."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _Event:
    """Stand-in for `torch.cuda.Event`: CPU ops are synchronous, so an event is always done."""

    def __init__(self, enable_timing: bool = False, **_):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_Event") -> float:
        return (end._t - self._t) * 1000.0


class _Stream:
    """Stand-in for `torch.cuda.Stream`."""

    def __init__(self, *_, **__):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or _Event()
        event.record()
        return event

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _Stream()


def _rng_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.set_stream = lambda stream: None
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.manual_seed
    cuda.get_rng_state = _rng_state
    cuda.set_rng_state = _set_rng_state
    # Megatron imports these function objects directly, so patch them on the real module.
    cuda.nvtx.range_push = lambda msg=None, *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _rng_state
    mcore_random._set_cuda_rng_state = _set_rng_state


def install() -> None:
    """Install the CPU compatibility layer (idempotent). Refuses when CUDA is available."""
    global _installed, _mode
    if _installed:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "megatron_foresight.runtime.compat is the CPU compatibility layer and must not be "
            "installed when CUDA is available; the CUDA path runs Megatron-Core unmodified."
        )
    _patch_torch_cuda()
    _patch_megatron()
    _mode = _CpuDeviceMode()
    _mode.__enter__()  # stays active for the life of the process
    _installed = True
    log.debug("CPU compatibility layer for Megatron-Core installed")


def is_installed() -> bool:
    return _installed


@contextlib.contextmanager
def device_mode_off():
    """Run a block without the device-rewriting mode: one Python call less per torch function.

    For hot loops that allocate nothing on a device (a decode step writes into a KV cache that
    the prefill allocated): there the mode is pure overhead (about 3 us per op, most of a
    small model's decode step). A CUDA device argument inside the block fails loudly ("Torch
    not compiled with CUDA"), never silently. Does nothing when the layer is not installed, or
    when another mode was pushed above ours (a profiler's), which must not be popped."""
    from torch.overrides import _get_current_function_mode

    if _mode is None or _get_current_function_mode() is not _mode:
        yield
        return
    _mode.__exit__(None, None, None)
    try:
        yield
    finally:
        _mode.__enter__()
