"""Installs lm_eval_steer.pth next to the packages (pyproject.toml holds everything else).

lm-eval 0.4.x's CLI loads no plugin entry points, so a start-up hook is the only way plain
``lm_eval --model steered-hf`` can find the model. The hook itself costs microseconds: it only
arms an import watcher (see lm_eval_steer/_autoload.py).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "lm_eval_steer.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(Path(__file__).parent / "lm_eval_steer" / PTH_NAME), str(Path(self.build_lib) / PTH_NAME))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH_NAME)]


setup(cmdclass={"build_py": BuildPyWithPth})
