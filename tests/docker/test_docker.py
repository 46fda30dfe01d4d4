"""The container and cluster recipes (docker/): linted, honest about the repo, and rendering the
launcher commands that the 2-node test (tests/pipeline/trainer/test_multinode.py) runs for real.

No Docker engine or cluster here: the Dockerfile is linted (hadolint) and parsed; the SLURM script
and the Kubernetes Job's script are executed with ``srun``/``scontrol``/``composer`` stubbed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
CREDENTIAL = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.I)


def tool(name: str) -> str:
    """A linter installed by the dev extra (next to this Python), else on PATH."""
    here = Path(sys.executable).with_name(name)
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} missing: pip install -e '.[dev]' installs it"
    return found


# ------------------------------------------------------------------------------------- Dockerfile
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            op, _, args = buf.partition(" ")
            out.append((op.upper(), args.strip()))
            buf = ""
    return out


def test_hadolint_finds_nothing():
    p = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "info", str(DOCKER / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerfile_copies_only_what_exists_and_installs_the_gpu_extra():
    ins = instructions(DOCKER / "Dockerfile")
    ignored = [
        line
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    for op, args in ins:
        if op in ("COPY", "ADD"):
            *sources, _dest = [a for a in args.split() if not a.startswith("--")]
            for src in sources:
                assert (REPO / src).exists(), f"{op} {src}: not in the repository"
                assert src.split("/")[0] not in ignored, f"{op} {src}: excluded by .dockerignore"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = " ".join(args for op, args in ins if op == "RUN" and "pip install" in args)
    assert (
        '".[gpu]"' in installs and "gpu" in extras and any(d.startswith("flash-attn") for d in extras["gpu"])
    )
    assert "--no-build-isolation" in installs  # flash-attn builds against the installed torch


def cuda_build(cuda_version: str | None, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """(the base image, cuda_env.sh's settings) of ``docker build --build-arg CUDA_VERSION=...``
    (None: the default): FROM rendered with the ARG, the RUN's ``case`` executed by sh."""
    ins = instructions(DOCKER / "Dockerfile")
    default = next(a.split("=", 1)[1] for op, a in ins if op == "ARG" and a.startswith("CUDA_VERSION="))
    version = cuda_version or default
    base = next(args for op, args in ins if op == "FROM").replace("${CUDA_VERSION}", version)
    run = next(args for op, args in ins if op == "RUN" and 'case "$CUDA_VERSION"' in args)
    script = run.split(" && ")[0].replace("/opt/bd3/cuda_env.sh", str(tmp_path / "cuda_env.sh"))
    p = subprocess.run(["sh", "-c", script], env={"CUDA_VERSION": version}, capture_output=True, text=True)
    if p.returncode:
        raise ValueError(p.stderr)
    text = (tmp_path / "cuda_env.sh").read_text()
    return base, {k: v.strip('"') for k, v in (line.split("=", 1) for line in text.splitlines())}


def test_base_image_cuda_matches_the_torch_wheels(tmp_path):
    """The default build: CUDA 12.6, torch 2.7.0's PyPI wheel (the one installed here), A100/H100/H200."""
    import torch

    base, env = cuda_build(None, tmp_path)
    m = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\S*devel", base)
    assert m, f"{base}: want a pinned nvidia/cuda devel tag"
    pinned = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.7.0" in pinned
    # torch 2.7.0's default PyPI wheels are the CUDA 12.6 build (the one installed here).
    assert torch.__version__.startswith("2.7.0") and torch.version.cuda == f"{m[1]}.{m[2]}"
    assert env["TORCH_INDEX"] == "" and env["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"


def test_cuda_12_8_build_serves_blackwell(tmp_path):
    """--build-arg CUDA_VERSION=12.8.1: torch 2.7.0's cu128 wheel from the PyTorch index, sm_100 in the
    architectures torch extensions and flash-attn are compiled for, a flash-attn that builds sm_100."""
    base, env = cuda_build("12.8.1", tmp_path)
    assert base == "nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04"
    assert env["TORCH_INDEX"] == "https://download.pytorch.org/whl/cu128"
    assert "10.0" in env["TORCH_CUDA_ARCH_LIST"].split(";") and "100" in env["FLASH_ATTN_CUDA_ARCHS"].split(
        ";"
    )
    assert env["FLASH_ATTN_MIN"] == "2.7.4.post1"
    installs = " ".join(a for op, a in instructions(DOCKER / "Dockerfile") if op == "RUN")
    assert 'pip install torch==2.7.0 --index-url "$TORCH_INDEX"' in installs
    assert '"flash-attn>=$FLASH_ATTN_MIN"' in installs and "export TORCH_CUDA_ARCH_LIST" in installs


def test_unsupported_cuda_version_stops_the_build(tmp_path):
    with pytest.raises(ValueError, match="use 12.6.x"):
        cuda_build("12.4.1", tmp_path)


def test_image_runs_as_non_root_with_caches_as_volumes_and_no_credentials():
    ins = instructions(DOCKER / "Dockerfile")
    ops = [op for op, _ in ins]
    user = [args for op, args in ins if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert ops.index("USER") < ops.index("CMD")
    volumes = json.loads(next(args for op, args in ins if op == "VOLUME"))
    env = " ".join(args for op, args in ins if op == "ENV")
    hf_home = re.search(r"HF_HOME=(\S+)", env)[1]
    assert any(hf_home.startswith(v) for v in volumes)
    for op, args in ins:
        if op in ("ENV", "ARG"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", " " + args) or [args.split("=")[0]]
            assert not [n for n in names if CREDENTIAL.search(n)], f"{op} {args}"


# --------------------------------------------------------------------------------- launch stubs
def stubs(tmp_path: Path, hosts: list[str]) -> Path:
    """bin/ with scontrol (the allocation's hosts), srun (runs its command once per node, in order,
    with SLURM_NODEID set; once with --nodes=1), composer (appends its argv to calls.jsonl) and python
    (appends its argv to plan_calls.jsonl and exits with $PLAN_RC, default 0)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.jsonl"
    (bin_dir / "scontrol").write_text("#!/bin/sh\n" + "".join(f"echo {h}\n" for h in hosts))
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        f"n={len(hosts) - 1}\n"
        'while [[ "$1" == --* ]]; do echo "$1" >> "$STUB_DIR/srun_args"; [[ "$1" == --nodes=1 ]] && n=0; shift; done\n'
        'for i in $(seq 0 "$n"); do SLURM_NODEID=$i "$@" || exit $?; done\n'
    )
    (bin_dir / "python").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(tmp_path / 'plan_calls.jsonl')!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd()}) + '\\n')\n"
        "sys.exit(int(os.environ.get('PLAN_RC', '0')))\n"
    )
    (bin_dir / "composer").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(calls)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd()}) + '\\n')\n"
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def composer_calls(tmp_path: Path, name: str = "calls.jsonl") -> list[list[str]]:
    path = tmp_path / name
    return [json.loads(line)["argv"] for line in path.read_text().splitlines()] if path.exists() else []


def assert_plan_command(argv: list[str], world: int, save_folder: str) -> None:
    """``python -m pipeline.plan YAML --gpus WORLD --gpu-memory GB ...`` with the launch's overrides."""
    assert argv[:3] == ["-m", "pipeline.plan", "yamls/bd3_1b.yaml"]
    assert flag(argv, "--gpus") == str(world) and float(flag(argv, "--gpu-memory")) == 80
    assert f"variables.save_folder={save_folder}" in argv and "autoresume=true" in argv


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def assert_node_commands(calls: list[list[str]], nodes: int, master: str, save_folder: str) -> None:
    assert len(calls) == nodes
    ports = set()
    for rank, argv in enumerate(calls):
        assert flag(argv, "--world_size") == str(nodes * 8)
        assert flag(argv, "--nproc") == "8"
        assert flag(argv, "--node_rank") == str(rank)
        assert flag(argv, "--master_addr") == master
        ports.add(flag(argv, "--master_port"))
        entry = argv.index("launch")  # the repository's launch file: `composer ... launch YAML`
        assert argv[entry + 1] == "yamls/bd3_1b.yaml" and (REPO / argv[entry + 1]).exists()
        assert os.access(REPO / "launch", os.X_OK)
        assert "autoresume=true" in argv and f"variables.save_folder={save_folder}" in argv
    assert len(ports) == 1


# ------------------------------------------------------------------------------------------ SLURM
def test_sbatch_script_passes_shellcheck():
    p = subprocess.run(
        [tool("shellcheck"), str(DOCKER / "slurm" / "bd3_1b.sbatch")], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("hosts", [["gpu-a17", "gpu-a18"], ["n001", "n002", "n003"]])
def test_sbatch_runs_one_launcher_per_node(tmp_path, hosts):
    bin_dir = stubs(tmp_path, hosts)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB_DIR": str(tmp_path),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": f"{hosts[0][:-1]}[...]",
        "SLURM_NNODES": str(len(hosts)),
        "SLURM_SUBMIT_DIR": str(REPO),
        "SAVE_FOLDER": "/lustre/runs/bd3-1b",
    }
    p = subprocess.run(
        ["bash", str(DOCKER / "slurm" / "bd3_1b.sbatch"), "optimizer.lr=1.0e-4"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    calls = composer_calls(tmp_path)
    assert_node_commands(calls, len(hosts), hosts[0], "/lustre/runs/bd3-1b")
    assert all(argv[-1] == "optimizer.lr=1.0e-4" for argv in calls)  # extra arguments reach the YAML
    assert "--ntasks-per-node=1" in (tmp_path / "srun_args").read_text()
    (plan,) = composer_calls(tmp_path, "plan_calls.jsonl")  # once, before the launchers
    assert_plan_command(plan, 8 * len(hosts), "/lustre/runs/bd3-1b")
    assert plan[-1] == "optimizer.lr=1.0e-4"


def sbatch_env(tmp_path, bin_dir, hosts, **extra):
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB_DIR": str(tmp_path),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-a[17-18]",
        "SLURM_NNODES": str(len(hosts)),
        "SLURM_SUBMIT_DIR": str(REPO),
        "SAVE_FOLDER": "/lustre/runs/bd3-1b",
        **extra,
    }


@pytest.mark.parametrize("plan_rc", [2, 3])
def test_sbatch_launches_nothing_when_the_plan_fails(tmp_path, plan_rc):
    hosts = ["gpu-a17", "gpu-a18"]
    bin_dir = stubs(tmp_path, hosts)
    env = sbatch_env(tmp_path, bin_dir, hosts, PLAN_RC=str(plan_rc))
    p = subprocess.run(
        ["bash", str(DOCKER / "slurm" / "bd3_1b.sbatch")], env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == plan_rc and f"the plan failed (exit {plan_rc})" in p.stderr
    assert composer_calls(tmp_path) == []


def test_sbatch_plan_command_runs_for_real_and_exits_3_when_it_does_not_fit(tmp_path):
    """The plan argv the script renders, run with the real ``python -m pipeline.plan`` on TinyLlama's
    config.json: 2 nodes x 8 GPUs of 8 GiB cannot hold bd3_1b at microbatch 8 (exit 3)."""
    from pipeline.model.config import TINYLLAMA_1B_CONFIG

    cfg_dir = tmp_path / "tinyllama"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps(TINYLLAMA_1B_CONFIG))
    hosts = ["gpu-a17", "gpu-a18"]
    bin_dir = stubs(tmp_path, hosts)
    env = sbatch_env(tmp_path, bin_dir, hosts, GPU_MEMORY_GB="8")
    p = subprocess.run(
        ["bash", str(DOCKER / "slurm" / "bd3_1b.sbatch"), f"variables.init_from={cfg_dir}"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    (plan,) = composer_calls(tmp_path, "plan_calls.jsonl")
    real = subprocess.run([sys.executable, *plan], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert real.returncode == 3, real.stdout + real.stderr
    assert real.stderr.startswith("does not fit: peak")


# ------------------------------------------------------------------------------------- Kubernetes
def test_k8s_manifest_is_an_indexed_job_with_a_headless_service_and_secret_credentials():
    docs = list(yaml.safe_load_all((DOCKER / "k8s" / "bd3_1b.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "Service")
    job = next(d for d in docs if d["kind"] == "Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] >= 2
    assert spec["backoffLimit"] > 0  # a failed pod comes back and resumes (autoresume)
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    env = {e["name"]: e for e in container["env"]}
    assert int(env["NNODES"]["value"]) == spec["completions"]
    assert env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    for name, e in env.items():
        if CREDENTIAL.search(name):
            assert "value" not in e and "secretKeyRef" in e["valueFrom"], name
    # Everything remote: no shared volume (no PersistentVolumeClaim) is needed.
    assert env["SAVE_FOLDER"]["value"].startswith("s3://") and env["DATA_REMOTE"]["value"].startswith("s3://")
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])


def test_k8s_pods_run_one_launcher_per_node(tmp_path):
    docs = list(yaml.safe_load_all((DOCKER / "k8s" / "bd3_1b.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["bash", "-c"]
    values = {e["name"]: str(e["value"]) for e in container["env"] if "value" in e}
    bin_dir = stubs(tmp_path, [])
    nodes = job["spec"]["completions"]
    for index in range(nodes):  # what Kubernetes sets in pod `index` of the Indexed Job
        env = {
            **os.environ,
            **values,
            "JOB_COMPLETION_INDEX": str(index),
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
        }
        p = subprocess.run(
            ["bash", "-c", container["args"][0]], env=env, cwd=REPO, capture_output=True, text=True
        )
        assert p.returncode == 0, p.stderr
    assert_node_commands(composer_calls(tmp_path), nodes, values["MASTER_ADDR"], values["SAVE_FOLDER"])
    plans = composer_calls(tmp_path, "plan_calls.jsonl")
    assert len(plans) == nodes  # every pod checks before it launches
    for argv in plans:
        assert_plan_command(argv, nodes * 8, values["SAVE_FOLDER"])


@pytest.mark.parametrize("plan_rc", [2, 3])
def test_k8s_pod_fails_the_job_without_launching_when_the_plan_fails(tmp_path, plan_rc):
    docs = list(yaml.safe_load_all((DOCKER / "k8s" / "bd3_1b.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    values = {e["name"]: str(e["value"]) for e in container["env"] if "value" in e}
    bin_dir = stubs(tmp_path, [])
    env = {**os.environ, **values, "JOB_COMPLETION_INDEX": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env["PLAN_RC"] = str(plan_rc)
    p = subprocess.run(
        ["bash", "-c", container["args"][0]], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert p.returncode == plan_rc and composer_calls(tmp_path) == []
    # Kubernetes then fails the Job instead of recreating the pod backoffLimit times.
    (rule,) = job["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and plan_rc in rule["onExitCodes"]["values"]
    assert rule["onExitCodes"]["containerName"] == container["name"]
