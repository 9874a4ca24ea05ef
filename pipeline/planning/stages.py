"""The stages recipes are made of: generation shards, the filter, training, the held-out evaluation;
and the run's export of the iteration ``export.iteration`` chooses.

Each builder returns a StagePlan for one iteration: its tasks with their specs (every path from the
run's layout), its resources (``executor.<stage name>``, else the default here), how it waits in
a detached chain, the services it needs, and how its metrics add up.
"""

from __future__ import annotations

import re
from functools import cache, partial
from pathlib import Path
from typing import Any

from jobs.generation import evaluate as eval_job
from jobs.generation import generate as generate_job
from jobs.generation.backends import truncation
from jobs.scoring import filtering as filter_job
from jobs.scoring import rounds as score_job
from jobs.scoring.rewards import services_used
from jobs.scoring.rounds import SCORED_FILE
from jobs.specs import (
    EvalSpec,
    ExportSpec,
    FilterSpec,
    GenerateShardSpec,
    GrpoSpec,
    RoundScoreSpec,
    ServiceRef,
    TrainSpec,
)
from jobs.training import export as export_job
from jobs.training import grpo as grpo_job
from jobs.training import sft as train_job
from pipeline.config import RunConfig
from pipeline.planning.export import ACCURACY, choose
from pipeline.planning.stage import RunContext, StagePlan, Task, shard_ranges
from pipeline.scheduling.executors import Resources
from pipeline.scheduling.resplit import split_parts
from state import Ledger, Status

# What each stage asks for when the config does not say (executor.<stage>).
DEFAULT_RESOURCES = {
    "generate": Resources(),
    "filter": Resources(timeout_min=60),
    "score": Resources(timeout_min=60),
    "train": Resources(),
    "eval": Resources(timeout_min=60),
    "export": Resources(timeout_min=30, cpus_per_task=1),
    # The detached chain's small CPU job that submits the next chain (pipeline/loop/detach.py).
    "advance": Resources(timeout_min=10, cpus_per_task=1),
}
EXPORT = "export"
ADVANCE = "advance"
GRPO_REPORTS = ("final_reward", "reward_failures", "selection", "final_loss")
SCORE_REPORTS = ("round",)
FILTER_REPORTS = ("mean_correct_rate", "categories", "filtered_samples", "total_problems", "total_candidates",
                  "overall_accuracy", "correct_count_histogram", "correct_rate_buckets", "reward_failures",
                  "unextracted_fraction", "unjudged_problems", "warnings")


def stage_resources(config: RunConfig, name: str) -> Resources:
    """What stage ``name``'s jobs ask for: ``executor.<name>``, else its default."""
    return config.executor.resources(name, DEFAULT_RESOURCES[name])


def service_refs(run: RunContext, names: set[str]) -> dict[str, ServiceRef]:
    """How jobs reach the run's services ``names`` (config ``services.<name>``)."""
    return {
        name: ServiceRef(name, str(run.layout.service_endpoint(name)), str(run.layout.api_key),
                         getattr(run.config.services, name))
        for name in sorted(names)
    }


def shard_totals(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """A generation stage's record: its shards' problems, tokens and failed items added up."""
    return {
        "problems_generated": sum(m.get("problems", 0) for m in metrics),
        "generated_tokens": sum(m.get("generated_tokens", 0) for m in metrics),
        # Problems whose requests still failed after retries: in the shards with their error, left out by filter.
        "failed_items": sum(m.get("failed_items", 0) for m in metrics),
        # Completions cut at max_tokens (jobs/generation/backends.py's truncation).
        **truncation(sum(m.get("completions", 0) for m in metrics), sum(m.get("truncated", 0) for m in metrics)),
    }


def grpo_rounds_before(config: RunConfig, iteration: int) -> int:
    """The GRPO iterations of the run before ``iteration``."""
    return sum(1 for i in range(1, iteration) if config.method_of(i) == "grpo")


def generate_stage(run: RunContext, iteration: int, rollouts: bool = False) -> StagePlan:
    """An array of shards over the training set; a re-split straggler's rest (recorded in the stage's
    ledger record, pipeline/scheduling/resplit.py) adds tasks of its own. ``rollouts``: a GRPO round's
    samples, drawn as grpo.sampling says, with their tokens' log-probabilities, by the policy
    grpo.max_staleness rounds older than the last (started beside that policy's successor's training)."""
    config, layout = run.config, run.layout
    generate = config.grpo.sampling(config.generate) if rollouts else config.generate
    key = f"{layout.stage_dir(iteration, 'generate').relative_to(layout.run_dir)}"
    staleness = config.grpo.max_staleness if rollouts else 0
    policy = max(iteration - 1 - staleness, 0)
    beside = f"{layout.stage_dir(iteration - staleness, 'train').relative_to(layout.run_dir)}" if staleness and iteration > staleness else None
    model = run.model_after(policy)  # once: thousands of shards, one model
    resources = stage_resources(config, "generate")
    resplit = resources.resplit_policy() if config.executor.cluster != "debug" else None
    # A GRPO round of grpo.problems_per_round: its shards' ranges are places in the round's problems,
    # drawn when a spec is first made (a plan read for its task keys does not order the training set).
    per_round = config.grpo.problems_per_round if rollouts else None
    chosen = cache(lambda: config.grpo.round_problems(run.num_train, grpo_rounds_before(config, iteration), config.seed))
    ranges = shard_ranges(config.grpo.sampled_per_round(run.num_train) if per_round else run.num_train, config.generate.num_shards)
    # Shard name -> (start, stop, indices): the array's shards, then the parts of re-split stragglers.
    shards: dict[str, tuple[int, int, list[int] | None]] = {
        f"shard_{index:05d}": (start, stop, None) for index, (start, stop) in enumerate(ranges)
    }
    shards.update({name: (parts[0], parts[-1] + 1, parts) for name, parts in split_parts(run.run_dir, key).items()})
    # Paths once for all shards, when a spec is first made: every status and poll of a 10,000-shard
    # stage builds this plan, and reads only its tasks' keys.
    outputs = cache(lambda: layout.shard_outputs(iteration, "generate", shards))
    problems_path, api_key_path, compile_cache_dir = (str(p) for p in (layout.train_problems, layout.api_key, layout.compile_caches))

    def spec(name: str, start: int, stop: int, indices: list[int] | None) -> GenerateShardSpec:
        if per_round and indices is None:
            indices = sorted(chosen()[start:stop])
            start, stop = indices[0], indices[-1] + 1
        return GenerateShardSpec(
            target=run.target(f"{key}/{name}"),
            problems_path=problems_path,
            start=start,
            stop=stop,
            model_path=model,
            output_path=outputs()[name],
            generate=generate,
            seed=config.seed + iteration,
            api_key_path=api_key_path,
            compile_cache_dir=compile_cache_dir,
            indices=indices,
            progress_every_s=resplit.progress_every_s if resplit else 0.0,
            rollouts_of=policy if rollouts else None,
        )

    tasks = [Task(f"{key}/{name}", generate_job.run, build=partial(spec, name, *shard)) for name, shard in shards.items()]
    by_key = {t.key: t for t in tasks}
    sizes = [b - a for a, b in ranges]
    return StagePlan(
        key, "generate", iteration, tasks, resources, totals=shard_totals,
        jobs_text=f"array of {len(sizes)} (problems per shard {min(sizes)}-{max(sizes)})",
        writes=str(layout.stage_dir(iteration, "generate")),
        resplit=resplit, split=lambda task_key: generate_job.close_early(by_key[task_key].spec), starts_beside=beside,
        length_key="grpo.max_completion_length" if rollouts else "generate.max_tokens",
    )


def filter_stage(run: RunContext, iteration: int, generations: StagePlan) -> StagePlan:
    """Judges and filters the shards of ``generations``; waits for them with afterany (it resubmits
    failed shards itself in a detached chain)."""
    config, layout = run.config, run.layout
    output = layout.stage_dir(iteration, "filter")
    key = str(output.relative_to(layout.run_dir))
    services = services_used(config.filter.reward.rewards) if config.filter.reward else set()

    def spec() -> FilterSpec:  # made when read: it reads every shard's spec
        return FilterSpec(
            target=run.target(key),
            shard_paths=[t.spec.output_path for t in generations.tasks],
            num_problems=run.num_train,
            output_dir=str(output),
            filter=config.filter,
            num_samples=config.generate.num_samples,
            seed=config.seed,
            services=service_refs(run, services),
        )

    return StagePlan(key, "filter", iteration, [Task(key, filter_job.run, build=spec)], stage_resources(config, "filter"),
                     after="afterany", services=tuple(sorted(services)), reports=FILTER_REPORTS, writes=str(output))


def score_stage(run: RunContext, iteration: int, rollouts: StagePlan) -> StagePlan:
    """Scores a GRPO round's samples (the shards of ``rollouts``), keeps the groups with a signal and
    computes their advantages (jobs.scoring.rounds); waits for the shards with afterany, as the filter."""
    config, layout = run.config, run.layout
    output = layout.stage_dir(iteration, "score")
    key = str(output.relative_to(layout.run_dir))
    services = services_used(config.grpo.rewards)

    def spec() -> RoundScoreSpec:  # made when read: it reads every shard's spec
        return RoundScoreSpec(
            target=run.target(key),
            iteration=iteration,
            shard_paths=[t.spec.output_path for t in rollouts.tasks],
            problems_path=str(layout.train_problems),
            output_dir=str(output),
            grpo=config.grpo,
            system_prompt=config.generate.system_prompt,
            verifier=config.filter.verifier,
            answer_pattern=config.filter.answer_pattern,
            services=service_refs(run, services),
        )

    return StagePlan(key, "score", iteration, [Task(key, score_job.run, build=spec)], stage_resources(config, "score"),
                     after="afterany", services=tuple(sorted(services)), reports=SCORE_REPORTS, writes=str(output),
                     detail=f"{config.grpo.num_generations} samples per group, advantages by {config.grpo.scale_rewards}")


def train_stage(run: RunContext, iteration: int, data: StagePlan) -> StagePlan:
    """SFT on what ``data`` (the filter) kept."""
    config, layout = run.config, run.layout
    output = layout.stage_dir(iteration, "train")
    key = str(output.relative_to(layout.run_dir))
    spec = TrainSpec(
        target=run.target(key),
        data_path=str(layout.stage_dir(iteration, data.name) / "filtered.json"),
        init_model=run.model_after(iteration - 1 if config.train.init_from == "previous" else 0),
        base_model=run.model_after(0),
        iteration=iteration,
        output_dir=str(output),
        learning_rate=config.train.learning_rates[iteration - 1],
        train=config.train,
        system_prompt=config.generate.system_prompt,
        seed=config.seed + iteration,
        media_dir=config.generate.media_dir,
    )
    deepspeed = config.train.deepspeed_json()
    detail = f"lr {spec.learning_rate:g}, {config.train.strategy}" + (f" ({deepspeed})" if deepspeed else "")
    return StagePlan(key, "train", iteration, [Task(key, train_job.run, spec)], stage_resources(config, "train"),
                     reports=("final_loss",), writes=str(output), detail=detail)


def choice_metric(config: RunConfig) -> str | None:
    """The accuracy the best iteration is chosen on and the collapse guard watches: dev, else held-out."""
    return "dev_accuracy" if config.data.dev else "heldout_accuracy" if config.data.heldout else None


def eval_stage(run: RunContext, iteration: int) -> StagePlan:
    """Held-out (and dev) accuracy of iteration ``iteration``'s model (0: the base model); in a run
    with GRPO iterations, each of grpo.rewards' means too, for every iteration alike."""
    config, layout = run.config, run.layout
    output = layout.stage_dir(iteration, "eval")
    key = str(output.relative_to(layout.run_dir))
    rewards = config.grpo.rewards if any(config.method_of(i) == "grpo" for i in range(1, config.num_iterations + 1)) else []
    services = services_used(rewards)
    spec = EvalSpec(
        target=run.target(key),
        problems_path=str(layout.heldout_problems),
        model_path=run.model_after(iteration),
        output_dir=str(output),
        eval=config.eval,
        filter=config.filter,
        generate=config.generate,
        seed=config.seed,
        api_key_path=str(layout.api_key),
        compile_cache_dir=str(layout.compile_caches),
        dev_problems_path=str(layout.dev_problems) if config.data.dev else None,
        rewards=list(rewards),
        services=service_refs(run, services),
    )
    reports = ("heldout_accuracy", "heldout_categories", "heldout_rewards")
    reports += ("dev_accuracy",) if config.data.dev else ()
    return StagePlan(key, "eval", iteration, [Task(key, eval_job.run, spec)], stage_resources(config, "eval"),
                     services=tuple(sorted(services)), reports=reports, writes=str(output), length_key="eval.max_tokens")


def grpo_train_stage(run: RunContext, iteration: int, pass_rates: StagePlan | None = None,
                     scored: StagePlan | None = None) -> StagePlan:
    """GRPO with TRL's GRPOTrainer from the last policy; with ``pass_rates`` (the filter of this
    iteration's generations), only on the problems whose pass rate lies in grpo.pass_rate_band; with
    ``scored`` (this round's score job), on the groups it kept instead of samples of its own."""
    config, layout = run.config, run.layout
    output = layout.stage_dir(iteration, "train")
    key = str(output.relative_to(layout.run_dir))
    grpo = config.grpo
    # Rounds over the arrays are scored by the score job: the training job calls no reward.
    services = set() if scored else services_used(grpo.rewards)
    learning_rate = grpo.learning_rate(grpo_rounds_before(config, iteration))

    def spec() -> GrpoSpec:
        return GrpoSpec(
            target=run.target(key),
            problems_path=str(layout.train_problems),
            init_model=run.model_after(iteration - 1 if config.train.init_from == "previous" else 0),
            base_model=run.model_after(0),
            iteration=iteration,
            output_dir=str(output),
            learning_rate=learning_rate,
            grpo=grpo,
            train=config.train,
            system_prompt=config.generate.system_prompt,
            verifier=config.filter.verifier,
            answer_pattern=config.filter.answer_pattern,
            services=service_refs(run, services),
            seed=config.seed + iteration,
            pass_rates_path=str(layout.stage_dir(iteration, pass_rates.name) / "filtered_pass_rates.jsonl") if pass_rates else None,
            scored_path=str(layout.stage_dir(iteration, scored.name) / SCORED_FILE) if scored else None,
            media_dir=config.generate.media_dir,
        )

    steps = "one pass over the round's samples" if scored else f"{grpo.max_steps} steps"
    detail = f"GRPO, lr {learning_rate:g}, {grpo.num_generations} generations, {steps}, {config.train.strategy}"
    return StagePlan(key, "train", iteration, [Task(key, grpo_job.run, build=spec)], stage_resources(config, "train"),
                     services=tuple(sorted(services)), reports=GRPO_REPORTS, writes=str(output), detail=detail)


def export_stage(run: RunContext) -> StagePlan:
    """The run's final model, also under export_dir as the seeds name their models: the iteration
    ``export.iteration`` chooses from the evaluations and training done so far (a stopped run's too)."""
    config, layout = run.config, run.layout
    metric = choice_metric(config)
    iterations = range(config.num_iterations + 1)
    evals = {i: str(layout.stage_dir(i, "eval").relative_to(layout.run_dir)) for i in iterations}
    trains = {i: str(layout.stage_dir(i, "train").relative_to(layout.run_dir)) for i in iterations if i}
    records = Ledger(run.run_dir).read_many([*evals.values(), *trains.values()])
    scores = {i: score for i, key in evals.items() if records[key].get("status") == str(Status.DONE)
              and (score := (records[key].get("metrics") or {}).get(metric or "")) is not None}
    trained = [i for i, key in trains.items() if records[key].get("status") == str(Status.DONE)]
    choice = choose(config.export.iteration, scores, max(trained, default=config.num_iterations), metric)
    chosen = choice.iteration
    model_name = re.sub(r"[^A-Za-z0-9]+", "_", Path(config.model.path).resolve().name).strip("_") or "model"
    spec = ExportSpec(target=run.target(EXPORT), model_path=run.model_after(chosen),
                      export_dir=str(Path(config.export_dir).resolve()), method=config.method_of(chosen) if chosen else "base",
                      model_name=model_name, run_dir=str(run.run_dir), iteration=chosen, choice=choice.line)
    last = config.num_iterations
    return StagePlan(EXPORT, EXPORT, last, [Task(EXPORT, export_job.run, spec)], stage_resources(config, EXPORT),
                     planned_when_due=True, writes=f"{spec.export_dir}/{spec.method}_{model_name}_<time>",
                     detail=f"export.iteration: {config.export.iteration}" + (f", by {ACCURACY[metric]}" if metric else ""))
