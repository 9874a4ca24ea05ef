"""The messages the driver hands to jobs: plain dataclasses, pickled by submitit.

The config sections they carry live next to the code that reads them (``jobs/<group>/config.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.generation.config import EvalConfig, GenerateConfig
from jobs.scoring.config import FilterConfig, RewardConfig
from jobs.services.config import RewardServiceConfig
from jobs.training.config import GrpoConfig, TrainConfig


@dataclass
class VllmServing:
    """What a vLLM service job serves: a model, with the run's generation settings for its servers."""

    model: str
    generate: GenerateConfig

    @property
    def startup_timeout_s(self) -> float:
        return self.generate.vllm.startup_timeout_s


@dataclass
class ServiceRef:
    """How a job reaches a reward service of the run: the endpoint file its job writes (and rewrites
    after a restart), the run's API key file, and the service's settings."""

    name: str
    endpoint_file: str
    api_key_file: str
    config: RewardServiceConfig


@dataclass
class JobTarget:
    """Where a job reports: the run directory and the ledger record it owns.

    ``submission`` names the driver's submission that started this job (None when run by hand).
    A job whose record has since been handed to another submission, or is no longer in flight
    (done, failed, withdrawn), does nothing: the driver resubmits a task when it lost track of a
    job (killed between sbatch's answer and recording it), and the lost job must not run the task
    a second time if it starts after all.
    """

    run_dir: str
    ledger_key: str
    submission: str | None = None


@dataclass
class GenerateShardSpec:
    target: JobTarget
    problems_path: str
    start: int
    stop: int
    model_path: str
    output_path: str
    generate: GenerateConfig
    seed: int
    # The run's API key file, for the vLLM servers the shard starts.
    api_key_path: str
    # The run's compile caches of its vLLM servers (jobs.vllm.server.CompileCache); "": none kept.
    compile_cache_dir: str = ""
    # The problems' indices in problems_path, when not start..stop (the rest of a straggler, re-split).
    indices: list[int] | None = None
    # Seconds between progress reports to the ledger (0: none), for the driver's straggler re-split.
    progress_every_s: float = 0.0
    # GRPO's rollouts (grpo.rollouts: arrays): every candidate keeps its completion token ids and
    # the sampler's log-probabilities, and the policy version (iteration) that sampled it.
    rollouts_of: int | None = None


@dataclass
class FilterSpec:
    target: JobTarget
    shard_paths: list[str]
    num_problems: int
    output_dir: str
    filter: FilterConfig
    num_samples: int
    seed: int
    # The services its rewards call (filter.reward), by name.
    services: dict[str, ServiceRef] = field(default_factory=dict)


@dataclass
class RoundScoreSpec:
    """The score job of a GRPO round over the arrays (jobs.scoring.rounds)."""

    target: JobTarget
    iteration: int
    shard_paths: list[str]
    # The run's training problems: each sample's prompt and columns, as the trainer builds them.
    problems_path: str
    output_dir: str
    grpo: GrpoConfig
    system_prompt: str | None
    # What the rewards get in their RewardContext: how answers are judged, and the run's services.
    verifier: str
    answer_pattern: str | list[str]
    services: dict[str, ServiceRef] = field(default_factory=dict)


@dataclass
class TrainSpec:
    target: JobTarget
    data_path: str
    init_model: str
    base_model: str
    iteration: int
    output_dir: str
    learning_rate: float
    train: TrainConfig
    system_prompt: str | None
    seed: int
    # generate.media_dir: where the problems' sound / image / video files are, as for generation.
    media_dir: str | None = None


@dataclass
class GrpoSpec:
    target: JobTarget
    # The problems to train on: the run's, or those a pass-rate band selected.
    problems_path: str
    init_model: str  # the policy it starts from
    base_model: str
    iteration: int
    output_dir: str
    learning_rate: float
    grpo: GrpoConfig
    # Model, LoRA / QLoRA, strategy and hardware settings.
    train: TrainConfig
    system_prompt: str | None
    # What the rewards get in their RewardContext: how answers are judged, and the run's services.
    verifier: str
    answer_pattern: str | list[str]
    services: dict[str, ServiceRef]
    seed: int
    # With grpo.pass_rate_band: the problems' pass rates measured just before (the filter's
    # filtered_pass_rates.jsonl); only those in the band are trained on.
    pass_rates_path: str | None = None
    # With grpo.rollouts: arrays, the round's scored groups to train on (jobs.scoring.rounds).
    scored_path: str | None = None
    # generate.media_dir: where the problems' sound / image / video files are, as for generation.
    media_dir: str | None = None


@dataclass
class ExportSpec:
    """Copy a run's final model to ``<export_dir>/<method>_<model name>_<timestamp>/``, as the seeds name them."""

    target: JobTarget
    model_path: str
    export_dir: str
    method: str
    model_name: str
    run_dir: str
    # The iteration exported; 0: none beat the base model, and nothing is exported.
    iteration: int
    # Why this iteration (pipeline/planning/export.py), for the run's last line and the ledger.
    choice: str = ""


@dataclass
class EvalSpec:
    target: JobTarget
    problems_path: str
    model_path: str
    output_dir: str
    eval: EvalConfig
    filter: FilterConfig
    # The run's generation settings: system prompt, media folder, vLLM servers.
    generate: GenerateConfig
    seed: int
    # The run's API key file, for the vLLM servers the evaluation starts.
    api_key_path: str
    # The run's compile caches of its vLLM servers; "": none kept.
    compile_cache_dir: str = ""
    # Development problems, evaluated beside the held-out ones (dev_accuracy); None: none.
    dev_problems_path: str | None = None
    # The rewards whose means over the greedy answers it reports (a GRPO run's), and the services they call.
    rewards: list[RewardConfig] = field(default_factory=list)
    services: dict[str, ServiceRef] = field(default_factory=dict)


@dataclass
class ServiceSpec:
    """A service job: serve ``config`` until the stages it serves are done, or the job is stopped."""

    target: JobTarget
    name: str
    config: RewardServiceConfig | VllmServing
    # Where consumers find it (rewritten by every start), the run's API key file, and a folder for its
    # servers' logs and caches.
    endpoint_file: str
    api_key_file: str
    folder: str
    # Listen on loopback (the embedded default: consumers run on this machine), else on the node's address.
    loopback: bool
    # Ledger keys of the stages it serves: once all are done it stops by itself (a detached run has no
    # driver to cancel it).
    consumers: list[str]
    # The run's compile caches of its vLLM servers; "": none kept.
    compile_cache_dir: str = ""
    # The run's generate.media_dir: where a listener that looks at images reads them.
    media_dir: str | None = None

