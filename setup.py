"""Build the native core keyedexec._core from src/ (metadata lives in pyproject.toml).

KEYEDEXEC_ANNOTATE=1 writes Cython's annotated HTML next to the sources;
KEYEDEXEC_LINETRACE=1 builds with line tracing for coverage.
"""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

linetrace = os.environ.get("KEYEDEXEC_LINETRACE") == "1"
macros = [("CYTHON_TRACE_NOGIL", "1")] if linetrace else []
if sys.platform == "win32":
    compile_args = ["/std:c++17", "/O2"]
else:
    compile_args = ["-std=c++17", "-O3"]

extensions = [
    Extension(
        "keyedexec._core",
        ["src/_core.pyx"],
        include_dirs=["src"],
        language="c++",
        define_macros=macros,
        extra_compile_args=compile_args,
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": 3, "linetrace": linetrace},
        annotate=os.environ.get("KEYEDEXEC_ANNOTATE") == "1",
    ),
)
