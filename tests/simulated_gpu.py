"""A simulated CUDA device, for checking device placement on a machine without a GPU.

Every tensor "on the GPU" is a :class:`OnGPU` wrapper around a CPU tensor: it reports
``device == cuda:0`` and ``is_cuda``, computes on the CPU (so results are the CPU's, bit for
bit), and every operation checks what a real GPU checks -- all tensor operands on one device
(CPU scalars, CPU index tensors and cross-device copies excepted, as in CUDA) -- raising
CUDA's own message otherwise. ``.numpy()`` on it fails as on a GPU. Tensors reach it the ways
they reach a GPU: ``.to("cuda")`` / ``.cuda()`` on a tensor or a module, or a factory with
``device="cuda"``; ``.cpu()`` / ``.to("cpu")`` bring them back. A CPU operand is a plain
tensor that Python code made while the simulation ran (so run the whole workload inside it);
what torch makes in C++ from a GPU tensor (autograd's zero gradients, index tensors, a backward
formula's constants) would be on the GPU and counts as such.

What it stubs (the GPU's runtime, not placement): ``torch.cuda.is_available`` / ``device_count``
/ ``set_device`` / ``current_device`` / ``get_device_name`` / ``mem_get_info`` / the CUDA RNG
state, CUDA events (timed by the host's clock), and memory pinning. :func:`count_host_syncs`
counts the reads that would make the host wait for a real GPU. What it cannot check: CUDA kernels themselves, nccl, streams and timing; those need a
real GPU (tests/pipeline/test_device.py's CUDA tests).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import torch
import torch.utils.data._utils.pin_memory as pin_memory
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

GPU = torch.device("cuda", 0)
NAME = "Simulated GPU"

# Operations CUDA runs with operands on different devices: cross-device copies, and index
# tensors on the CPU (indexing a GPU tensor moves them).
_CROSS_DEVICE = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}
_CPU_INDICES = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
                torch.ops.aten._index_put_impl_.default}


class OnGPU(torch.Tensor):
    """A CPU tensor (``elem``) standing for one on the simulated GPU.

    To torch's C++ side the wrapper is a CPU tensor, so what torch makes internally from its
    metadata (autograd's zero gradients, index tensors, a backward formula's constants) holds
    real values; Python code sees ``cuda:0`` (:class:`_Placement`).
    """

    elem: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> "OnGPU":
        wrapper = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(), dtype=elem.dtype,
                                                      storage_offset=elem.storage_offset(), device=elem.device,
                                                      requires_grad=elem.requires_grad)
        wrapper.elem = elem
        return wrapper

    def __repr__(self) -> str:
        return f"OnGPU({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206 -- torch's protocol
        kwargs = kwargs or {}
        if func not in _CROSS_DEVICE:
            _check_one_device(func, args, kwargs)
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is torch.ops.aten.copy_.default:
            return args[0]
        return tree_map(lambda t: OnGPU(t) if type(t) is torch.Tensor else t, out)


# Marks the plain tensors Python code makes while the simulation runs: these are on the CPU.
# Tensors torch makes in C++ from an OnGPU tensor's metadata are not marked (they would be on
# the GPU). An attribute, not a weak reference: torch cannot swap a tensor that has one.
_HOST = "_simulated_gpu_host"


def _unwrap(value: Any) -> Any:
    return value.elem if isinstance(value, OnGPU) else value


def _check_one_device(func: Any, args: tuple, kwargs: dict) -> None:
    """CUDA's rule: a GPU operand and a CPU operand (other than a 0-dim scalar or an index) fail."""
    operands = list(args) + list(kwargs.values())
    if func in _CPU_INDICES:
        operands = [args[0], *args[2:]]
    flat: list[torch.Tensor] = []
    tree_map(lambda t: flat.append(t) if isinstance(t, torch.Tensor) else None, operands)
    if any(t.dim() > 0 and getattr(t, _HOST, False) for t in flat if not isinstance(t, OnGPU)):
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"cuda:0 and cpu! (simulated GPU, in {func})")


class _ToGPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return OnGPU(tensor.detach().clone())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _unwrap(grad)


class _ToCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.elem.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return OnGPU(grad)


def _is_gpu(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _refuse_numpy(tensor: OnGPU) -> None:
    raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                    "to host memory first. (simulated GPU)")


# What Python asks of a GPU tensor outside torch's operators, answered as a GPU would.
_AS_ON_A_GPU = {torch.Tensor.device.__get__: lambda t: GPU, torch.Tensor.is_cuda.__get__: lambda t: True,
                torch.Tensor.get_device: lambda t: 0, torch.Tensor.tolist: lambda t: t.elem.tolist(),
                torch.Tensor.numpy: _refuse_numpy}


# Reads of a GPU tensor's value by the host: on a real GPU each one waits for the GPU to finish
# the work queued before it.
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__,
               torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}
_host_syncs: list[str] = []  # the reads made while count_host_syncs() runs, by name


class _Placement(TorchFunctionMode):
    """Moves tensors to and from the simulated GPU at the Python API, before torch would look
    for a real one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206 -- torch's protocol
        kwargs = kwargs or {}
        subject = args[0] if args else None
        if isinstance(subject, OnGPU) and func in _HOST_READS:
            _host_syncs.append(func.__name__)
        if isinstance(subject, OnGPU) and func in _AS_ON_A_GPU:
            return _AS_ON_A_GPU[func](subject)
        if func is torch.Tensor.pin_memory:
            return subject
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu) and isinstance(subject, torch.Tensor):
            moved = self._move(func, subject, args[1:], kwargs)
            if isinstance(subject, OnGPU) and not isinstance(moved, OnGPU):
                _host_syncs.append(func.__name__)  # a copy to the host
            return _mark_host(moved)
        if _is_gpu(kwargs.get("device")):  # a factory asked for the GPU
            out = func(*args, **{**kwargs, "device": "cpu"})
            return OnGPU(out) if isinstance(out, torch.Tensor) else out
        return _mark_host(func(*args, **kwargs))

    @staticmethod
    def _move(func: Any, tensor: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        copy = False
        if func is torch.Tensor.cuda:
            target = GPU
            dtype = None
        elif func is torch.Tensor.cpu:
            target, dtype = torch.device("cpu"), None
        else:
            if args and isinstance(args[0], torch.Tensor):  # .to(other): its device and dtype
                other = args[0]
                target, dtype = (GPU if isinstance(other, OnGPU) else torch.device("cpu")), other.dtype
            else:
                copy = kwargs.pop("copy", False)
                target, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            tensor = tensor.to(dtype, copy=copy)  # on the tensor's own device
        if target is None or _is_gpu(target) == isinstance(tensor, OnGPU):
            return tensor.clone() if copy and dtype is None else tensor
        return _ToGPU.apply(tensor) if _is_gpu(target) else _ToCPU.apply(tensor)


def _mark_host(out: Any) -> Any:
    def mark(value: Any) -> None:
        if type(value) is torch.Tensor or isinstance(value, nn.Parameter) and not isinstance(value, OnGPU):
            setattr(value, _HOST, True)
    tree_map(mark, out)
    return out


class _HostTimedEvent:
    """``torch.cuda.Event(enable_timing=True)``, timed by the host's clock."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.at = 0.0

    def record(self, stream: Any = None) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: "_HostTimedEvent") -> float:
        return (end.at - self.at) * 1000  # milliseconds, as CUDA's


class _NotCapturing:
    """The current stream, as torch's optimizers ask it whether a CUDA graph is being captured."""

    @staticmethod
    def is_capturing() -> bool:
        return False


@contextmanager
def simulated_gpu() -> Iterator[None]:
    """The simulated GPU for the block: torch reports one CUDA device, and placement is checked.
    Everything it changes in torch is restored when the block ends."""
    cuda_rng = torch.get_rng_state()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"is_available": lambda: True, "device_count": lambda: 1,
                            "set_device": lambda device: None, "current_device": lambda: 0,
                            "get_device_name": lambda device=None: NAME,
                            "get_rng_state": lambda device=None: cuda_rng.clone(),
                            "set_rng_state": lambda state, device=None: None,
                            "manual_seed_all": lambda seed: None, "synchronize": lambda device=None: None,
                            "mem_get_info": lambda device=None: (64 << 30, 80 << 30),
                            "Event": _HostTimedEvent}.items():
            patch.setattr(torch.cuda, name, value)
        patch.setattr(torch.accelerator, "current_stream", lambda device=None: _NotCapturing())
        patch.setattr(pin_memory, "pin_memory", lambda data, device=None: data)
        # A module moved between devices keeps its Parameter objects (on a GPU ``param.data`` is
        # replaced; a wrapper tensor cannot take another's data, so the objects are swapped instead).
        patch.setattr(torch.__future__, "get_swap_module_params_on_conversion", lambda: True)
        deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        try:
            with _Placement():
                yield
        finally:
            torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


@contextmanager
def count_host_syncs() -> Iterator[list[str]]:
    """The host reads of simulated-GPU tensors made in the block (``.item()``, ``.tolist()``,
    ``bool()``, a copy to the CPU, ...), by name, in order: on a real GPU each one stalls the
    host until the GPU has drained its queue. Use inside :func:`simulated_gpu`."""
    start = len(_host_syncs)
    reads: list[str] = []
    try:
        yield reads
    finally:
        reads.extend(_host_syncs[start:])
        del _host_syncs[start:]
