"""The one place that knows which backends exist and picks one for a call.

Order for CUDA tensors: triton -> cuda (compiled kernels) -> reference.
Order for CPU tensors:  cpp -> reference.  (triton on CPU tensors only under TRITON_INTERPRET=1,
and only when asked for by name.)
Overrides: the `backend=` keyword of each op, then the DGKERNELS_BACKEND environment variable (read
at every call), then `use_backend(...)` as a context manager. Asking for a backend that cannot
run the call raises BackendUnavailableError naming the reason.

The contract (xformers' operators and their `not_supported_reasons`): each op family registers one
`Backend` per backend name, a declaration of what it runs (device types, dtypes, size limits) and
of the module implementing the family's primitives under the reference's names. Dispatch is keyed
on the primitive; `select` asks the backends in order and `explain` / BackendUnavailableError
report each declaration's reasons. A call is described by CallFacts (device type, dtypes, sizes).
"""
from __future__ import annotations

import contextlib
import functools
import operator
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import _extension
from ._triton_signature import interpreting
from ._validate import FLOAT_DTYPES

BACKENDS = ("triton", "cuda", "cpp", "reference")
_ENV = "DGKERNELS_BACKEND"
_override: list[str] = []
# primitive -> backend name -> Backend; public op name -> the primitive it dispatches on
_REGISTRY: dict[str, dict[str, "Backend"]] = {}
_PUBLIC: dict[str, str] = {}


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run this call; the message says why."""


@dataclass(frozen=True)
class CallFacts:
    """What a backend's declaration may look at: hashable, so the torch.compile path can hand its
    fields to a function whose result is a trace-time constant (build it with `call_facts`, which
    turns sizes into Python ints).

    device: device type ("cuda", "cpu", "meta"); dtypes: the floating dtypes of the call's
    tensors (empty: not stated, nothing refused for a dtype); sizes: sorted (name, value) pairs,
    e.g. (("D", 4), ("K", 1000)) for head_agreement, (("head_dim", 64),) for the prompt attention.
    """

    device: str
    dtypes: tuple = ()
    sizes: tuple = ()

    def size(self, name: str, default: int | None = None) -> int | None:
        return dict(self.sizes).get(name, default)

    def unsupported_dtype(self, supported) -> torch.dtype | None:
        """The first of this call's dtypes outside `supported`, or None."""
        return next((d for d in self.dtypes if d not in supported), None)


def call_facts(device, dtype=None, **sizes) -> CallFacts:
    """CallFacts from a device (torch.device or its type), a dtype or sequence of dtypes, and sizes."""
    device_type = device if isinstance(device, str) else torch.device(device).type
    device_type = torch.device(device_type).type  # "cuda:1" -> "cuda"
    if dtype is None:
        dtypes = ()
    elif isinstance(dtype, torch.dtype):
        dtypes = (dtype,)
    elif isinstance(dtype, (tuple, list)):
        dtypes = tuple(dict.fromkeys(dtype))
    else:
        dtypes = (dtype,)  # refused just below
    for d in dtypes:
        if not isinstance(d, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or a sequence of them, got {d!r}")
    ints = {}
    for name, value in sizes.items():
        if isinstance(value, bool):
            raise TypeError(f"size {name} must be an int, got bool")
        try:
            # operator.index: while torch.compile traces, a symbolic size becomes its value (a
            # guard: a new size recompiles), which the trace-time selection needs as a constant
            ints[name] = operator.index(value)
        except TypeError:
            raise TypeError(f"size {name} must be an int, got {type(value).__name__}") from None
    return CallFacts(device_type, dtypes, tuple(sorted(ints.items())))


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str = ""

    def __bool__(self) -> bool:  # `if dgkernels.backends()["cpp"]:`
        return self.available


def triton_interpret() -> bool:
    return interpreting()


@functools.lru_cache(maxsize=None)
def _triton_import_reason() -> str:
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError:
        return "triton is not installed (no wheel for this platform, or not installed)"
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason
        return f"triton failed to import: {exc}"
    return ""


def _status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(name, True)
    if name == "cpp":
        ok, _, reason = _extension.load()
        return BackendStatus(name, ok, "" if ok else reason)
    if name == "cuda":
        ok, has_cuda, reason = _extension.load()
        if not ok or not has_cuda:
            return BackendStatus(name, False, reason)
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "no CUDA device is visible to torch")
        return BackendStatus(name, True)
    if name == "triton":
        reason = _triton_import_reason()
        if reason:
            return BackendStatus(name, False, reason)
        if not torch.cuda.is_available() and not triton_interpret():
            return BackendStatus(name, False, "no CUDA device is visible to torch (set TRITON_INTERPRET=1 to run the kernels on the CPU)")
        return BackendStatus(name, True)
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def backends() -> dict[str, BackendStatus]:
    """Which backends can run on this machine, with the reason for each one that cannot."""
    return {name: _status(name) for name in BACKENDS}


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one backend for every op called inside the block (an explicit `backend=` wins)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


_DEVICES = {"cpp": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu"), "reference": None}
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what every Triton kernel here runs
_RUNS = {"cpp": "CPU tensors", "cuda": "CUDA tensors",
         "triton": "CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"}


@dataclass(frozen=True)
class Backend:
    """One backend of one op family: what it runs and where its primitives live.

    family: "contrastive", "heads", "prompt"; name: one of BACKENDS (its device types follow from
    it: cpp CPU, cuda CUDA, triton CUDA or CPU under TRITON_INTERPRET=1, reference any);
    module: the module implementing the family's primitives, imported on first use (Triton stays
    out of `import dgkernels`); kernels: what computes (shown by `explain`); dtypes: the floating
    dtypes it runs; names: primitive -> the module's function where the names differ (launchers
    keep their own names); limits: a function of the module `(primitive, call) -> reason or ''`
    for size limits, which live beside the kernels' block sizes.
    """

    family: str
    name: str
    module: str
    kernels: str
    dtypes: tuple = FLOAT_DTYPES
    names: tuple = ()  # (primitive, function) pairs: hashable, as a frozen dataclass field must be
    limits: str | None = None

    def _module(self):
        import importlib

        return importlib.import_module(self.module)

    def primitive(self, name: str) -> Callable:
        """The function computing primitive `name` (imports the module on first use)."""
        return getattr(self._module(), dict(self.names).get(name, name))

    def not_supported_reasons(self, primitive: str, call: CallFacts) -> list[str]:
        """Why this backend cannot run `primitive` for `call` ([] if it can): device type, dtype,
        then the size limits (the module is imported only for a call that passes the first two)."""
        reasons = []
        devices = _DEVICES[self.name]
        if self.name == "triton" and not triton_interpret():
            devices = ("cuda",)
        if devices is not None and call.device not in devices:
            reasons.append(f"the {self.name} backend runs {_RUNS[self.name]}, got {call.device} tensors")
        bad = call.unsupported_dtype(self.dtypes)
        if bad is not None:
            names = "/".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"the {self.name} {self.family} kernels ({self.kernels}) run {names}, got {bad}")
        if not reasons and self.limits is not None:
            why = getattr(self._module(), self.limits)(primitive, call)
            if why:
                reasons.append(why)
        return reasons


def register(backend: Backend, primitives: tuple[str, ...]) -> None:
    """Declare that `backend` runs each of `primitives` (called by each op family at import)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend declarations must be Backend objects, got {backend!r}")
    if backend.name not in BACKENDS:
        raise ValueError(f"unknown backend {backend.name!r}")
    for prim in primitives:
        _REGISTRY.setdefault(prim, {})[backend.name] = backend


def register_public(op: str, primitive: str) -> None:
    """The primitive a public op dispatches on (what `explain(op)` reports)."""
    _PUBLIC[op] = primitive


def implemented(primitive: str) -> tuple[str, ...]:
    return tuple(b for b in BACKENDS if b in _REGISTRY.get(primitive, {}))


def registered_primitives() -> tuple[str, ...]:
    """Every primitive with at least one registered backend."""
    return tuple(_REGISTRY)


def impl_of(primitive: str, name: str) -> Backend:
    """The Backend registered for (primitive, backend name); the custom ops call it at run time."""
    return _REGISTRY[primitive][name]


def _refusal(primitive: str, backend: str, call: CallFacts) -> str:
    """Why `backend` cannot run `primitive` for `call` ('' if it can): registration, availability on
    this machine, then the backend's declaration."""
    impl = _REGISTRY.get(primitive, {}).get(backend)
    if impl is None:
        return f"{primitive} has no {backend} implementation"
    status = _status(backend)
    if not status.available:
        return status.reason
    return "; ".join(impl.not_supported_reasons(primitive, call))


def requested_backend(backend: str | None) -> str | None:
    """The backend named by the call, the environment or `use_backend`, in that order (or None)."""
    if backend is None:
        backend = os.environ.get(_ENV) or None
        if backend is not None:
            backend = backend.strip().lower()
            if backend in ("", "auto"):
                backend = None
    if backend is None and _override:
        backend = _override[-1]
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} (or DGKERNELS_BACKEND=auto)")
    return backend


def _order(device_type: str) -> tuple[str, ...]:
    return ("triton", "cuda", "reference") if device_type == "cuda" else ("cpp", "reference")


def _facts(device: torch.device, call: CallFacts | None) -> CallFacts:
    device = torch.device(device)
    if call is None:
        return CallFacts(device.type)
    if call.device != device.type:
        raise ValueError(f"the call facts are for {call.device} tensors, the call's device is {device}")
    return call


def select(op: str, device: torch.device, backend: str | None = None,
           call: CallFacts | None = None) -> tuple[str, Backend]:
    """Pick the backend for one call of primitive `op` on tensors living on `device`, described by
    `call` (dtypes, sizes; None: the device alone).

    Returns (backend name, its Backend declaration). Raises BackendUnavailableError when a named backend
    cannot run the call; in automatic mode falls through the order above, ending at reference.
    """
    name, impls = select_all((op,), device, backend, call)
    return name, impls[0]


def select_all(ops: tuple[str, ...], device: torch.device, backend: str | None = None,
               call: CallFacts | None = None) -> tuple[str, tuple[Backend, ...]]:
    """One backend that runs every primitive of `ops` for `call` (primitives that work together,
    as the three of one prompt encoding): (name, the Backend of each)."""
    call = _facts(device, call)
    name = requested_backend(backend)
    for op in ops:
        if op not in _REGISTRY:
            raise KeyError(f"no implementation of {op} is registered")
    if name is not None:
        for op in ops:
            why = _refusal(op, name, call)
            if why:
                raise BackendUnavailableError(f"dgkernels.{op}: backend {name!r} is unavailable: {why}")
        return name, tuple(_REGISTRY[op][name] for op in ops)
    reasons = []
    for cand in _order(call.device):
        why = next((w for w in (_refusal(op, cand, call) for op in ops) if w), "")
        if not why:
            return cand, tuple(_REGISTRY[op][cand] for op in ops)
        reasons.append(f"{cand}: {why}")
    raise BackendUnavailableError(f"dgkernels.{'/'.join(ops)}: no backend can run {call.device} tensors: "
                                  + "; ".join(reasons))


@torch.compiler.assume_constant_result
def _select_name(ops: tuple, device_type: str, dtypes: tuple, sizes: tuple, backend: str | None) -> str:
    return select_all(ops, torch.device(device_type), backend, CallFacts(device_type, dtypes, sizes))[0]


def select_name(op: str | tuple[str, ...], device: torch.device, backend: str | None = None,
                call: CallFacts | None = None) -> str:
    """The name `select` (or `select_all` for a tuple of ops) would return, usable while
    torch.compile traces: it runs eagerly at trace time (environment, `use_backend` and
    availability are read then, never in the graph) and enters the graph as a constant. A
    compiled function keeps the backend it was traced with."""
    call = _facts(device, call)
    ops = (op,) if isinstance(op, str) else tuple(op)
    return _select_name(ops, call.device, call.dtypes, call.sizes, backend)


def explain(op: str, device: torch.device | str = "cpu", dtype=None, **sizes) -> dict[str, str]:
    """For each backend, '' if it would run `op` (a public op or a primitive) on `device` for
    inputs of `dtype` (a dtype or a sequence of them; None: not stated) and the op-specific
    `sizes` (e.g. D=, K= for head_agreement, head_dim= for prefix_attention), else the reasons it
    would not, read from the backends' declarations."""
    if op in _RENAMED:
        warnings.warn(f"dgkernels.explain({op!r}): the primitive is now named {_RENAMED[op]!r}", DeprecationWarning,
                      stacklevel=2)
        op = _RENAMED[op]
    call = call_facts(device, dtype, **sizes)
    primitive = _PUBLIC.get(op, op)
    return {b: _refusal(primitive, b, call) for b in BACKENDS}


# primitive names explain() took before the primitives became the dgkernels custom ops
_RENAMED = {"prompt_assemble": "assemble_tokens", "prompt_prefix_attention": "prefix_attention",
            "prompt_eot_head": "eot_head"}

