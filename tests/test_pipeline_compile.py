"""`skinlesion pipeline compile`: the compiled KFP v2 YAML's DAG (the six step tasks after the
data step and their edges), every task's CPU/memory and the train task's GPU / toleration /
shm, the secret references, artifact types, the image, and defaults equal to the committed
params.yaml."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kfp.components import load_component_from_file

from components.common.config import SECTIONS, STEP_SECTIONS, load_params, task_resources
from components.commands.cli import main as skinlesion
from pipeline import kfp_components
from pipeline.cli import build
from pipeline.pipeline import build_pipeline
from test_config import LAUGHS

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"preprocess", "split", "class-weights", "train", "evaluate", "register"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[dict, dict]:
    path = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    assert skinlesion(["pipeline", "compile", "-o", str(path)]) == 0
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _artifact_edges(task: dict) -> set[tuple[str, str]]:
    """(producer task, output key) of each artifact input."""
    return {(spec["taskOutputArtifact"]["producerTask"],
             spec["taskOutputArtifact"]["outputArtifactKey"])
            for spec in task.get("inputs", {}).get("artifacts", {}).values()}


def test_compile_writes_the_six_steps_after_the_data_step(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == STEPS | {"materialise-data"}  # no condition: register gates itself
    assert spec["pipelineInfo"]["name"] == "skin-lesion"


def test_dag_edges(compiled):
    spec, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    deps = {name: set(t.get("dependentTasks", [])) for name, t in root.items()}
    assert deps == {
        "materialise-data": set(),
        "preprocess": {"materialise-data"},
        "split": {"preprocess"},  # the labels of the images preprocess kept
        "class-weights": {"split"},
        "train": {"preprocess", "split", "class-weights"},
        "evaluate": {"train", "preprocess", "split"},
        "register": {"evaluate", "train", "split"},
    }
    assert _artifact_edges(root["preprocess"]) == {("materialise-data", "raw")}
    assert _artifact_edges(root["split"]) == {("preprocess", "prepared")}
    assert _artifact_edges(root["class-weights"]) == {("split", "splits")}
    assert _artifact_edges(root["train"]) == {("preprocess", "prepared"), ("split", "splits"),
                                              ("class-weights", "weights")}
    assert _artifact_edges(root["evaluate"]) == {("train", "model"), ("preprocess", "prepared"),
                                                 ("split", "splits")}
    assert _artifact_edges(root["register"]) == {("train", "model"), ("evaluate", "evaluation"),
                                                 ("split", "splits")}


def test_every_task_has_cpu_and_memory_requests_and_limits_from_params(compiled):
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    expected = {"preprocess": ("4", "8Gi"), "train": ("8", "32Gi"), "evaluate": ("4", "16Gi"),
                "register": ("1", "4Gi")}  # params.yaml's kubeflow.resources; default 1, 2Gi
    assert len(executors) == 7
    for name, executor in executors.items():
        task = name.removeprefix("exec-").replace("-data", "").replace("-", "_")
        res = executor["container"]["resources"]
        cpu, memory = expected.get(task, ("1", "2Gi"))
        assert res["resourceCpuRequest"] == res["resourceCpuLimit"] == cpu, name
        assert res["resourceMemoryRequest"] == res["resourceMemoryLimit"] == memory, name
    with pytest.raises(ValueError, match="unknown key kubeflow.resources.trian"):
        task_resources({"kubeflow": {"resources": {"trian": {"cpu": "1"}}}})


def test_train_asks_for_one_nvidia_gpu_a_toleration_and_shm(compiled):
    spec, k8s = compiled
    executors = spec["deploymentSpec"]["executors"]
    accelerator = executors["exec-train"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceType"] == "nvidia.com/gpu"
    assert accelerator["resourceCount"] == "1"
    others = [name for name, e in executors.items()
              if name != "exec-train" and "accelerator" in e["container"].get("resources", {})]
    assert others == [], "only the train step asks for a GPU"
    train = k8s["exec-train"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in train["tolerations"]
    shm = [m for m in train["emptyDirMounts"] if m["mountPath"] == "/dev/shm"]
    assert len(shm) == 1 and shm[0]["medium"] == "Memory"


def test_credentials_come_from_kubernetes_secrets_named_by_parameters(compiled):
    _, k8s = compiled

    def secrets(executor: str) -> dict[str, tuple[str, bool]]:
        found = {}
        for s in k8s[executor]["secretAsEnv"]:
            name = s["secretNameParameter"]["componentInputParameter"].removeprefix("pipelinechannel--")
            for pair in s["keyToEnv"]:
                found[pair["envVar"]] = (name, s.get("optional", False))
        return found

    # optional: data from a folder and a server that serves artifacts need no S3 credentials
    s3 = {"AWS_ACCESS_KEY_ID": ("s3_secret", True), "AWS_SECRET_ACCESS_KEY": ("s3_secret", True)}
    mlflow = {"MLFLOW_TRACKING_USERNAME": ("mlflow_secret", True),
              "MLFLOW_TRACKING_PASSWORD": ("mlflow_secret", True)}
    assert secrets("exec-materialise-data") == s3
    for executor in ("exec-train", "exec-evaluate", "exec-register"):
        assert secrets(executor) == s3 | mlflow, executor
    for executor in ("exec-preprocess", "exec-split", "exec-class-weights"):
        assert "secretAsEnv" not in k8s.get(executor, {}), f"{executor} needs no credentials"


def test_mlflow_uri_is_a_pipeline_parameter_wired_to_the_tracking_steps(compiled):
    spec, _ = compiled
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["mlflow_tracking_uri"]["parameterType"] == "STRING"
    root = spec["root"]["dag"]["tasks"]
    for task in ("train", "evaluate", "register"):
        assert root[task]["inputs"]["parameters"]["mlflow_tracking_uri"] == {
            "componentInputParameter": "mlflow_tracking_uri"}


def test_artifact_types(compiled):
    spec, _ = compiled

    def outputs(component: str) -> dict[str, str]:
        arts = spec["components"][component]["outputDefinitions"].get("artifacts", {})
        return {k: v["artifactType"]["schemaTitle"] for k, v in arts.items()}

    assert outputs("comp-materialise-data") == {"raw": "system.Dataset"}
    assert outputs("comp-preprocess") == {"prepared": "system.Dataset"}
    assert outputs("comp-split") == {"splits": "system.Dataset"}
    assert outputs("comp-class-weights") == {"weights": "system.Dataset"}
    assert outputs("comp-train") == {"model": "system.Model", "train_metrics": "system.Metrics"}
    assert outputs("comp-evaluate") == {"metrics": "system.Metrics",
                                        "classification": "system.ClassificationMetrics",
                                        "evaluation": "system.Artifact"}
    assert outputs("comp-register") == {"registration": "system.Artifact"}


def test_every_step_is_a_lightweight_component_on_the_project_image(compiled):
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 7
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == kfp_components.IMAGE, name
        program = "\n".join(container["command"])
        assert "pip install" not in program, f"{name} installs packages at run time"
        assert "kfp.dsl.executor_main" in program
    step_of = {"preprocess": "preprocess", "split": "split", "class-weights": "class_weights",
               "train": "train", "evaluate": "evaluate", "register": "register"}
    for task, module in step_of.items():
        source = "\n".join(executors[f"exec-{task}"]["container"]["command"])
        assert f"from components import {module} as step" in source
        assert "step.run(" in source


def test_defaults_come_from_params_yaml(compiled):
    spec, _ = compiled
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    params = load_params(ROOT / "params.yaml")
    assert inputs["data_path"]["defaultValue"] == params["data"]["raw"]
    for name in STEP_SECTIONS:  # as written there: integers, nulls (train.dims) included
        default = inputs[f"{name}_params"]["defaultValue"]
        assert default == params[name] and set(default) == set(params[name]), name
        assert all(type(default[k]) is type(v) for k, v in params[name].items()), name
        # and the step's config reads it back to exactly params.yaml's values
        assert SECTIONS[name].from_dict(default) == SECTIONS[name].from_dict(params[name]), name
    assert "shared_pvc" not in inputs, "the single-pod pipeline mounts no shared volume"


def test_the_compiled_file_reads_as_params_yaml_and_kfp_loads_it(tmp_path):
    path = tmp_path / "p.yaml"
    assert skinlesion(["pipeline", "compile", "-o", str(path)]) == 0
    text = path.read_text()
    assert "epochs: 100\n" in text and "dims: null\n" in text and "epochs: 100.0" not in text
    loaded = load_component_from_file(str(path))  # a null in a Struct default is valid
    train = loaded.pipeline_spec.root.input_definitions.parameters["train_params"]
    assert train.default_value.struct_value["epochs"] == 100
    assert train.default_value.struct_value["dims"] is None


def test_only_the_distributed_pipeline_has_the_shared_volume_parameter():
    params = load_params(ROOT / "params.yaml")
    single = build_pipeline(params).component_spec.inputs
    params["train"].update(nodes=2)
    distributed = build_pipeline(params).component_spec.inputs
    assert "shared_pvc" not in single and "shared_pvc" in distributed
    assert set(distributed) - set(single) == {"shared_pvc"}


def test_image_option_rewrites_every_step(tmp_path):
    path = tmp_path / "p.yaml"
    assert skinlesion(["pipeline", "compile", "-o", str(path), "--image", "registry.local/skin:test"]) == 0
    spec, platform = yaml.safe_load_all(path.read_text())
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {
        "registry.local/skin:test"}
    assert "exec-train" in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert path.read_text().startswith("# PIPELINE DEFINITION")


def test_arguments_merge_params_files_and_overrides(tmp_path):
    demo = tmp_path / "demo.yaml"
    demo.write_text("train:\n  epochs: 2\n  batch_size: 8\nsplit:\n  seed: 3\n")
    _, _, args = build([str(demo)], ["train.peak_lr=0.005", "register.gate_threshold=0.25",
                                     "mlflow_tracking_uri=http://mlflow:5000"],
                       params_path=str(ROOT / "params.yaml"))
    defaults = load_params(ROOT / "params.yaml")
    assert args["train_params"]["epochs"] == 2 and args["train_params"]["batch_size"] == 8
    assert args["train_params"]["peak_lr"] == 0.005
    assert args["train_params"]["preset"] == defaults["train"]["preset"]
    assert args["split_params"]["seed"] == 3 and args["register_params"]["gate_threshold"] == 0.25
    assert args["mlflow_tracking_uri"] == "http://mlflow:5000"
    with pytest.raises(ValueError, match="no such key"):
        build([], ["train.epoch=2"], params_path=str(ROOT / "params.yaml"))
    with pytest.raises(SystemExit, match="not a pipeline parameter"):
        build([], ["epochs=2"], params_path=str(ROOT / "params.yaml"))


def test_demo_override_file_only_sets_known_keys():
    """params.demo.yaml and params.paper.yaml set only keys of params.yaml's sections, and the
    merged result is a valid configuration of every step."""
    base = load_params(ROOT / "params.yaml")
    for partial in ("params.demo.yaml", "params.paper.yaml"):
        override = load_params(ROOT / partial)
        for section, values in override.items():
            assert section in base, f"{partial}: unknown section {section}"
            for key in values:
                assert key in base[section], f"{partial}: {section}.{key} is not a setting"
        merged = load_params([ROOT / "params.yaml", ROOT / partial])
        for name, cls in SECTIONS.items():
            cls.resolve(merged)  # valid
    demo = load_params([ROOT / "params.yaml", ROOT / "params.demo.yaml"])
    assert demo["train"]["epochs"] < base["train"]["epochs"]


# -- hostile params through every pipeline command (issue 24, item 12) ----------------------
HOSTILE = {  # name -> (params file text, part of the one line)
    "billion_laughs": (LAUGHS, "anchors and aliases"),
    "kubeflow_typo": ("kubeflow:\n  resorces: {}\n", "unknown key kubeflow.resorces"),
    "section_not_a_mapping": ("train: 5\n", "train = 5 is not a mapping"),
    "bad_value_of_a_later_step": ("evaluate:\n  bootstrap: -1\n", "evaluate.bootstrap"),
}
COMMANDS = {"compile": ["-o", "{tmp}/p.yaml"], "run-local": ["--pipeline_root", "{tmp}/root"],
            "submit": ["--host", "http://127.0.0.1:9"]}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_hostile_params_stop_every_pipeline_command_in_one_line(tmp_path, capsys, command,
                                                                case):
    import time

    text, named = HOSTILE[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    argv = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    start = time.perf_counter()
    assert skinlesion(["pipeline", command, *argv, "--params", str(ROOT / "params.yaml"),
                       "--params_file", str(bad)]) == 1
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and len(err) < 700, err[:2000]
    assert err.startswith(f"skinlesion pipeline {command}: ") and str(bad) in err and named in err
    assert not (tmp_path / "p.yaml").exists() and not (tmp_path / "root").exists()


def test_a_param_override_is_read_by_the_params_loader(tmp_path, capsys):
    assert skinlesion(["pipeline", "run-local", "--pipeline_root", str(tmp_path / "root"),
                       "--params", str(ROOT / "params.yaml"),
                       "-S", "train.dims=[&a [1, 1], *a, *a, *a]"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-S train.dims" in err and "aliases" in err
    _, _, args = build([], ["train.gpu_resident=on"], str(ROOT / "params.yaml"))
    assert SECTIONS["train"].from_dict(args["train_params"]).gpu_resident == "on"
