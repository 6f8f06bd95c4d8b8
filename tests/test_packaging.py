"""Package metadata: torch is never capped (a pinned container keeps its build) and ``[all]`` has every extra."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli, the same parser
    import tomli as tomllib

PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter (what a first import does, and warns, is the test's subject)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_torch_and_torchvision_have_a_floor_and_no_upper_bound():
    reqs = {r.name: r for r in map(Requirement, PROJECT["dependencies"])}
    for name in ("torch", "torchvision"):
        operators = {spec.operator for spec in reqs[name].specifier}
        assert operators == {">="}, f"{name}: {reqs[name]} (an upper bound makes pip replace a container's torch)"


def test_all_extra_holds_every_optional_extra():
    extras = PROJECT["optional-dependencies"]
    (combined,) = extras["all"]
    names = set(re.fullmatch(r"freezetune\[(.+)\]", combined).group(1).split(","))
    assert names == set(extras) - {"all", "dev"}
    assert {"hf", "weights", "onnx", "lightning", "monitor"} <= names


def test_a_missing_extra_is_an_import_error_naming_the_extra_as_well_as_a_freezetune_error():
    # `try: from freezetune.integrations.lightning import ... / except ImportError:` crashed on a ConfigError
    hide = "import sys; sys.modules.update(dict.fromkeys(['lightning', 'lightning.pytorch'], None))\n"
    check = hide + (
        "from freezetune.errors import FreezetuneError\n"
        "try:\n    import freezetune.integrations.lightning\n"
        "except ImportError as exc:\n    print(isinstance(exc, FreezetuneError), exc)\n"
    )
    out = _python(check)
    assert out.stdout == "True freezetune.integrations.lightning needs lightning: pip install 'freezetune[lightning]'\n", \
        out.stderr  # fmt: skip


def test_a_plain_import_reaches_the_submodules_as_the_readme_writes_them():
    # docs/export.md's recipe, freezetune.data.load_image(...) after `import freezetune`: AttributeError
    check = ("import freezetune\nprint(freezetune.data.load_image.__name__, freezetune.freeze.__name__)\n"
             "try:\n    freezetune.nosuch\nexcept AttributeError as exc:\n    print(exc)\n")  # fmt: skip
    out = _python(check)
    assert out.stdout == "load_image freeze\nmodule 'freezetune' has no attribute 'nosuch'\n", out.stderr


def test_the_flat_layouts_module_paths_still_import_the_same_modules_with_a_warning():
    # before the subpackages (model/, freezing/, training/, ...): a model saved whole names them, and so may a
    # user's code; each old path is the module now at its new one, and the package's functions stay functions
    check = ("import warnings\nwarnings.simplefilter('always')\nimport freezetune as ft\n"
             "from freezetune.stages import stages\nimport freezetune.depthwise, freezetune.run_setup, freezetune.freeze\n"
             "from freezetune.device.depthwise import FastDepthwiseConv2d\n"
             "print(stages is ft.stages, freezetune.depthwise.FastDepthwiseConv2d is FastDepthwiseConv2d,\n"
             "      freezetune.run_setup.__spec__.name, callable(ft.freeze))\n")  # fmt: skip
    out = _python(check)
    assert out.stdout == "True True freezetune.run.setup True\n", out.stderr
    for old, new in [("stages", "model.stages"), ("depthwise", "device.depthwise"), ("run_setup", "run.setup")]:
        assert f"DeprecationWarning: freezetune.{old} is now freezetune.{new}" in out.stderr
    missing = _python("import freezetune.nosuch")
    assert "No module named 'freezetune.nosuch'" in missing.stderr


def test_the_flat_layouts_import_forms_and_names_still_work_with_a_warning_at_the_users_line():
    # `from freezetune import run_setup` warned inside importlib (hidden); `from freezetune.config import TrainConfig`
    # and an earlier install's console script (`from freezetune.cli import run`) failed: those modules are packages now
    check = ("import warnings\nwarnings.simplefilter('default')\n"
             "from freezetune import run_setup\nfrom freezetune.config import TrainConfig, check\n"
             "from freezetune.cli import run\nfrom freezetune.config.train_config import TrainConfig as New\n"
             "print(run_setup.__name__, TrainConfig is New, check.__name__, run.__module__)\n"
             "from freezetune.config import nosuch\n")  # fmt: skip
    out = _python(check)
    assert out.stdout == "freezetune.run.setup True freezetune.config.check freezetune.cli.main\n", out.stderr
    assert "<string>:3: DeprecationWarning: freezetune.run_setup is now freezetune.run.setup" in out.stderr
    assert ("<string>:4: DeprecationWarning: freezetune.config.TrainConfig is now "
            "freezetune.config.train_config.TrainConfig") in out.stderr  # fmt: skip
    assert "freezetune.config.check is now" not in out.stderr  # a submodule of the package is no old name
    assert "ImportError: cannot import name 'nosuch' from 'freezetune.config'" in out.stderr


def test_no_module_of_freezetune_imports_a_flat_layout_path():
    # the old paths are kept for users' code and models saved whole; freezetune's own imports name the new ones (an
    # old one would warn users of freezetune's code, not theirs)
    check = ("import importlib, pkgutil, warnings\nimport freezetune\n"
             "with warnings.catch_warnings(record=True) as seen:\n    warnings.simplefilter('always')\n"
             "    for found in pkgutil.walk_packages(freezetune.__path__, 'freezetune.'):\n"
             "        if found.name == 'freezetune.__main__':  # the command itself\n            continue\n"
             "        try:\n            importlib.import_module(found.name)\n"
             "        except ImportError:  # an optional dependency (lightning, onnx) not installed\n"
             "            pass\n"
             "print(len(sys.modules), [str(w.message) for w in seen if ' is now freezetune.' in str(w.message)])\n")  # fmt: skip
    out = _python("import sys\n" + check)
    imported, old = out.stdout.split(" ", 1)
    assert old == "[]\n" and int(imported) > 100, out.stdout + out.stderr


def test_the_package_names_each_public_name_alike_for_users_editors_and_star_imports():
    # freezetune/__init__ lists its public names three times: the lazy map (what ``ft.NAME`` imports), the
    # TYPE_CHECKING imports (what an editor resolves), and __all__ (what static tools and ``import *`` read)
    import ast

    import freezetune

    tree = ast.parse(Path(freezetune.__file__).read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    for_editors = {alias.name: node.module for node in guarded.body for alias in node.names}
    assert for_editors == freezetune._LAZY
    assert set(freezetune.__all__) == {*freezetune._LAZY, "__version__"}
    assert all(getattr(freezetune, name) is not None for name in freezetune.__all__)
