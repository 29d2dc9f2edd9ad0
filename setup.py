"""Builds the optional compiled kernels (src/gemma4/kernels/*.c). Everything else is in pyproject.toml."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """The kernels only make things faster: without a working compiler, install anyway and fall back to PyTorch."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001 - any compiler failure means "no kernels", not "no package"
            print(f"warning: gemma4's compiled kernels were not built ({error}); using the PyTorch fallback")


kernels = Extension(
    "gemma4.kernels._kernels",
    sources=[f"src/gemma4/kernels/{name}.c" for name in ("matmul", "int4", "int4_prompt", "int4_prompt_vnni", "decode", "layer", "bandwidth", "gguf", "quantize")],
    depends=["src/gemma4/kernels/simd.h", "src/gemma4/kernels/kernels.h"],
    extra_compile_args=["-O3", "-march=native", "-fopenmp"],
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[kernels], cmdclass={"build_ext": OptionalBuildExt})
