"""The run planner (pipeline/planning/): which stages a config gives, in what order, with which tasks,
resources, learning rates, models and services. In-process: no jobs, no models, no training file read."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter

from jobs.generation import generate as generate_job
from jobs.specs import GenerateShardSpec, GrpoSpec, TrainSpec
from jobs.training import grpo as grpo_job
from jobs.training import sft as train_job
from pipeline.config import RunConfig, load_config
from pipeline.planning.planner import Planner
from pipeline.planning.recipes import RECIPES
from pipeline.planning.stage import StagePlan, shard_ranges
from pipeline.planning.stages import DEFAULT_RESOURCES, stage_resources
from state import Ledger

pytestmark = pytest.mark.unit

ADAPTER = TypeAdapter(RunConfig)


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated key by key, sections recursively."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def base_model(tmp_path: Path) -> Path:
    # Never created: without load_config's check nothing is looked up on disk.
    return tmp_path / "models" / "base"


@pytest.fixture
def make_planner(tmp_path: Path, base_model: Path):
    """``make_planner(num_train=10, **sections)``: a Planner of a validated config in tmp_path."""

    def make(num_train: int = 10, **sections: Any) -> Planner:
        data = merge({
            "model": {"path": str(base_model)},
            "data": {"train": "train.jsonl"},
            "runs_dir": str(tmp_path / "runs"),
            "run_name": "r",
            "export_dir": str(tmp_path / "exported"),
        }, sections)
        config = ADAPTER.validate_python(data)
        return Planner(config, tmp_path / "runs" / "r", num_train)

    return make


def keys(stages: list[StagePlan]) -> list[str]:
    return [s.key for s in stages]


def stage(planner: Planner, key: str) -> StagePlan:
    return planner.stage(key)


# 1. Stage order -------------------------------------------------------------------------------------


def test_rest_run_with_heldout_plans_baseline_iterations_and_export_in_order(make_planner):
    planner = make_planner(num_iterations=2, data={"heldout": "heldout.jsonl"})
    stages = planner.stages()
    assert keys(stages) == [
        "baseline/eval",
        "iter_001/generate", "iter_001/filter", "iter_001/train", "iter_001/eval",
        "iter_002/generate", "iter_002/filter", "iter_002/train", "iter_002/eval",
        "export",
    ]
    assert [s.name for s in stages] == ["eval", *["generate", "filter", "train", "eval"] * 2, "export"]
    assert [s.iteration for s in stages] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    # Every stage's key is its own; a one-job stage's task is its record.
    assert len(set(keys(stages))) == len(stages)
    for s in stages:
        if s.name != "generate":
            assert [t.key for t in s.tasks] == [s.key] and not s.is_array


def test_rest_run_without_heldout_has_no_eval_stage(make_planner):
    planner = make_planner(num_iterations=3)
    stages = planner.stages()
    assert keys(stages) == [
        *(f"iter_{i:03d}/{name}" for i in (1, 2, 3) for name in ("generate", "filter", "train")),
        "export",
    ]
    assert planner.baseline() == []
    assert "eval" not in {s.name for s in stages}


def test_eval_stages_evaluate_the_right_model(make_planner, base_model):
    planner = make_planner(num_iterations=2, data={"heldout": "heldout.jsonl"})
    run_dir = planner.run_dir
    assert stage(planner, "baseline/eval").tasks[0].spec.model_path == str(base_model.resolve())
    assert stage(planner, "iter_001/eval").tasks[0].spec.model_path == str(run_dir / "iter_001" / "train" / "model")
    assert stage(planner, "iter_002/eval").tasks[0].spec.model_path == str(run_dir / "iter_002" / "train" / "model")
    for key in ("baseline/eval", "iter_002/eval"):
        assert stage(planner, key).tasks[0].spec.problems_path == str(run_dir / "data" / "heldout.jsonl")


def test_export_takes_the_last_iterations_model(make_planner, tmp_path):
    planner = make_planner(num_iterations=2, schedule=["rest", "grpo"])
    export = planner.stages()[-1]
    assert export.key == "export" and export.iteration == 2
    spec = export.tasks[0].spec
    assert spec.model_path == str(planner.run_dir / "iter_002" / "train" / "model")
    assert spec.method == "grpo"
    assert spec.model_name == "base"
    assert spec.export_dir == str((tmp_path / "exported").resolve())


def test_load_config_from_yaml_plans_the_same_as_validated_dict(tmp_path, base_model):
    data = {"model": {"path": str(base_model)}, "data": {"train": "t.jsonl", "heldout": "h.jsonl"},
            "num_iterations": 2, "generate": {"num_shards": 3}, "train": {"learning_rates": [1e-5, 2e-6]}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    from_yaml = Planner(load_config(path), tmp_path / "runs" / "r", 10)
    from_dict = Planner(ADAPTER.validate_python(data), tmp_path / "runs" / "r", 10)
    plan = [(s.key, [t.key for t in s.tasks]) for s in from_yaml.stages()]
    assert plan == [(s.key, [t.key for t in s.tasks]) for s in from_dict.stages()]
    assert len(stage(from_yaml, "iter_001/generate").tasks) == 3
    assert stage(from_yaml, "iter_002/train").tasks[0].spec.learning_rate == 2e-6


# 2. Generation shards and dependencies ---------------------------------------------------------------


@pytest.mark.parametrize(("num_train", "num_shards"), [(10, 4), (10, 1), (100, 7), (12, 12), (3, 8), (1, 4), (5, 6)])
def test_generate_shards_cover_every_problem_once(make_planner, num_train, num_shards):
    planner = make_planner(num_train=num_train, num_iterations=1, generate={"num_shards": num_shards})
    generate = stage(planner, "iter_001/generate")
    assert generate.name == "generate" and generate.is_array
    assert len(generate.tasks) == min(num_shards, num_train)
    assert [t.key for t in generate.tasks] == [f"iter_001/generate/shard_{i:05d}" for i in range(len(generate.tasks))]
    covered: list[int] = []
    for task in generate.tasks:
        spec = task.spec
        assert isinstance(spec, GenerateShardSpec) and task.function is generate_job.run
        assert spec.stop > spec.start, f"{task.key}: empty shard {spec.start}..{spec.stop}"
        assert spec.indices is None
        covered += range(spec.start, spec.stop)
    assert sorted(covered) == list(range(num_train))
    assert len(covered) == num_train  # no problem twice
    sizes = [t.spec.stop - t.spec.start for t in generate.tasks]
    assert max(sizes) - min(sizes) <= 1
    # Each shard writes its own file, and the filter reads exactly those.
    outputs = [t.spec.output_path for t in generate.tasks]
    assert len(set(outputs)) == len(outputs)
    assert all(o.startswith(str(planner.run_dir / "iter_001" / "generate")) for o in outputs)
    assert stage(planner, "iter_001/filter").tasks[0].spec.shard_paths == outputs


@pytest.mark.parametrize(("num_problems", "num_shards"), [(10, 3), (7, 7), (2, 9), (1000, 13)])
def test_shard_ranges_are_contiguous_and_never_empty(num_problems, num_shards):
    ranges = shard_ranges(num_problems, num_shards)
    assert len(ranges) == min(num_problems, num_shards)
    assert ranges[0][0] == 0 and ranges[-1][1] == num_problems
    assert all(a < b for a, b in ranges)
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))


def test_generate_shards_sample_from_the_previous_iterations_model(make_planner, base_model):
    planner = make_planner(num_iterations=2)
    assert {t.spec.model_path for t in stage(planner, "iter_001/generate").tasks} == {str(base_model.resolve())}
    assert {t.spec.model_path for t in stage(planner, "iter_002/generate").tasks} == {
        str(planner.run_dir / "iter_001" / "train" / "model")
    }
    assert {t.spec.problems_path for t in stage(planner, "iter_002/generate").tasks} == {
        str(planner.run_dir / "data" / "train.jsonl")
    }


def test_filter_waits_afterany_and_train_eval_afterok(make_planner):
    planner = make_planner(num_iterations=2, data={"heldout": "h.jsonl"})
    after = {s.key: s.after for s in planner.stages()}
    assert after["iter_001/filter"] == after["iter_002/filter"] == "afterany"
    for key in ("iter_001/train", "iter_001/eval", "iter_002/train", "iter_002/eval", "baseline/eval", "export"):
        assert after[key] == "afterok", key
    # The filter counts every problem of the training set and knows K.
    spec = stage(planner, "iter_001/filter").tasks[0].spec
    assert spec.num_problems == 10
    assert spec.num_samples == planner.config.generate.num_samples
    assert spec.output_dir == str(planner.run_dir / "iter_001" / "filter")
    # Training reads what the filter of its own iteration kept.
    assert stage(planner, "iter_002/train").tasks[0].spec.data_path == str(
        planner.run_dir / "iter_002" / "filter" / "filtered.json"
    )


# 3. Resources ---------------------------------------------------------------------------------------


def test_default_resources_per_stage(make_planner):
    planner = make_planner(num_iterations=1, data={"heldout": "h.jsonl"})
    timeouts = {s.key: s.resources.timeout_min for s in planner.stages()}
    assert timeouts == {
        "baseline/eval": 60, "iter_001/generate": 240, "iter_001/filter": 60,
        "iter_001/train": 240, "iter_001/eval": 60, "export": 30,
    }
    assert stage(planner, "export").resources.cpus_per_task == 1
    assert all(s.resources.gpus_per_task == 0 and s.resources.partition is None for s in planner.stages())
    assert {n: r.timeout_min for n, r in DEFAULT_RESOURCES.items()}.items() >= {
        "generate": 240, "filter": 60, "train": 240, "eval": 60, "export": 30}.items()


def test_executor_stage_overrides_land_on_that_stage_only(make_planner):
    planner = make_planner(num_iterations=2, data={"heldout": "h.jsonl"}, executor={
        "train": {"timeout_min": 600, "gpus_per_task": 2, "partition": "gpu"},
        "generate": {"timeout_min": 45, "array_parallelism": 16},
        "cluster": "local",
    })
    by_name: dict[str, set[tuple[Any, ...]]] = {}
    for s in planner.stages():
        r = s.resources
        by_name.setdefault(s.name, set()).add((r.timeout_min, r.gpus_per_task, r.partition, r.array_parallelism))
    assert by_name == {
        "train": {(600, 2, "gpu", 256)},
        "generate": {(45, 0, None, 16)},
        "filter": {(60, 0, None, 256)},
        "eval": {(60, 0, None, 256)},
        "export": {(30, 0, None, 256)},
    }
    assert stage_resources(planner.config, "train").gpus_per_task == 2
    assert stage_resources(planner.config, "filter") == DEFAULT_RESOURCES["filter"]


def test_grpo_train_stage_takes_executor_train(make_planner):
    planner = make_planner(num_iterations=1, method="grpo", executor={"train": {"nodes": 2, "tasks_per_node": 4}})
    train = stage(planner, "iter_001/train")
    assert (train.resources.nodes, train.resources.tasks_per_node) == (2, 4)


def test_partial_override_keeps_the_stages_other_defaults(make_planner):
    planner = make_planner(num_iterations=1, executor={"filter": {"partition": "cpu"}, "export": {"mem_gb": 4}})
    filter_resources = stage(planner, "iter_001/filter").resources
    assert filter_resources.partition == "cpu"
    assert filter_resources.timeout_min == 60
    export_resources = stage(planner, "export").resources
    assert (export_resources.timeout_min, export_resources.cpus_per_task) == (30, 1)


# 4. Learning rates and mixed schedules ---------------------------------------------------------------


def test_rest_iteration_i_trains_with_learning_rates_i_minus_1(make_planner):
    rates = [3e-5, 2e-5, 1e-5, 7e-6]
    planner = make_planner(num_iterations=4, train={"learning_rates": rates})
    for i, rate in enumerate(rates, start=1):
        task = stage(planner, f"iter_{i:03d}/train").tasks[0]
        assert task.function is train_job.run
        assert isinstance(task.spec, TrainSpec)
        assert task.spec.learning_rate == rate
        assert task.spec.iteration == i


def test_grpo_iterations_use_grpo_learning_rates_in_order_last_reused(make_planner):
    planner = make_planner(num_iterations=4, method="grpo", grpo={"learning_rates": [3e-6, 2e-6]},
                           train={"learning_rates": [9e-5]})
    got = []
    for i in range(1, 5):
        task = stage(planner, f"iter_{i:03d}/train").tasks[0]
        assert task.function is grpo_job.run
        assert isinstance(task.spec, GrpoSpec)
        got.append(task.spec.learning_rate)
    assert got == [3e-6, 2e-6, 2e-6, 2e-6]


def test_schedule_rest_rest_grpo(make_planner):
    planner = make_planner(num_iterations=3, schedule=["rest", "rest", "grpo"], data={"heldout": "h.jsonl"},
                           train={"learning_rates": [4e-5, 3e-5, 2e-5]}, grpo={"learning_rates": [5e-7, 1e-7]})
    assert keys(planner.stages()) == [
        "baseline/eval",
        "iter_001/generate", "iter_001/filter", "iter_001/train", "iter_001/eval",
        "iter_002/generate", "iter_002/filter", "iter_002/train", "iter_002/eval",
        "iter_003/train", "iter_003/eval",
        "export",
    ]
    assert [type(planner.recipe_for(i)) for i in (1, 2, 3)] == [RECIPES["rest"], RECIPES["rest"], RECIPES["grpo"]]
    specs = [stage(planner, f"iter_{i:03d}/train").tasks[0].spec for i in (1, 2, 3)]
    assert [type(s) for s in specs] == [TrainSpec, TrainSpec, GrpoSpec]
    # ReST's from train.learning_rates by iteration; the run's first GRPO iteration takes grpo's first.
    assert [s.learning_rate for s in specs] == [4e-5, 3e-5, 5e-7]
    assert specs[2].pass_rates_path is None
    assert specs[2].problems_path == str(planner.run_dir / "data" / "train.jsonl")
    assert specs[2].init_model == str(planner.run_dir / "iter_002" / "train" / "model")


def test_grpo_learning_rate_counts_only_earlier_grpo_iterations(make_planner):
    planner = make_planner(num_iterations=4, schedule=["grpo", "rest", "grpo", "rest"],
                           train={"learning_rates": [4e-5, 3e-5, 2e-5, 1e-5]}, grpo={"learning_rates": [5e-7, 1e-7]})
    rates = [stage(planner, f"iter_{i:03d}/train").tasks[0].spec.learning_rate for i in (1, 2, 3, 4)]
    assert rates == [5e-7, 3e-5, 1e-7, 1e-5]


def test_grpo_with_pass_rate_band_generates_and_filters_first(make_planner):
    planner = make_planner(num_iterations=3, schedule=["rest", "rest", "grpo"], data={"heldout": "h.jsonl"},
                           grpo={"pass_rate_band": [0.1, 0.9]})
    third = planner.iteration(3)
    assert keys(third) == ["iter_003/generate", "iter_003/filter", "iter_003/train", "iter_003/eval"]
    assert [s.after for s in third] == ["afterok", "afterany", "afterok", "afterok"]
    spec = third[2].tasks[0].spec
    assert isinstance(spec, GrpoSpec)
    assert spec.pass_rates_path == str(planner.run_dir / "iter_003" / "filter" / "filtered_pass_rates.jsonl")
    # The pass rates are measured with the policy the iteration starts from.
    assert {t.spec.model_path for t in third[0].tasks} == {str(planner.run_dir / "iter_002" / "train" / "model")}


def test_a_grpo_round_over_the_arrays_samples_as_grpo_says_with_the_last_policy_and_trains_on_the_shards(make_planner):
    planner = make_planner(num_iterations=2, method="grpo", data={"heldout": "h.jsonl"},
                           generate={"num_samples": 16, "temperature": 0.9, "top_p": 0.95, "max_tokens": 2048, "num_shards": 3},
                           grpo={"rollouts": "arrays", "num_generations": 8, "temperature": 0.7, "max_completion_length": 80})
    second = planner.iteration(2)
    assert keys(second) == ["iter_002/generate", "iter_002/score", "iter_002/train", "iter_002/eval"]
    shards = [t.spec for t in second[0].tasks]
    assert len(shards) == 3 and {s.rollouts_of for s in shards} == {1}
    assert {s.model_path for s in shards} == {str(planner.run_dir / "iter_001" / "train" / "model")}
    sampling = shards[0].generate
    assert (sampling.num_samples, sampling.temperature, sampling.top_p, sampling.max_tokens) == (8, 0.7, 1.0, 80)
    # The score job reads the shards and writes what the training job trains on.
    assert second[1].tasks[0].spec.shard_paths == [s.output_path for s in shards]
    assert second[2].tasks[0].spec.scored_path == str(planner.run_dir / "iter_002" / "score" / "scored.jsonl")
    # The held-out evaluation and the trainer's own rollouts keep the generate section as written.
    assert second[3].tasks[0].spec.generate.num_samples == 16


def test_with_max_staleness_a_round_samples_with_an_older_policy_and_starts_beside_its_successors_training(make_planner):
    planner = make_planner(num_iterations=3, method="grpo", grpo={"rollouts": "arrays", "max_staleness": 1})
    model = {0: str(Path(planner.config.model.path).resolve()), 1: str(planner.run_dir / "iter_001" / "train" / "model")}
    for iteration, (policy, beside) in {1: (0, None), 2: (0, "iter_001/train"), 3: (1, "iter_002/train")}.items():
        generate = planner.iteration(iteration)[0]
        assert generate.starts_beside == beside
        assert {(t.spec.model_path, t.spec.rollouts_of) for t in generate.tasks} == {(model[policy], policy)}
        # Trained from the last policy, on samples of the older one.
        assert planner.iteration(iteration)[2].tasks[0].spec.init_model == (model[iteration - 1] if iteration < 3 else
                                                                           str(planner.run_dir / "iter_002" / "train" / "model"))
    on_policy = make_planner(num_iterations=2, method="grpo", grpo={"rollouts": "arrays"})
    assert [on_policy.iteration(i)[0].starts_beside for i in (1, 2)] == [None, None]


def test_grpo_rounds_draw_their_problems_without_replacement_until_every_problem_had_one(make_planner):
    planner = make_planner(num_train=10, num_iterations=5, method="grpo", generate={"num_shards": 2},
                           grpo={"rollouts": "arrays", "problems_per_round": 4})
    rounds = []
    for iteration in range(1, 6):
        shards = [t.spec for t in planner.iteration(iteration)[0].tasks]
        assert len(shards) == 2 and all(s.indices == sorted(s.indices) and s.start == s.indices[0] for s in shards)
        rounds.append([i for s in shards for i in s.indices])
    assert all(len(r) == len(set(r)) == 4 for r in rounds)
    # 2 rounds of 4 per epoch of 10 problems: each epoch's rounds share no problem; the next epoch reorders.
    assert not set(rounds[0]) & set(rounds[1]) and not set(rounds[2]) & set(rounds[3])
    assert rounds[2:4] != rounds[0:2]
    assert rounds == [[i for s in (t.spec for t in planner.iteration(it)[0].tasks) for i in s.indices] for it in range(1, 6)], \
        "the same rounds when planned again (a resumed run)"


def test_grpo_without_heldout_is_train_only(make_planner):
    planner = make_planner(num_iterations=2, method="grpo")
    assert keys(planner.stages()) == ["iter_001/train", "iter_002/train", "export"]


# 5. train.init_from ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rest", "grpo"])
def test_init_from_previous_starts_from_the_last_iterations_model(make_planner, base_model, method):
    planner = make_planner(num_iterations=3, method=method, train={"init_from": "previous"})
    base = str(base_model.resolve())
    specs = [stage(planner, f"iter_{i:03d}/train").tasks[0].spec for i in (1, 2, 3)]
    assert [s.init_model for s in specs] == [
        base,
        str(planner.run_dir / "iter_001" / "train" / "model"),
        str(planner.run_dir / "iter_002" / "train" / "model"),
    ]
    assert {s.base_model for s in specs} == {base}
    assert [s.output_dir for s in specs] == [str(planner.run_dir / f"iter_{i:03d}" / "train") for i in (1, 2, 3)]


@pytest.mark.parametrize("method", ["rest", "grpo"])
def test_init_from_base_starts_every_iteration_from_the_base_model(make_planner, base_model, method):
    planner = make_planner(num_iterations=3, method=method, train={"init_from": "base"})
    base = str(base_model.resolve())
    assert [stage(planner, f"iter_{i:03d}/train").tasks[0].spec.init_model for i in (1, 2, 3)] == [base] * 3
    if method == "rest":
        # ReST-EM: still samples with the latest policy.
        assert {t.spec.model_path for t in stage(planner, "iter_003/generate").tasks} == {
            str(planner.run_dir / "iter_002" / "train" / "model")
        }


def test_relative_model_path_is_resolved(make_planner, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    planner = make_planner(num_iterations=2, model={"path": "models/base"}, train={"init_from": "base"})
    spec = stage(planner, "iter_002/train").tasks[0].spec
    assert spec.init_model == spec.base_model == str((tmp_path / "models" / "base").resolve())


# 6. Services -----------------------------------------------------------------------------------------

REWARD_SERVICE = {"reward": {"model": "X", "kind": "yes_probability"}}


def test_filter_with_service_reward_needs_the_reward_service(make_planner):
    planner = make_planner(num_iterations=1, services=REWARD_SERVICE, filter={"reward": {"rewards": [{"name": "service_score"}]}})
    filtered = stage(planner, "iter_001/filter")
    assert filtered.services == ("reward",)
    refs = filtered.tasks[0].spec.services
    assert list(refs) == ["reward"]
    assert refs["reward"].endpoint_file == str(planner.run_dir / "services" / "reward" / "endpoint.json")
    assert refs["reward"].config.model == "X"
    # Only the filter calls it.
    others = [s for s in planner.stages() if s.key != "iter_001/filter"]
    assert all(s.services == () for s in others)


def test_filter_without_reward_needs_no_service(make_planner):
    planner = make_planner(num_iterations=1, services=REWARD_SERVICE)
    assert all(s.services == () for s in planner.stages())
    assert stage(planner, "iter_001/filter").tasks[0].spec.services == {}


def test_grpo_train_with_service_reward_needs_the_reward_service(make_planner):
    planner = make_planner(num_iterations=2, schedule=["rest", "grpo"], services=REWARD_SERVICE,
                           grpo={"rewards": [{"name": "correctness"}, {"name": "service_score", "weight": 0.5}]})
    assert stage(planner, "iter_002/train").services == ("reward",)
    assert list(stage(planner, "iter_002/train").tasks[0].spec.services) == ["reward"]
    assert stage(planner, "iter_001/train").services == ()
    assert stage(planner, "iter_001/filter").services == ()


# 7. Re-split parts from the ledger --------------------------------------------------------------------


def test_resplit_parts_in_the_ledger_add_tasks(make_planner):
    planner = make_planner(num_train=10, num_iterations=2, generate={"num_shards": 4})
    before = stage(planner, "iter_001/generate")
    Ledger(planner.run_dir).update("iter_001/generate", {"splits": {
        "shard_00001": {"state": "split", "parts": [[3, 4], [5]]},
        "shard_00002": {"state": "stopping", "job_id": "123"},  # not split yet: no tasks of its own
    }})
    generate = stage(planner, "iter_001/generate")
    names = [t.key for t in generate.tasks]
    assert names == [t.key for t in before.tasks] + [
        "iter_001/generate/shard_00001_split_00", "iter_001/generate/shard_00001_split_01",
    ]
    parts = {t.key.rsplit("/", 1)[1]: t.spec for t in generate.tasks[-2:]}
    assert parts["shard_00001_split_00"].indices == [3, 4]
    assert parts["shard_00001_split_01"].indices == [5]
    assert (parts["shard_00001_split_00"].start, parts["shard_00001_split_00"].stop) == (3, 5)
    assert (parts["shard_00001_split_01"].start, parts["shard_00001_split_01"].stop) == (5, 6)
    folder = planner.run_dir / "iter_001" / "generate"
    assert parts["shard_00001_split_00"].output_path == str(folder / "shard_00001_split_00.jsonl")
    # The original shards keep their ranges; the filter reads the parts' outputs too.
    assert [(t.spec.start, t.spec.stop, t.spec.indices) for t in generate.tasks[:4]] == [
        (t.spec.start, t.spec.stop, None) for t in before.tasks
    ]
    assert stage(planner, "iter_001/filter").tasks[0].spec.shard_paths == [t.spec.output_path for t in generate.tasks]
    # Another iteration's generation is untouched.
    assert len(stage(planner, "iter_002/generate").tasks) == 4


def test_resplit_parts_of_several_shards_are_ordered_by_shard(make_planner):
    planner = make_planner(num_train=20, num_iterations=1, generate={"num_shards": 4})
    Ledger(planner.run_dir).update("iter_001/generate", {"splits": {
        "shard_00003": {"state": "split", "parts": [[17], [18, 19]]},
        "shard_00000": {"state": "split", "parts": [[2, 3, 4]]},
        "shard_00002": {"state": "finished"},
    }})
    added = [t.key.rsplit("/", 1)[1] for t in stage(planner, "iter_001/generate").tasks[4:]]
    assert added == ["shard_00000_split_00", "shard_00003_split_00", "shard_00003_split_01"]


# 8. stage_names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [["rest", "rest", "grpo"], ["grpo", "rest"], ["grpo", "grpo"], ["rest"]])
def test_stage_names_lists_each_kind_once_in_running_order(make_planner, schedule):
    planner = make_planner(num_iterations=len(schedule), schedule=schedule, data={"heldout": "h.jsonl"},
                           grpo={"pass_rate_band": [0.2, 0.8]})
    names = planner.stage_names({i: [s.name for s in planner.iteration(i)] for i in range(1, len(schedule) + 1)})
    assert names == ["generate", "filter", "train", "eval"]
    # Each iteration's stages run in the order the names give.
    for i in range(1, len(schedule) + 1):
        running = [s.name for s in planner.iteration(i)]
        assert running == sorted(running, key=names.index)
        assert len(set(running)) == len(running)
