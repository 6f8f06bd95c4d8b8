"""The container files: compose services, the base image's torch against our requirement, the entrypoint's token.

No Docker engine runs here; these check what can be checked without one (hadolint lints the Dockerfile in
scripts/test.sh).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli, the same parser
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def test_compose_has_jupyter_and_train_services_with_a_gpu_and_the_data_and_runs_volumes():
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    assert set(services) == {"jupyter", "train"}
    for name, service in services.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        mounts = {v.split(":")[1] for v in service["volumes"]}
        assert {"/data", "/runs"} <= mounts, name
    assert services["jupyter"]["command"] == ["jupyter"] and "JUPYTER_TOKEN" in services["jupyter"]["environment"]
    assert services["jupyter"]["ports"] == ["127.0.0.1:8888:8888"]  # not published on every interface
    assert services["train"]["command"][0] == "train"


def test_the_base_image_torch_satisfies_the_package_requirement():
    base = re.search(r"^FROM pytorch/pytorch:(\d+\.\d+\.\d+)-cuda", (DOCKER / "Dockerfile").read_text(), re.M)
    assert base, "the Dockerfile's FROM line is no longer a pytorch/pytorch:X.Y.Z-cudaA.B tag"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_req,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert Version(base.group(1)) in torch_req.specifier, f"image torch {base.group(1)} vs {torch_req}"


def test_the_image_pins_every_dependency_and_extra_exactly_within_the_package_ranges():
    pins = [Requirement(line) for line in (DOCKER / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]  # fmt: skip
    loose = [str(r) for r in pins if len(r.specifier) != 1 or next(iter(r.specifier)).operator != "=="]
    assert not loose, f"not pinned exactly: {loose}"
    pinned = {r.name.lower(): Version(next(iter(r.specifier)).version) for r in pins}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = ("hf", "weights", "heic", "onnx", "lightning", "monitor", "notebook")  # the image's: all but dev
    wanted = [Requirement(d) for d in project["dependencies"]]
    wanted += [Requirement(d) for extra in extras for d in project["optional-dependencies"][extra]]
    base = {"torch", "torchvision", "numpy", "pillow"}  # the base image's (its tag pins them)
    for req in wanted:
        name = req.name.lower()
        if name not in base:
            assert name in pinned, f"{name} ({req}) is not in docker/requirements.txt"
            assert pinned[name] in req.specifier, f"docker/requirements.txt {name}=={pinned[name]} vs {req}"
    # and every package those bring, at the versions of the run the suite passed with: the same image next year
    locked = [Requirement(line) for line in (DOCKER / "constraints.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]  # fmt: skip
    held = {r.name.lower().replace("_", "-"): str(r.specifier) for r in locked}
    assert all(s.startswith("==") and "," not in s for s in held.values()), "constraints.txt holds exact versions"
    for name, version in pinned.items():
        assert held.get(name.replace("_", "-")) == f"=={version}", f"{name}: requirements and constraints differ"
    assert not {"torch", "torchvision", "triton"} & set(held) and not any(n.endswith("-cu12") for n in held)
    assert "pip install -r docker/requirements.txt -c docker/constraints.txt" in (DOCKER / "Dockerfile").read_text()


def test_the_image_installs_tmux_and_runs_as_a_non_root_user():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"apt-get install[^\n]*\btmux\b", text)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")


@pytest.fixture
def fake_jupyter(tmp_path):
    """A ``jupyter`` on PATH that prints its arguments, so the entrypoint runs without JupyterLab."""
    (tmp_path / "jupyter").write_text('#!/bin/sh\necho "jupyter-args: $*"\n')
    (tmp_path / "jupyter").chmod(0o755)
    return tmp_path


def _entrypoint(bin_dir: Path, token: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "JUPYTER_TOKEN"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    if token is not None:
        env["JUPYTER_TOKEN"] = token
    proc = subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), "jupyter"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("token", [None, ""])
def test_jupyter_without_a_token_gets_a_generated_one_and_prints_it(fake_jupyter, token):
    out = _entrypoint(fake_jupyter, token)
    printed = re.search(r"token \(set JUPYTER_TOKEN to choose your own\): ([0-9a-f]+)\n", out)
    assert printed and len(printed.group(1)) == 48
    assert f"--IdentityProvider.token={printed.group(1)}" in out.split("jupyter-args: ")[1]
    assert _entrypoint(fake_jupyter, token) != out  # random, not a constant baked into the image


def test_jupyter_uses_the_given_token_and_prints_nothing_about_it(fake_jupyter):
    out = _entrypoint(fake_jupyter, "s3cret")
    assert out.startswith("jupyter-args: ") and "--IdentityProvider.token=s3cret" in out and "--ip=0.0.0.0" in out


def _run_entrypoint(bin_dir: Path, *argv: str, env: dict | None = None, user: list[str] | None = None) -> str:
    full = {k: v for k, v in os.environ.items() if k != "JUPYTER_TOKEN"} | {"JUPYTER_TOKEN": "t"} | (env or {})
    full["PATH"] = f"{bin_dir}{os.pathsep}{full['PATH']}"
    proc = subprocess.run([*(user or []), "bash", str(DOCKER / "entrypoint.sh"), *argv], env=full,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def stand_ins(tmp_path):
    """``jupyter``, ``freezetune`` and ``torchrun`` on PATH that print their name, arguments and HOME."""
    for name in ("jupyter", "freezetune", "torchrun"):
        (tmp_path / name).write_text(f'#!/bin/sh\necho "{name}: $* HOME=$HOME"\n')
        (tmp_path / name).chmod(0o755)
    tmp_path.chmod(0o755)
    return tmp_path


def test_the_entrypoint_runs_freezetunes_commands_and_the_images_other_programs(stand_ins):
    # torchrun (the README's multi-GPU command), tensorboard and pip went to freezetune: "invalid choice"
    assert _run_entrypoint(stand_ins, "torchrun", "--nproc_per_node", "2", "-m", "freezetune", "train").startswith(
        "torchrun: --nproc_per_node 2 -m freezetune train"
    )
    for argv in (["train", "--data", "/data"], ["export", "--to", "m.onnx"], ["--version"], []):
        assert _run_entrypoint(stand_ins, *argv).startswith(f"freezetune: {' '.join(argv)}".rstrip()), argv
    assert _run_entrypoint(stand_ins, "nosuchprogram").startswith("freezetune: nosuchprogram")  # says its commands


def test_jupyter_takes_the_users_port_and_ip_and_jupyter_lab_as_well(stand_ins):
    # --port=9999 after the entrypoint's own --port=8888 stopped JupyterLab ("port only accepts one value")
    out = _run_entrypoint(stand_ins, "jupyter", "lab", "--port=9999", env={"JUPYTER_TOKEN": ""})
    assert "open http://127.0.0.1:9999/lab?token=" in out
    args = out.split("jupyter: ")[1]
    assert args.startswith("lab ") and args.count("--port") == 1 and "--port=9999" in args and " lab " not in args
    args = _run_entrypoint(stand_ins, "jupyter", "--ip=127.0.0.1", env={"JUPYTER_PORT": "8000"})
    assert args.count("--ip") == 1 and "--ip=127.0.0.1" in args and "--port=8000" in args


@pytest.mark.parametrize("given", [["--port", "9999"], ["--ServerApp.port", "9999"], ["--ServerApp.port=9999"]])
def test_the_printed_jupyter_url_names_the_users_port_in_either_form(stand_ins, given):
    # `jupyter --port 9999` printed http://127.0.0.1:8888/... while JupyterLab started on 9999
    out = _run_entrypoint(stand_ins, "jupyter", *given, env={"JUPYTER_TOKEN": ""})
    assert "open http://127.0.0.1:9999/lab?token=" in out
    args = out.split("jupyter: ")[1]
    assert args.count("port") == 1 and " ".join(given) in args  # the user's, as given, and no default beside it


def test_a_jupyter_option_named_like_port_keeps_the_default_port(stand_ins):
    # --ServerApp.port_retries=0 read as the user's own port: the default --port=$JUPYTER_PORT was left out
    out = _run_entrypoint(
        stand_ins, "jupyter", "--ServerApp.port_retries=0", env={"JUPYTER_TOKEN": "", "JUPYTER_PORT": "8000"}
    )
    assert "open http://127.0.0.1:8000/lab?token=" in out and "--port=8000" in out.split("jupyter: ")[1]


def test_a_user_the_image_does_not_know_gets_a_writable_home(stand_ins):
    # docker run --user "$(id -u):$(id -g)" sets HOME=/; JupyterLab stopped at start: Permission denied: '/.local'
    user, scratch = [], stand_ins.parent
    if os.geteuid() == 0:  # root writes anywhere: run as nobody, as the container would run an unknown uid
        user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        if subprocess.run([*user, "true"], capture_output=True).returncode != 0:
            pytest.skip("setpriv cannot change the user here")
        scratch = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's temporary folders are root's alone
        scratch.chmod(0o777)
        stand_ins = Path(shutil.copytree(stand_ins, scratch / "bin"))
    try:
        out = _run_entrypoint(stand_ins, "jupyter", env={"HOME": "/", "TMPDIR": str(scratch)}, user=user)
        assert out.rstrip().endswith(f"HOME={scratch}/home") and (scratch / "home").is_dir()
    finally:
        if user:
            shutil.rmtree(scratch)


def test_compose_runs_as_a_chosen_user_and_the_build_context_leaves_the_checkout_out():
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    assert all(s["user"] == "${FT_UID:-1000}:${FT_GID:-1000}" for s in services.values())
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") + 1 :][:4] == ["!docker/", "!pyproject.toml", "!README.md", "!src/"]
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (DOCKER / "Dockerfile").read_text(), re.M)
    sources = {Path(p).parts[0] for line in copied for p in line.split()}
    assert sources <= {"docker", "pyproject.toml", "README.md", "src"}, sources  # each one the context keeps
