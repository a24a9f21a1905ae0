"""Tracking writes every metric to JSONL and TensorBoard, and reads runs back merged by step."""

from __future__ import annotations

import json

import pytest

from verl.utils.config import ConfigError
from verl.utils.report import write_report
from verl.utils.tracking import Tracking, read_metrics


def test_jsonl_and_tensorboard_receive_the_same_numbers(tmp_path):
    tracker = Tracking(tmp_path, ["jsonl", "tensorboard"], total_steps=2)
    tracker.log({"batch/score/mean": 0.25, "actor/grad_norm": 1.5, "note": "text is skipped"}, step=1)
    tracker.log({"val/greedy_acc": 0.5, "batch/score/mean": 0.75, "time/wall_s": 3.0}, step=2)
    tracker.close()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 1, "batch/score/mean": 0.25, "actor/grad_norm": 1.5}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("batch/score/mean")] == [(1, 0.25), (2, 0.75)]


def test_resumed_steps_merge_and_nonfinite_values_survive(tmp_path):
    tracker = Tracking(tmp_path, ["jsonl"])
    tracker.log({"a": 1.0}, step=1)
    tracker.log({"a": float("nan"), "b": 2.0}, step=2)
    tracker.close()
    # A resumed run appends: step 2 is logged again and its newest values win.
    tracker = Tracking(tmp_path, ["jsonl"])
    tracker.log({"a": 3.0}, step=2)
    tracker.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["a"] == 3.0 and records[1]["b"] == 2.0


def test_report_table_lists_validation_points(tmp_path):
    tracker = Tracking(tmp_path, ["jsonl"])
    tracker.log({"val/greedy_acc": 0.2, "time/wall_s": 0.0}, step=0)
    tracker.log({"batch/score/mean": 0.1}, step=1)
    tracker.log({"val/greedy_acc": 0.3, "batch/score/mean": 0.4, "time/wall_s": 9.0}, step=2)
    tracker.close()
    report = write_report(tmp_path).read_text()
    assert "| 0 | 0.200 |" in report and "| 2 | 0.300 | 0.400 |" in report
    assert "0.200 (step 0) -> 0.300 (step 2)" in report
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_unknown_logger_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        Tracking(tmp_path, ["console", "mlflow"])
    assert err.value.key == "trainer.logger" and "mlflow" in str(err.value)


def test_validation_generations_reach_console_tensorboard_and_wandb(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    samples = [{"input": "3,4,5:35=", "output": "5*(3+4)$", "score": 1.0},
               {"input": "1,1,2:9=", "output": "1+1+2$", "score": 0.0}]
    tracker = Tracking(tmp_path, ["console", "tensorboard", "wandb"])
    tracker.log_generations(samples, step=5)
    tracker.log({"val/greedy_acc": 0.5}, step=5)
    tracker.close()

    assert "'3,4,5:35=' -> '5*(3+4)$', score 1" in capsys.readouterr().err

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    (text,) = events.Tensors("val/generations/text_summary")
    assert text.step == 5 and "| 1,1,2:9= | 1+1+2$ | 0 |" in text.tensor_proto.string_val[0].decode()

    (table_file,) = tmp_path.glob("wandb/offline-run-*/files/media/table/val/generations_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["step", "input", "output", "score"]
    assert table["data"] == [[5, "3,4,5:35=", "5*(3+4)$", 1.0], [5, "1,1,2:9=", "1+1+2$", 0.0]]
