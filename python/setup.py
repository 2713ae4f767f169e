"""Generates the gRPC stubs from the project's own proto at build time."""
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


class BuildWithStubs(build_py):
    def run(self):
        from dspex_bridge._generate import generate

        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
