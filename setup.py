"""Build of the compiled backend `dgkernels._C` from csrc/.

Environment variables (printed at build time):
  DGKERNELS_BUILD_CUDA      auto (default) | 1 | 0: compile the .cu kernels too. auto = when torch
                            is a CUDA build and a CUDA toolkit (nvcc under CUDA_HOME) is found.
  TORCH_CUDA_ARCH_LIST      honoured as torch does; default here "8.0;9.0" when no GPU is visible
                            (torch would otherwise build for every architecture it knows).
  MAX_JOBS                  parallel compile jobs for ninja (torch's own variable).
  DGKERNELS_SKIP_EXTENSION  1: install the pure-Python packages only (reference/Triton backends).
  DGKERNELS_ALLOW_BUILD_FAILURE  1: a failed compile warns instead of failing the install; the
                            package then reports the missing backend at import.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default="auto"):
    return os.environ.get(name, default).strip().lower()


def _extension_modules():
    if _flag("DGKERNELS_SKIP_EXTENSION", "0") in ("1", "true", "yes"):
        print("[dgkernels] DGKERNELS_SKIP_EXTENSION=1: not compiling dgkernels._C")
        return [], {}
    # torch guesses CUDA_HOME from `which nvcc` when unset; with nvcc linked into /usr/local/bin that
    # guess (/usr/local) has no lib64/libcudart. Prefer the conventional toolkit folder.
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    want = _flag("DGKERNELS_BUILD_CUDA")
    has_toolkit = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    torch_has_cuda = torch.version.cuda is not None
    if want in ("1", "true", "yes", "on"):
        if not (has_toolkit and torch_has_cuda):
            sys.exit("[dgkernels] DGKERNELS_BUILD_CUDA=1 but "
                     + ("torch is a CPU-only build" if not torch_has_cuda else "no CUDA toolkit (CUDA_HOME/bin/nvcc) was found"))
        with_cuda = True
    elif want in ("0", "false", "no", "off"):
        with_cuda = False
    else:
        with_cuda = has_toolkit and torch_has_cuda
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    define = [("DGKERNELS_WITH_CUDA", "1")] if with_cuda else []
    cxx = ["-O3", "-fopenmp"]
    extra = {"cxx": cxx}
    if with_cuda:
        extra["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        ext_cls, sources = cpp_extension.CUDAExtension, cpp_sources + cuda_sources
    else:
        ext_cls, sources = cpp_extension.CppExtension, cpp_sources
    print("[dgkernels] build configuration:")
    print(f"[dgkernels]   torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    print(f"[dgkernels]   CUDA kernels: {with_cuda} (DGKERNELS_BUILD_CUDA={want}, CUDA_HOME={cpp_extension.CUDA_HOME})")
    if with_cuda:
        print(f"[dgkernels]   TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}")
    print(f"[dgkernels]   MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}")
    print(f"[dgkernels]   sources: {', '.join(sources)}")
    ext = ext_cls(
        name="dgkernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - reported, then re-raised unless allowed
                if _flag("DGKERNELS_ALLOW_BUILD_FAILURE", "0") in ("1", "true", "yes"):
                    print(f"[dgkernels] WARNING: compiling dgkernels._C failed ({exc}); "
                          "installing without it: the cpp/cuda backends will report as unavailable")
                else:
                    raise

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
