"""Evaluation during training: metrics, baselines and a grid every eval.every steps, one sampler."""

import json
import logging

import jax
import numpy as np
import pytest

from dim_jax import evaluators, train
from tests.test_train import tiny_config


@pytest.fixture
def small_classifier(monkeypatch):
  monkeypatch.setattr(evaluators, "SHAPES_CLASSIFIER_EXAMPLES", 1024)


def test_evaluates_every_k_steps_with_one_compiled_sampler(tmp_path, small_classifier, caplog):
  config = tiny_config(num_steps=5)
  config.eval.update(every=2, num_samples=32, cache_dir=str(tmp_path / "cache"))
  config.sample.update(batch_size=4, num_images=4)
  with caplog.at_level(logging.DEBUG), jax.log_compiles(True):
    train.train_and_evaluate(config, str(tmp_path / "run"))

  steps = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "run").glob("eval_*.json"))
  assert steps == [2, 4]
  results = [json.loads((tmp_path / "run" / f"eval_{s}.json").read_text()) for s in steps]
  for r in results:
    assert r["num_samples"] == 32 and np.isfinite(r["fd_shapes"]) and 0 <= r["class_accuracy"] <= 1
    # Held-out real shapes are nearer the reference than Gaussian noise, and better classified.
    real, noise = r["baselines"]["real"], r["baselines"]["noise"]
    assert 0 < real["fd_shapes"] < noise["fd_shapes"]
    assert real["class_accuracy"] > noise["class_accuracy"]
    assert r["seconds"] > 0
  assert results[0]["train_seconds"] < results[1]["train_seconds"]
  # Two evaluations and the final grid (same batch shape) compile the sampler once.
  compiles = [r for r in caplog.records if "Compiling jit(sample_batch)" in r.getMessage()]
  assert len(compiles) == 1, [r.getMessage()[:80] for r in compiles]


def test_other_data_without_inception_write_only_grids(tmp_path, caplog):
  config = tiny_config(num_steps=2)
  config.data.name = "image_folder"
  config.eval.update(every=2)
  with caplog.at_level(logging.INFO):
    evaluator = evaluators.create(config)
  assert evaluator is None
  assert any("eval.inception_path" in r.getMessage() for r in caplog.records)


def test_the_demo_is_scored_at_its_last_step_whatever_its_length():
  from configs import demo

  steps = demo.get_config().train.num_steps
  longer = demo.get_config()
  longer.train.num_steps = 3 * steps + 1
  assert longer.eval.every == 3 * steps + 1
  quiet = demo.get_config()
  quiet.eval.every = 0  # set alone: the run's length stays
  quiet.train.num_steps = steps + 7
  assert (quiet.train.num_steps, quiet.eval.every) == (steps + 7, 0)
