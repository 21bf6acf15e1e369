"""Optional dependencies: `pip install -e .` runs inference; a command whose extra is missing ends in one
message naming the extra (exit code 2), not a traceback. Missing modules are simulated (None in sys.modules)."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dynamic_llava.cli import main
from dynamic_llava.errors import EXTRAS, MissingExtra, run_command
from dynamic_llava.train import train as _train  # noqa: F401

# The training modules are imported above, while accelerate and peft are installed: transformers decides their
# availability when it is imported, so removing them afterwards simulates only what our own checks see.

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "dynamic_llava" / "assets" / "sample.png"


def _one_error_line(err: str, extra: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert f'pip install "dynamic_llava[{extra}]"' in lines[0]


def test_extras_in_pyproject_match_the_modules_they_provide() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, extra in EXTRAS.items():
        # starlette arrives with fastapi; distributions spell "_" as "-" (lmms_eval: lmms-eval)
        provided = " ".join(extras[extra])
        assert module.replace("_", "-") in provided or (module == "starlette" and "fastapi" in provided), \
            (module, extra)
    # all: every feature extra; not test (pytest, playwright) nor lmms (the lmms-eval harness, with its own pins)
    features = [name for name in extras if name not in ("all", "test", "lmms")]
    assert extras["all"] == [f"dynamic_llava[{','.join(features)}]"], "the all extra must name every feature extra"


def test_train_without_accelerate_names_the_train_extra(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", None)
    code = main(["train", "sparse", "--model_name_or_path", str(tmp_path), "--data_path", "x.json",
                 "--output_dir", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    _one_error_line(err, "train")
    assert "accelerate" in err


def test_lora_without_peft_names_the_train_extra(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)
    code = main(["train", "llava", "--model_name_or_path", str(tmp_path), "--data_path", "x.json",
                 "--output_dir", str(tmp_path / "out"), "--lora_enable", "True"])
    assert code == 2
    err = capsys.readouterr().err
    _one_error_line(err, "train")
    assert "this command needs peft" in err


@pytest.mark.parametrize("module, missing", [
    ("controller", "fastapi"), ("model_worker", "fastapi"), ("openai_api", "uvicorn"), ("load_test", "httpx"),
    ("gradio_web_server", "httpx"),
])
def test_servers_without_the_serve_extra(monkeypatch, module: str, missing: str) -> None:
    name = f"dynamic_llava.serve.{module}"
    # python -m dynamic_llava.serve.<module>, in a fresh process
    script = (f"import runpy, sys; sys.modules[{missing!r}] = None; "
              f"runpy.run_module({name!r}, run_name='__main__', alter_sys=True)")
    result = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 2
    _one_error_line(result.stderr, "serve")
    monkeypatch.setitem(sys.modules, missing, None)
    monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(MissingExtra, match=f"needs {missing}"):  # imported as a library: an exception
        importlib.import_module(name)


def test_a_command_importing_a_missing_optional_module_names_its_extra(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)

    def needs_openai(args: argparse.Namespace) -> int:
        import openai  # noqa: F401

        return 0

    assert run_command(needs_openai, argparse.Namespace()) == 2
    _one_error_line(capsys.readouterr().err, "eval")


def test_a_missing_module_that_is_no_extra_stays_a_bug(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tomllib", None)

    def broken(args: argparse.Namespace) -> int:
        import tomllib  # noqa: F401

        return 0

    with pytest.raises(ModuleNotFoundError):
        run_command(broken, argparse.Namespace())


def test_bench_plot_without_matplotlib(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "decode", "--shape", "tiny", "--plot", str(tmp_path / "p.png")]) == 2
    _one_error_line(capsys.readouterr().err, "bench")


def test_inference_runs_without_any_extra(tiny_llava_dir: Path) -> None:
    """`dynamic-llava ask` in a process where every optional dependency is missing."""
    script = ("import sys; from dynamic_llava.errors import EXTRAS; sys.modules.update(dict.fromkeys(EXTRAS)); "
              "from dynamic_llava.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run(
        [sys.executable, "-c", script, "ask", "--model-path", str(tiny_llava_dir), "--image-file", str(IMAGE),
         "--query", "What is shown?", "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert '"answer"' in result.stdout
