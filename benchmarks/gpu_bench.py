"""GPU benchmarks of dgkernels against PyTorch and the public peers, written to markdown AS THEY GO.

    python benchmarks/gpu_bench.py [--out FILE] [--budget-s 300] [--sections ceilings,contrastive,maxn,heads,prompt]
    python benchmarks/gpu_bench.py --smoke --out /tmp/x.md     # the same code at tiny sizes on the CPU

Each table row is appended and flushed as soon as it is measured, so a run cut short by a timeout
leaves every finished row behind. Every section gets a share of --budget-s; what does not fit is
written as a "skipped (time budget)" row, never silently left out.

What is measured (scripts/gpu_check.sh runs this after the build and the test suite):
- ceilings: a bf16 8192^3 torch.mm (TFLOP/s; every "% peak" below is a fraction of it) and a device
  copy (GB/s, bytes read + written), in the same run.
- contrastive: clip_loss, info_nce, multiview_info_nce (V = 2 views of N/2 samples, so that every op
  has N x N logits) at N in {4096, 16384}, and after the heads and prompt sections (contrastive_large)
  at N in {65536, 262144}, D in {512, 1024}, bf16 and fp16: forward
  and forward+backward ms (median of CUDA-event timings), TFLOP/s on the useful flops (2 N^2 D
  forward, 8 N^2 D forward+backward), % of the measured bf16 peak, peak memory above inputs and
  gradients, and (at N = 4096, where float64 is cheap) the error of the loss and of the gradients
  against float64; dgkernels' triton and cuda backends side by side with naive PyTorch, open_clip
  ClipLoss and inf-cl (fp32 inputs only, its tf32 mode, labelled). At D >= 256 the triton backward
  writes G slabs (dgkernels.contrastive.triton_slab); clip_loss rows also time the fused backward
  it replaces there ("fused backward (atomics)"), so that one run compares the two.
- maxn: the largest N (doubling, bounded) at which clip_loss forward+backward fits, per impl.
- heads: the head ops at B = 4096, K = 345 (4 domains, F = 512) against their PyTorch references and
  Liger's fused linear cross-entropy (cosine_cross_entropy).
- prompt: encode_prompts at K = 345 classes, G = 32 groups (ViT-B-16 text tower, random weights)
  against the naive 77-token encoder and open_clip encode_text.
Peers whose package is absent are skipped with the import error in the row.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
import unittest.mock

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # the bench_factories_* modules beside this file

import dgkernels  # noqa: E402
from dgkernels.testing import rel_error  # noqa: E402

# Run order: the small and medium rows of every op first, the largest-N rows and the largest-N
# search last, so that a run cut by its time limit loses only the biggest rows.
SECTIONS = ("ceilings", "contrastive", "heads", "prompt", "contrastive_large", "maxn")
# Share of the budget each section may use (what a section leaves unused passes to the next).
SHARE = {"ceilings": 0.03, "contrastive": 0.35, "heads": 0.12, "prompt": 0.15, "contrastive_large": 0.22,
         "maxn": 0.13}


# ---- sizes (full run on a GPU, smoke run on the CPU) ---------------------------------------------

@functools.lru_cache(maxsize=None)
def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(mm=256, copy_mb=16, ns=(64,), large_ns=(128,), ds=(32,), dtypes=("bfloat16",), err_n=64,
                    maxn=(64, 128),
                    maxn_d=32, heads=dict(B=32, D=2, K=13, F=32), prompt=dict(G=2, K=5), target_s=0.02, run_cap_s=5.0)
    return dict(mm=8192, copy_mb=4096, ns=(4096, 16384), large_ns=(65536, 262144), ds=(512, 1024),
                dtypes=("bfloat16", "float16"),
                err_n=4096, maxn=tuple(2 ** k for k in range(16, 21)), maxn_d=512,
                heads=dict(B=4096, D=4, K=345, F=512),
                prompt=dict(G=32, K=345), target_s=0.2, run_cap_s=8.0)


# ---- timing and memory -----------------------------------------------------------------------

class Clock:
    """Median milliseconds of fn(): CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3

    def median(self, fn, reps: int) -> float:
        if not self.cuda:
            return statistics.median(self.once(fn) for _ in range(reps))
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)


def peak_mib_above(fn, device: str, extra_bytes: int = 0) -> float | None:
    """Peak allocated memory of fn() above what was allocated before it, minus `extra_bytes` (the
    gradients fn writes): the memory the op itself needed. On the CPU fn runs and None comes back
    (no allocator statistics)."""
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base - extra_bytes) / 2 ** 20


def _oom_types():
    return (torch.cuda.OutOfMemoryError, MemoryError) if torch.cuda.is_available() else (MemoryError,)


def _free():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- output ------------------------------------------------------------------------------------

class Report:
    """Markdown written line by line (flushed and fsynced: a killed run keeps what it wrote)."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(path, "w")

    def line(self, text: str = "") -> None:
        self.f.write(text + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        print(text, flush=True)

    def table(self, title: str, header: list[str], note: str = "") -> None:
        self.line()
        self.line(f"## {title}")
        if note:
            self.line()
            self.line(note)
        self.line()
        self.line("| " + " | ".join(header) + " |")
        self.line("|" + "|".join("---" for _ in header) + "|")

    def row(self, cells) -> None:
        self.line("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")


def _f(x, fmt="{:.3g}"):
    return "–" if x is None else fmt.format(x)


class Budget:
    def __init__(self, total_s: float):
        self.start, self.total = time.monotonic(), total_s
        self.section_end = self.start

    def open(self, share: float) -> None:
        now = time.monotonic()
        left = self.total - (now - self.start)
        self.section_end = now + max(0.0, min(left, share * self.total + max(0.0, self.section_end - now)))

    def left(self) -> float:
        return self.section_end - time.monotonic()

    def total_left(self) -> float:
        return self.total - (time.monotonic() - self.start)


# ---- header: device, driver, versions, ceilings ----------------------------------------------------

def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001 - absent package
        return "absent"


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except Exception:  # noqa: BLE001
        return "?"


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out or "?"
    except Exception:  # noqa: BLE001
        return "?"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})"


def default_out(device: str) -> str:
    slug = "".join(c if c.isalnum() else "_" for c in device_name(device).lower()).strip("_")
    slug = "_".join(p for p in slug.split("_") if p)
    return os.path.join(HERE, "results", f"gpu_{slug}.md")


def header(rep: Report, device: str, smoke: bool) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rep.line(f"# dgkernels GPU benchmarks: {device_name(device)}{' (SMOKE: tiny sizes on the CPU)' if smoke else ''}")
    rep.line()
    rep.line(f"Generated {now} by `python benchmarks/gpu_bench.py` (scripts/gpu_check.sh), dgkernels git {_git_rev()}; "
             "rows are written as they are measured (a row missing at the end was cut by the time limit).")
    rep.line()
    props = torch.cuda.get_device_properties(0) if device == "cuda" else None
    facts = [("device", device_name(device)),
             ("multiprocessors / memory", f"{props.multi_processor_count} / {props.total_memory / 2 ** 30:.1f} GiB"
              if props else "–"),
             ("driver", _driver() if device == "cuda" else "–"), ("CUDA (torch)", torch.version.cuda),
             ("python", platform.python_version()), ("torch", torch.__version__), ("triton", _version("triton")),
             ("open_clip_torch", _version("open_clip_torch")), ("inf-cl", _version("inf_cl")),
             ("liger-kernel", _version("liger_kernel")),
             ("dgkernels backends", ", ".join(f"{k}: {'yes' if v.available else 'no'}"
                                               for k, v in dgkernels.backends().items()))]
    rep.line("| | |")
    rep.line("|---|---|")
    for k, v in facts:
        rep.row([k, v])


def ceilings(rep: Report, device: str, smoke: bool, clock: Clock) -> dict:
    s = sizes(smoke)
    n = s["mm"]
    dtype = torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    ms = clock.median(lambda: a @ b, 10)
    peak = 2 * n ** 3 / ms / 1e9
    del a, b
    elems = s["copy_mb"] * 2 ** 20 // 4
    x = torch.empty(elems, device=device, dtype=torch.float32).fill_(1)
    y = torch.empty_like(x)
    y.copy_(x)
    cms = clock.median(lambda: y.copy_(x), 10)
    bw = 2 * x.numel() * 4 / cms / 1e6
    del x, y
    _free()
    rep.table("Ceilings measured in this run", ["what", "size", "ms (median of 10)", "rate"])
    rep.row(["bf16 torch.mm (the peak every % below refers to)", f"{n}^3", _f(ms), f"{_f(peak, '{:.4g}')} TFLOP/s"])
    rep.row(["device copy (bytes read + written)", f"{s['copy_mb']} MiB", _f(cms), f"{_f(bw, '{:.4g}')} GB/s"])
    return {"peak_tflops": peak}


# ---- contrastive -------------------------------------------------------------------------------

CONTRASTIVE_OPS = ("clip_loss", "info_nce", "multiview_info_nce")


def _impls(op: str, device: str, d: int = 0) -> list[str]:
    """What a row of op measures: the project's backends, then the peers. At D from the slab
    backward's SLAB_MIN_D, clip_loss also times the fused backward the slabs replace there."""
    fused = ["triton", "cuda"] if device == "cuda" else ["auto"]
    if device == "cuda" and op == "clip_loss" and d >= _slab_min_d():
        fused.insert(1, "triton_fused_bwd")
    peers = {"clip_loss": ["naive", "open_clip", "inf_cl"], "info_nce": ["naive", "inf_cl"],
             "multiview_info_nce": ["naive"]}[op]
    return fused + peers


def _slab_min_d() -> int:
    from dgkernels.contrastive import triton_slab

    return triton_slab.SLAB_MIN_D


def _strategy(impl: str):
    """The environment of one row: DGKERNELS_CONTRASTIVE_BWD=fused for the fused-backward rows (read
    by the backward, so the context spans forward and backward)."""
    return unittest.mock.patch.dict(os.environ, {"DGKERNELS_CONTRASTIVE_BWD": "fused"} if impl == "triton_fused_bwd"
                                    else {})


IMPL_LABEL = {"triton": "dgkernels triton", "triton_fused_bwd": "dgkernels triton, fused backward (atomics)",
              "cuda": "dgkernels cuda", "auto": "dgkernels (auto backend)",
              "naive": "naive PyTorch", "open_clip": "open_clip ClipLoss", "inf_cl": "inf-cl (fp32 inputs, tf32)"}


def _naive_clip(x, y, s):
    logits = s * x @ y.t()
    labels = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def _naive_info_nce(q, p, t):
    q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)  # as info_nce (and info-nce-pytorch) do
    logits = q @ p.t() / t
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def _naive_supcon(views, t):
    n, v, _ = views.shape
    z = torch.cat(torch.unbind(views, dim=1))
    logits = (z @ z.t() / t).fill_diagonal_(float("-inf"))
    pos = torch.arange(n * v, device=z.device).remainder(n)
    same = (pos[:, None] == pos[None, :]).fill_diagonal_(False)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(log_prob.masked_fill(~same, 0).sum(1) / same.sum(1)).mean()


def contrastive_fn(op: str, impl: str):
    """A loss(features..., s) for unit-norm features: s is the logit scale (clip) or temperature."""
    backend = {"auto": None, "triton_fused_bwd": "triton"}.get(impl, impl)
    if impl == "naive":
        return {"clip_loss": _naive_clip, "info_nce": _naive_info_nce, "multiview_info_nce": _naive_supcon}[op]
    if impl == "open_clip":
        from open_clip.loss import ClipLoss

        loss = ClipLoss()
        return lambda x, y, s: loss(x, y, s)
    if impl == "inf_cl":
        from inf_cl import cal_inf_loss

        # scale: a tensor without grad (inf-cl all-reduces the scale's gradient, which needs a process group)
        if op == "clip_loss":
            def inf_clip(x, y, s):
                sc = torch.tensor(s, device=x.device, dtype=x.dtype)
                return 0.5 * (cal_inf_loss(x, y, scale=sc) + cal_inf_loss(y, x, scale=sc))
            return inf_clip
        return lambda q, p, t: cal_inf_loss(q, p, scale=torch.tensor(1.0 / t, device=q.device, dtype=q.dtype))
    if op == "clip_loss":
        return lambda x, y, s: dgkernels.clip_loss(x, y, s, normalize=False, backend=backend)
    if op == "info_nce":
        return lambda q, p, t: dgkernels.info_nce(q, p, temperature=t, backend=backend)  # normalises (a no-op here)
    return lambda v, t: dgkernels.multiview_info_nce(v, t, normalize=False, backend=backend)


def contrastive_inputs(op: str, n: int, d: int, dtype, device: str, seed: int = 0):
    """Unit-norm leaves (requires_grad) and the scalar: N x N logits for every op."""
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device, dtype).requires_grad_()

    if op == "multiview_info_nce":
        return [unit(n // 2, 2, d)], 0.1
    return [unit(n, d), unit(n, d)], (14.3 if op == "clip_loss" else 0.07)


def _inf_cl_refusal(op: str, d: int) -> str:
    if d % 256:
        return "inf-cl needs D a multiple of 256"
    return ""


def _failure(exc) -> str:
    first = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"FAILED {type(exc).__name__}: {first}"


def _time_and_peak(run, clock, s, device, max_reps, cap_s=None):
    """(median ms, peak MiB above what is allocated, repetitions) of `run` after one warm-up call:
    as many repetitions as fit the section's target time; one timed call if it exceeds cap_s."""
    run()
    t1 = clock.once(run)
    reps = max(1, min(max_reps, int(s["target_s"] * 1e3 / max(t1, 1e-3))))
    ms = clock.median(run, reps) if cap_s is None or t1 < cap_s * 1e3 else t1
    return ms, peak_mib_above(run, device), reps


def _skip_row(rep, cells, why):
    rep.row(cells + [f"skipped: {why}"])


def _timed(rep, cells, blanks, budget, make_run, clock, s, device, **timing):
    """_time_and_peak of make_run(), or None after a 'skipped: why' row (time budget, not
    installed, out of memory, a failure: a failing impl is a row, not the end of the run)."""
    why = "time budget" if budget.left() <= 0 else None
    if why is None:
        try:
            return _time_and_peak(make_run(), clock, s, device, **timing)
        except ImportError as exc:
            why = f"not installed ({exc})"
        except _oom_types():
            why = "out of memory"
        except Exception as exc:  # noqa: BLE001
            why = _failure(exc)
        finally:
            _free()
    _skip_row(rep, cells + [None] * blanks, why)
    return None


def measure(clock: Clock, loss_fn, leaves, scalar, device: str, s: dict) -> dict:
    """Forward ms, forward+backward ms (medians), peak MiB above inputs and gradients."""
    def fwd():
        with torch.no_grad():
            loss_fn(*leaves, scalar)

    def step():
        for t in leaves:
            t.grad = None
        loss_fn(*leaves, scalar).backward()

    step()  # compile / autotune
    grad_bytes = sum(t.numel() * t.element_size() for t in leaves)
    for t in leaves:
        t.grad = None
    box = {}

    def mem_step():  # the memory run is also the first timing (it picks the repetitions)
        box["mem"] = peak_mib_above(step, device, grad_bytes)
    t1 = clock.once(mem_step)
    mem = box["mem"]
    reps = max(1, min(10, int(s["target_s"] * 1e3 / max(t1, 1e-3))))
    fb = clock.median(step, reps) if t1 < s["run_cap_s"] * 1e3 else t1
    fwd()
    fw = clock.median(fwd, reps)
    return {"fwd": fw, "fb": fb, "mem": mem, "reps": reps}


def fp64_errors(op: str, impl: str, leaves, scalar, device: str) -> tuple[float, float]:
    """(loss error, worst gradient error) of impl against the float64 reference, same inputs."""
    fn = contrastive_fn(op, impl)
    ref = contrastive_fn(op, "naive")
    xs = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*xs, scalar)
    grads = torch.autograd.grad(out, xs)
    ex = [t.detach().double().requires_grad_() for t in leaves]
    want = ref(*ex, scalar)
    want_g = torch.autograd.grad(want, ex)
    return rel_error(out, want), max(rel_error(a, e) for a, e in zip(grads, want_g))


def contrastive(rep: Report, device: str, smoke: bool, clock: Clock, budget: Budget, peak: float,
                large: bool = False, too_slow: set | None = None) -> None:
    """too_slow: (op, impl, D, dtype) whose last row predicts the next N past the run cap (shared
    between the medium and the large section)."""
    s = sizes(smoke)
    ns = s["large_ns"] if large else s["ns"]
    rep.table(f"Contrastive losses{' at the largest N' if large else ''}: forward and forward+backward, "
              f"N in {{{', '.join(map(str, ns))}}}",
              ["op", "N", "D", "dtype", "impl", "fwd ms", "fwd+bwd ms", "TFLOP/s (fwd+bwd, 8N²D)", "% bf16 peak",
               "fwd TFLOP/s (2N²D)", "peak MiB above in+grads", f"err vs fp64 loss / grads (N={s['err_n']})", "note"],
              note="Median of CUDA-event timings (repetitions chosen to fill about "
                   f"{s['target_s']:g} s per row; one run where a single run exceeds {s['run_cap_s']:.0f} s). "
                   "multiview_info_nce: V = 2 views of N/2 samples (N x N logits). inf-cl runs fp32 inputs in its "
                   "tf32 mode (it has no half-precision path), at the row's N and D. Each row runs one "
                   "forward+backward first (compiling, and autotuning its power-of-two size bucket), untimed.")
    too_slow = set() if too_slow is None else too_slow
    for n, d, dname, op in contrastive_order(s, ns):
        for impl in _impls(op, device, d):
            cells = [op, n, d, dname, IMPL_LABEL[impl]]
            if budget.left() <= 0:
                _skip_row(rep, cells + [None] * 7, "time budget")
                continue
            if (op, impl, d, dname) in too_slow:
                _skip_row(rep, cells + [None] * 7, f"a smaller N would take > {s['run_cap_s']:.0f} s here")
                continue
            _contrastive_row(rep, cells, op, impl, n, d, dname, device, s, clock, peak, too_slow)


def contrastive_order(s: dict, ns=None) -> list[tuple]:
    """Most wanted first, so that the time budget cuts the least wanted rows: bf16 clip_loss at
    D = 512 (the headline), the other ops at bf16 D = 512, bf16 D = 1024, then fp16; N ascending."""
    order = []
    for dname in s["dtypes"]:
        for d in s["ds"]:
            for ops in (CONTRASTIVE_OPS[:1], CONTRASTIVE_OPS[1:]):
                order += [(n, d, dname, op) for op in ops for n in (s["ns"] if ns is None else ns)]
    return order


def _contrastive_row(rep, cells, op, impl, n, d, dname, device, s, clock, peak, too_slow):
    dtype = torch.float32 if impl == "inf_cl" else getattr(torch, dname)
    if impl == "inf_cl" and _inf_cl_refusal(op, d):
        _skip_row(rep, cells + [None] * 7, _inf_cl_refusal(op, d))
        return
    try:
        loss_fn = contrastive_fn(op, impl)
    except ImportError as exc:
        _skip_row(rep, cells + [None] * 7, f"not installed ({exc})")
        return
    leaves = None
    try:
        leaves, scalar = contrastive_inputs(op, n, d, dtype, device)
        with _strategy(impl):
            m = measure(clock, loss_fn, leaves, scalar, device, s)
            err = "–"
            if n == s["err_n"]:
                e_loss, e_grad = fp64_errors(op, impl, leaves, scalar, device)
                err = f"{e_loss:.1e} / {e_grad:.1e}"
    except _oom_types() as exc:
        _skip_row(rep, cells + [None] * 7, f"out of memory ({str(exc).splitlines()[0][:80]})")
        return
    except Exception as exc:  # noqa: BLE001 - a failing impl is a row, not the end of the run
        _skip_row(rep, cells + [None] * 7, _failure(exc))
        return
    finally:
        del leaves
        _free()
    useful = 8 * n * n * d
    tf = useful / m["fb"] / 1e9
    tf_fwd = 2 * n * n * d / m["fwd"] / 1e9
    if m["fb"] * 16 > s["run_cap_s"] * 1e3:  # the next N (4x N: 16x the work) would pass the cap
        too_slow.add((op, impl, d, dname))
    note = f"{m['reps']} reps" + (" (fp32 inputs)" if impl == "inf_cl" else "")
    rep.row(cells + [_f(m["fwd"]), _f(m["fb"]), _f(tf), _f(100 * tf / peak, "{:.1f}") if peak else "–", _f(tf_fwd),
                     _f(m["mem"], "{:.1f}"), err, note])


def maxn(rep: Report, device: str, smoke: bool, clock: Clock, budget: Budget) -> None:
    s = sizes(smoke)
    d = s["maxn_d"]
    rep.table(f"Largest N that fits: clip_loss forward+backward, D = {d}, bf16 (fp32 for inf-cl)",
              ["impl", "largest N run", "its fwd+bwd ms", "peak MiB above in+grads", "stopped because"],
              note=f"N doubles over {s['maxn'][0]}..{s['maxn'][-1]}, one forward+backward each (wall-clock ms; the "
                   "first N's includes compiling); a row stops at the first failure, when the next run would "
                   f"exceed {s['run_cap_s']:.0f} s (twice N: 4x the work), or at the time budget.")
    for impl in _impls("clip_loss", device):
        best, why = None, f"reached the bound N = {s['maxn'][-1]}"
        try:
            loss_fn = contrastive_fn("clip_loss", impl)
        except ImportError as exc:
            rep.row([IMPL_LABEL[impl], "–", "–", "–", f"not installed ({exc})"])
            continue
        dtype = torch.float32 if impl == "inf_cl" else torch.bfloat16
        if impl == "inf_cl" and _inf_cl_refusal("clip_loss", d):
            rep.row([IMPL_LABEL[impl], "–", "–", "–", _inf_cl_refusal("clip_loss", d)])
            continue
        for n in s["maxn"]:
            if budget.left() <= 0:
                why = "time budget"
                break
            leaves = None
            try:
                leaves, scalar = contrastive_inputs("clip_loss", n, d, dtype, device)

                def step():
                    for t in leaves:
                        t.grad = None
                    loss_fn(*leaves, scalar).backward()
                # one run per N (memory and time together; the first N's includes compiling)
                grad_bytes = sum(t.numel() * t.element_size() for t in leaves)
                t0 = time.perf_counter()
                mem = peak_mib_above(step, device, grad_bytes)
                clock.sync()
                ms = (time.perf_counter() - t0) * 1e3
                best = (n, ms, mem)
            except _oom_types():
                why = f"out of memory at N = {n}"
                break
            except Exception as exc:  # noqa: BLE001
                why = f"at N = {n}: {_failure(exc)}"
                break
            finally:
                del leaves
                _free()
            if ms * 4 > s["run_cap_s"] * 1e3:
                why = f"next N would take > {s['run_cap_s']:.0f} s"
                break
        if best is None:
            rep.row([IMPL_LABEL[impl], "none", "–", "–", why])
        else:
            rep.row([IMPL_LABEL[impl], best[0], _f(best[1]), _f(best[2], "{:.1f}"), why])


# ---- heads and prompt --------------------------------------------------------------------------

HEAD_OPS = ("domain_fanout", "domain_cross_entropy", "domain_cross_entropy_all", "head_agreement", "mapper_project",
            "mapper_project_domain", "cosine_cross_entropy", "cosine_cross_entropy_per_sample")


def heads(rep: Report, device: str, smoke: bool, clock: Clock, budget: Budget) -> None:
    import bench_factories_heads as fh

    hs = sizes(smoke)["heads"]
    s = sizes(smoke)
    rep.table(f"Head ops, forward+backward: B = {hs['B']}, D = {hs['D']} domains, K = {hs['K']}, F = {hs['F']}",
              ["op", "dtype", "impl", "fwd+bwd ms", "speed-up vs torch", "peak MiB above in+grads", "note"],
              note="fused = dgkernels with its automatic backend (triton on CUDA tensors); torch = the plain PyTorch "
                   "composition (dgkernels.heads.reference); liger = Liger-Kernel's fused linear cross-entropy on "
                   "normalised features (cosine_cross_entropy only).")
    for dname in s["dtypes"]:
        dtype = getattr(torch, dname)
        for op in HEAD_OPS:
            torch_ms = None
            impls = ["torch", "fused"] + (["liger"] if op == "cosine_cross_entropy" and device == "cuda" else [])
            for impl in impls:
                cells = [op, dname, impl]
                timed = _timed(rep, cells, 3, budget, lambda: fh.make(op, impl, hs["B"], hs["D"], hs["K"], hs["F"],
                                                                      device=device, dtype=dtype),
                               clock, s, device, max_reps=20)
                if timed is None:
                    continue
                ms, mem, reps = timed
                if impl == "torch":
                    torch_ms = ms
                speed = f"{torch_ms / ms:.2f}x" if torch_ms else "–"
                # the leaves' .grad stay allocated between runs, so the peak is above inputs and grads
                rep.row(cells + [_f(ms), speed, _f(mem, "{:.1f}"), f"{reps} reps"])


@functools.lru_cache(maxsize=4)
def _text_model(device: str, precision: str, tiny: bool):
    """open_clip ViT-B-16 (random weights, a tiny vision tower: only the text tower runs), frozen;
    tiny=True: a 2-layer, 32-wide text tower for the smoke run."""
    import logging

    import open_clip

    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    text = dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2) if tiny else None
    model = open_clip.create_model("ViT-B-16", pretrained=None, precision=precision, device=device,
                                   embed_dim=24 if tiny else 512, **({"text_cfg": text} if tiny else {}),
                                   vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16))
    return model.eval().requires_grad_(False)


def prompt_run(impl: str, model, groups: int, classes: int, n_ctx: int, device: str):
    """fwd+bwd closure: G groups of a shared [SOS + n_ctx] prefix, K class suffixes of 3..8 tokens."""
    from dgkernels.prompt.reference import naive_encode_prompts

    width = model.token_embedding.weight.shape[1]
    dtype = model.token_embedding.weight.dtype
    gen = torch.Generator().manual_seed(0)
    prefix = (torch.randn(groups, 1 + n_ctx, width, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    suffix = (torch.randn(classes, 8, width, generator=gen) * 0.02).to(device, dtype)
    lengths = torch.randint(3, 9, (classes,), generator=gen)
    if impl == "open_clip":  # 77-token rows with EOT where the prompts have it
        n = groups * classes
        tokens = torch.randint(1, 49405, (n, 77), generator=gen)
        eot = (n_ctx + lengths).repeat(groups)
        tokens[torch.arange(n), eot] = 49407
        tokens[torch.arange(77).unsqueeze(0) > eot.unsqueeze(1)] = 0
        tokens = tokens.to(device)
        pos = model.positional_embedding  # a gradient target that makes backward traverse the tower

        def run():
            pos.requires_grad_(True)
            try:
                out = model.encode_text(tokens, normalize=True)
                torch.autograd.grad(out.float().sum(), pos)
            finally:
                pos.requires_grad_(False)
        return run
    if impl == "naive":
        fn = naive_encode_prompts
    else:
        fn = functools.partial(dgkernels.encode_prompts, backend=None if impl == "dgkernels" else impl)

    def run():
        out = fn(model, prefix, suffix, lengths)
        torch.autograd.grad(out.float().sum(), prefix)
    return run


def prompt(rep: Report, device: str, smoke: bool, clock: Clock, budget: Budget) -> None:
    ps = sizes(smoke)["prompt"]
    s = sizes(smoke)
    n_ctx = 4 if smoke else 16
    tower = "2-layer 32-wide text tower" if smoke else "ViT-B-16 text tower"
    rep.table(f"Prompt encoding, forward+backward to the prompt vectors: K = {ps['K']} classes, G = {ps['G']} groups "
              f"({tower}, random weights, {n_ctx} context tokens)",
              ["precision", "impl", "fwd+bwd ms", "speed-up vs naive", "peak MiB", "note"],
              note="naive = CoOp's encoder (every prompt at 77 tokens through open_clip's modules); open_clip = "
                   "model.encode_text on the equivalent 77-token rows; reference = dgkernels' plain backend; "
                   "triton / cuda = dgkernels' fused backends (exact truncation, shared prefix).")
    impls = ["naive", "open_clip", "reference"] + (["triton", "cuda"] if device == "cuda" else ["dgkernels"])
    for precision in (("bf16", "fp16") if device == "cuda" else ("fp32",)):
        naive_ms = None
        for impl in impls:
            cells = [precision, impl]
            timed = _timed(rep, cells, 3, budget,
                           lambda: prompt_run(impl, _text_model(device, precision, smoke), ps["G"], ps["K"], n_ctx, device),
                           clock, s, device, max_reps=10, cap_s=s["run_cap_s"])
            if timed is None:
                continue
            ms, mem, reps = timed
            if impl == "naive":
                naive_ms = ms
            rep.row(cells + [_f(ms), f"{naive_ms / ms:.2f}x" if naive_ms else "–", _f(mem, "{:.1f}"), f"{reps} reps"])


# ---- main ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (proves the code runs)")
    ap.add_argument("--out", help="markdown file (default benchmarks/results/gpu_<device>.md)")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("DGKERNELS_BENCH_BUDGET_S", 300)),
                    help="wall-clock seconds for all sections together")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = ap.parse_args(argv)
    smoke = args.smoke or os.environ.get("DGKERNELS_BENCH_SMOKE", "0") not in ("", "0")
    if not smoke and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device (use --smoke for the CPU dry run)", file=sys.stderr)
        return 2
    device = "cpu" if smoke else "cuda"
    wanted = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    rep = Report(args.out or default_out(device))
    clock = Clock(device)
    budget = Budget(args.budget_s)
    header(rep, device, smoke)
    too_slow: set = set()
    try:
        _sections(rep, device, smoke, clock, budget, wanted, too_slow)
    except KeyboardInterrupt:  # timeout --signal=INT: every finished row is already on disk
        rep.line()
        rep.line(f"Interrupted by the time limit after {time.monotonic() - budget.start:.1f} s; rows above are complete.")
        return 130
    rep.line()
    rep.line(f"Total {time.monotonic() - budget.start:.1f} s of a {args.budget_s:.0f} s budget.")
    return 0


def _sections(rep, device, smoke, clock, budget, wanted, too_slow) -> None:
    peak = None
    for name in SECTIONS:
        if name not in wanted:
            continue
        budget.open(SHARE[name])
        t0 = time.monotonic()
        if name == "ceilings":
            peak = ceilings(rep, device, smoke, clock)["peak_tflops"]
        elif name == "contrastive":
            contrastive(rep, device, smoke, clock, budget, peak, too_slow=too_slow)
        elif name == "contrastive_large":
            contrastive(rep, device, smoke, clock, budget, peak, large=True, too_slow=too_slow)
        elif name == "maxn":
            maxn(rep, device, smoke, clock, budget)
        elif name == "heads":
            heads(rep, device, smoke, clock, budget)
        elif name == "prompt":
            prompt(rep, device, smoke, clock, budget)
        rep.line()
        rep.line(f"_{name}: {time.monotonic() - t0:.1f} s_")


if __name__ == "__main__":
    sys.exit(main())
