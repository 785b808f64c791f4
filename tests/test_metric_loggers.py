"""Metric loggers: the TensorBoard event files of a real training run read back with TensorBoard's own
reader, the same run logged to W&B (offline) and MLflow (a local file store) and read back with their
own APIs, resume without duplicate steps, and the spec's ``logging:`` section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from train_helpers import REPO, make_run_dir, metrics, rank_output, run_ranks

from launcher.cli import main
from launcher.rundir.paths import ExperimentPaths, read_json, write_text_atomic
from launcher.rundir.run_config import RunConfig
from launcher.spec.schema import LoggingSpec, MlflowSpec, WandbSpec
from launcher.train.loggers import TensorBoardLogger

STEPS = 6
FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"
SPEC = """\
experiment: tracked
model: {builtin: tiny-glm}
data: {builtin: dialogue}
methods: [{method: lora}]
"""


def write_spec(tmp_path: Path, logging: dict[str, Any] | None, name: str = "spec.yaml") -> Path:
    import yaml

    path = tmp_path / name
    path.write_text(SPEC + (yaml.safe_dump({"logging": logging}) if logging else ""))
    return path


def _scalars(event_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, through TensorBoard's EventAccumulator (what `tensorboard` itself reads)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()[SCALARS]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step shown twice: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, dialogue_files: object):
    """One real 1-rank run with W&B (offline) and MLflow (file store) configured next to TensorBoard."""
    root = tmp_path_factory.mktemp("loggers")
    paths = make_run_dir(
        root / "exp" / "runs", "lora", name="lora", max_steps=STEPS, logging_steps=2, eval_steps=3
    )
    cfg = RunConfig.from_yaml_file(paths.run_yaml)
    # The trackers come with the dev extra; without them the TensorBoard tests still run.
    cfg.logging = LoggingSpec(
        wandb=WandbSpec(project="launcher-tests", mode="offline", tags=["ci"]) if _has("wandb") else None,
        mlflow=MlflowSpec(tracking_uri=f"file:{root / 'mlruns'}") if _has("mlflow") else None,
    )
    write_text_atomic(paths.run_yaml, cfg.to_yaml())
    # MLflow 3 refuses a file store unless asked (it prefers a database); a test needs no server.
    env = {"WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(root / "wandb-config"), FILE_STORE_ENV: "true"}
    codes = run_ranks(paths, 1, timeout_s=300, extra_env=env)
    assert codes == [0], rank_output(paths)
    return paths, cfg, root / "mlruns"


@pytest.mark.slow
def test_tensorboard_events_hold_every_metric_of_the_run(logged_run) -> None:
    paths, _, _ = logged_run
    scalars = _scalars(paths.tensorboard)
    records = metrics(paths)
    assert sorted(scalars["train/loss"]) == [r["step"] for r in records] == [2, 4, 6]
    for record in records:
        step = record["step"]
        assert scalars["train/loss"][step] == pytest.approx(record["loss"], rel=1e-6)
        assert scalars["train/lr"][step] == pytest.approx(record["lr"], rel=1e-6)
        assert scalars["train/grad_norm"][step] == pytest.approx(record["grad_norm"], rel=1e-6)
        assert scalars["train/tokens_per_s"][step] == pytest.approx(record["tokens_per_s"], rel=1e-6)
        assert scalars["memory/rank0_peak_gib"][step] > 0
    result = read_json(paths.result_json)
    evals = [json.loads(line) for line in paths.eval_jsonl.read_text().splitlines()]
    assert scalars["eval/loss"] == pytest.approx(
        {3: evals[0]["eval_loss"], STEPS: result["eval_loss"]}, rel=1e-6
    )
    for key in ("bleu", "chrf", "bleu4_chatglm"):
        assert scalars[f"eval/{key}"] == {STEPS: pytest.approx(result[key], rel=1e-6)}, key
    # result.json rounds the peak to 4 decimals
    assert scalars["memory/peak_gib"] == {STEPS: pytest.approx(result["peak_mem_gib"], abs=1e-4)}


@pytest.mark.slow
def test_tensorboard_logdir_of_the_experiment_finds_the_run(logged_run) -> None:
    """`tensorboard --logdir runs/EXP` loads runs through the EventMultiplexer: the run is found by path."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    paths, _, _ = logged_run
    exp = paths.root.parent.parent
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(exp))
    multiplexer.Reload()
    assert list(multiplexer.Runs()) == ["runs/lora/tensorboard"]
    config_text = multiplexer.Tensors("runs/lora/tensorboard", "run.yaml/text_summary")[0]
    assert b"lora" in config_text.tensor_proto.string_val[0]


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline run's ``.wandb`` file (W&B's LevelDB-style log: 32 KiB blocks,
    each record chunk behind a 7-byte header), decoded with W&B's own Record message."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow
@pytest.mark.skipif(not _has("wandb"), reason="wandb is not installed (pip install -e '.[dev]')")
def test_wandb_offline_run_holds_the_history_and_config(logged_run) -> None:
    paths, cfg, _ = logged_run
    (run_file,) = (paths.root / "wandb").glob(f"offline-run-*-{cfg.run_id}/run-{cfg.run_id}.wandb")
    history: dict[int, dict[str, float]] = {}
    config: dict[str, Any] = {}
    exits = []
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            history[items["_step"]] = items
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "run":
            assert record.run.project == "launcher-tests" and record.run.display_name == "lora"
        elif kind == "exit":
            exits.append(record.exit.exit_code)
    assert exits == [0]
    assert config["run_id"] == cfg.run_id and config["method"]["r"] == 4
    for line in metrics(paths):
        assert history[line["step"]]["train/loss"] == pytest.approx(line["loss"], rel=1e-9)
    result = read_json(paths.result_json)
    assert history[STEPS]["eval/bleu"] == pytest.approx(result["bleu"], rel=1e-9)
    assert history[STEPS]["eval/loss"] == pytest.approx(result["eval_loss"], rel=1e-9)


@pytest.mark.slow
@pytest.mark.skipif(not _has("mlflow"), reason="mlflow is not installed (pip install -e '.[dev]')")
def test_mlflow_file_store_holds_the_history_params_and_status(logged_run, monkeypatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv(FILE_STORE_ENV, "true")
    paths, cfg, store = logged_run
    client = MlflowClient(tracking_uri=f"file:{store}")
    experiment = client.get_experiment_by_name(cfg.experiment)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "lora" and run.info.status == "FINISHED"
    assert run.data.tags["launcher.run_id"] == cfg.run_id
    assert run.data.params["method.r"] == "4" and run.data.params["training.max_steps"] == str(STEPS)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [r["step"] for r in metrics(paths)]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in metrics(paths)])
    assert run.data.metrics["eval/bleu"] == pytest.approx(read_json(paths.result_json)["bleu"])


def test_a_resumed_run_shows_each_step_once_with_the_new_values(tmp_path: Path) -> None:
    """Steps after the checkpoint are trained again on resume; TensorBoard must show the new values."""
    first = TensorBoardLogger(str(tmp_path), start_step=0)
    for step in range(1, 6):
        first.log_dict({"train/loss": float(step)}, step)
    # killed after step 5 (not closed); the checkpoint was at step 3, so the resumed attempt logs 4...
    second = TensorBoardLogger(str(tmp_path), start_step=3)
    for step in range(4, 8):
        second.log_dict({"train/loss": 10.0 * step}, step)
    second.close("COMPLETED")
    assert _scalars(tmp_path)["train/loss"] == {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0, 6: 60.0, 7: 70.0}


def test_trackers_are_imported_only_when_configured(tmp_path: Path) -> None:
    paths = make_run_dir(tmp_path, "lora", name="run")
    code = (
        "import sys; from pathlib import Path; from launcher.rundir.run_config import RunConfig; "
        "from launcher.rundir.paths import RunPaths; from launcher.train.loggers import open_metric_loggers; "
        f"paths = RunPaths(Path({str(paths.root)!r})); cfg = RunConfig.from_yaml_file(paths.run_yaml); "
        "open_metric_loggers(cfg, paths, start_step=0, rank0=True).close('COMPLETED'); "
        "print(sorted(m for m in ('wandb', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
    assert list(paths.tensorboard.glob("events.out.tfevents.*"))


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_validate_refuses_a_configured_tracker_that_is_not_installed(
    tracker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    section: dict[str, Any] = {"wandb": {"project": "p"}, "mlflow": {}}[tracker]
    spec = write_spec(tmp_path, {tracker: section})
    if _has(tracker):
        assert main(["validate", str(spec)]) == 0
        capsys.readouterr()
    monkeypatch.setitem(sys.modules, tracker, None)  # how Python reports a package that cannot be imported
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"logging.{tracker}: {tracker} is configured but not installed" in err
    assert f"pip install 'launcher[{tracker}]'" in err


def test_relative_mlflow_store_is_made_absolute_and_logging_keeps_run_ids(tmp_path: Path) -> None:
    from launcher.plan.planner import load_and_plan

    plain = write_spec(tmp_path, None, name="plain.yaml")
    tracked = write_spec(tmp_path, {"mlflow": {"tracking_uri": "file:mlruns"}}, name="tracked.yaml")
    plain_run = load_and_plan(plain).runs[0]
    tracked_run = load_and_plan(tracked).runs[0]
    assert tracked_run.logging.mlflow.tracking_uri == f"file:{(tmp_path / 'mlruns').resolve()}"
    assert plain_run.run_id == tracked_run.run_id
    assert ExperimentPaths(tmp_path).run(plain_run.name).tensorboard.name == "tensorboard"
