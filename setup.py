"""Optional C accelerator for SA1 per-message verification (structauth._accel).

Everything else about the package is in pyproject.toml. The extension is the broker's
fast lane (broker_plugin/shim/fastlane.c) built as a plain Python module; it is
optional: where no C compiler or Python headers are available the install goes on
without it and Session.verify stays pure Python (structauth/accel.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "structauth._accel",
            sources=["broker_plugin/shim/fastlane.c", "broker_plugin/shim/blake2s.c"],
            include_dirs=["broker_plugin/shim"],
            define_macros=[("FL_MODULE", "_accel")],
            extra_compile_args=["-std=gnu11", "-O2"],
            optional=True,
        )
    ],
)
