"""Loads a script of experiments/ as a module, so its tests can call main(argv) and its pieces."""

import importlib.util
import pathlib
import sys

import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / "experiments"


def load_experiment(name: str):
  """experiments/<name>.py as a fresh module (registered in sys.modules: dataclasses look it up)."""
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def experiment():
  """The loader above: `experiment("attention_zoo").main([...])`."""
  return load_experiment
