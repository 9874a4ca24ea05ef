"""Settings of each stage and the plain dataclasses handed to jobs.

The stage settings double as the YAML schema's sections (pipeline.config validates them with
pydantic), so a key exists once, here. Defaults are those of the ReST seed users know.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le, Len
from pydantic import FiniteFloat, model_validator

PositiveInt = Annotated[int, Ge(1)]
PositiveFloat = Annotated[float, Gt(0)]
Fraction = Annotated[float, Ge(0), Le(1)]

MEDIA_FIELDS = ("sound", "image", "video")
DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"

# Read by pydantic when pipeline.config validates a section: an unknown key is an error, not ignored.
REJECT_UNKNOWN_KEYS = {"extra": "forbid"}


@dataclass
class VllmConfig:
    """The vLLM servers each generation shard starts on its node (``generate.backend: vllm``)."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    # The python of vLLM's own environment; it runs jobs/services/vllm_launcher.py. Default: this checkout's
    # .venv-vllm/bin/python (tools/setup_vllm.sh) if there is one, else the job's own python.
    python: str | None = None
    # Or a whole command that takes ``serve MODEL ...``, e.g. ["vllm"]; replaces python + launcher.
    command: list[str] | None = None
    # Added to the servers' environment, e.g. {VLLM_CPU_KVCACHE_SPACE: "4"}.
    env: dict[str, str] = field(default_factory=dict)
    # Where the servers listen; "node": the address of the node the shard runs on (its host name's),
    # which other nodes reach.
    host: str = "127.0.0.1"
    tensor_parallel_size: PositiveInt = 1
    # Data-parallel servers per node; default: the node's GPUs / tensor_parallel_size (1 without GPUs).
    num_servers: PositiveInt | None = None
    dtype: str = "auto"
    max_model_len: PositiveInt | None = None
    gpu_memory_utilization: Annotated[float, Gt(0), Le(1)] = 0.9
    max_num_seqs: PositiveInt | None = None
    # Serve the previous iteration's LoRA adapter on its base model (--enable-lora) instead of the
    # merged model; the first iteration serves the base model either way.
    lora: bool = False
    # Appended last to ``vllm serve``, so they override the arguments above, e.g. ["--enforce-eager"].
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: Annotated[float, Gt(0)] = 1200


@dataclass
class GenerateConfig:
    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    backend: Literal["transformers", "vllm"] = "transformers"
    num_samples: PositiveInt = 16
    temperature: Annotated[float, Ge(0)] = 0.9
    top_p: Annotated[float, Gt(0), Le(1)] = 0.95
    max_tokens: PositiveInt = 2048
    # Problems per forward batch (transformers) or concurrent requests per server (vllm).
    batch_size: PositiveInt = 8
    num_shards: PositiveInt = 4
    system_prompt: str | None = None
    # Folder that problems' sound / image / video paths are relative to; the only folder vLLM may
    # read media from.
    media_dir: str | None = None
    # vllm backend: OpenAI-compatible servers already running (``http://host:port``); no server is
    # started then. Their model name (default: the one model they serve), and the environment
    # variable holding their API key (unset: no key).
    endpoints: list[str] = field(default_factory=list)
    endpoint_model: str | None = None
    endpoint_api_key_env: str = "VLLM_API_KEY"
    # Sent with every request of the vllm backend, e.g. {top_k: 20, min_p: 0.05}.
    extra_body: dict[str, Any] = field(default_factory=dict)
    # Per request, with back-off, on connection errors, timeouts, 429 and 5xx.
    max_retries: Annotated[int, Ge(0)] = 5
    request_timeout_s: Annotated[float, Gt(0)] = 1800
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class RewardConfig:
    """One reward of a list: a registered name or ``package.module:function``, its weight, and its
    parameters, written beside them: ``{name: tag_count, weight: 0.5, tags: [reasoning, answer]}``."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    name: str
    weight: FiniteFloat = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _collect_params(cls, data: Any) -> Any:
        """Keys other than name and weight are the reward's parameters."""
        if isinstance(data, dict):
            params = dict(data.get("params") or {})
            params.update({k: v for k, v in data.items() if k not in ("name", "weight", "params")})
            data = {k: v for k, v in data.items() if k in ("name", "weight")} | {"params": params}
        return data


@dataclass
class RewardFilterConfig:
    """ReST on rewards: a candidate counts as correct when its weighted reward reaches ``threshold``."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    rewards: Annotated[list[RewardConfig], Len(min_length=1)]
    threshold: FiniteFloat = 1.0


@dataclass
class FilterConfig:
    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    strategy: Literal["learning_zone", "all", "best", "top_k"] = "learning_zone"
    top_k: PositiveInt = 3
    include_mastered: bool = False
    mastered_sample_rate: Fraction = 0.1
    # multiple_choice | numeric | math | exact | regex (the ground truth is the pattern), or a
    # function (prediction, ground_truth) -> bool given as "package.module:function".
    verifier: str = "multiple_choice"
    # Regex (or list of regexes, tried in order) whose group is the answer; tried before the
    # built-in rules: ANSWER: line, \boxed{}, ####, "answer is", last line.
    answer_pattern: str | list[str] = r"<answer>(.*?)</answer>"
    # Correct-rate bounds of challenging | learning_zone | almost_mastered | mastered. With K=16
    # they give the seed's table: 1-3, 4-11, 12-14, 15-16 correct.
    zone_bounds: tuple[Fraction, Fraction, Fraction] = (0.25, 0.75, 0.9)
    # Keep identical correct responses of one problem once.
    dedupe: bool = False
    # Judge by rewards instead of the verifier (e.g. a reward model served by services.reward).
    reward: RewardFilterConfig | None = None
    # The seed's Weight column, written as ``weight`` into filtered.json and used by training as a
    # per-sample loss weight; off (None) by default. The seed's: {challenging: 1.0,
    # learning_zone: 1.5, almost_mastered: 0.5, mastered: 0.1}.
    category_weights: dict[Literal["too_hard", "challenging", "learning_zone", "almost_mastered", "mastered"], Annotated[float, Ge(0)]] | None = None


@dataclass
class TrainConfig:
    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    method: Literal["lora", "full"] = "lora"
    # ReST-EM restarts from the base model every iteration; the seed continues from the previous.
    init_from: Literal["previous", "base"] = "previous"
    lora_r: PositiveInt = 64
    lora_alpha: PositiveInt = 128
    lora_dropout: Fraction = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    num_epochs: Annotated[float, Gt(0)] = 2
    # Overrides num_epochs when > 0.
    max_steps: int = -1
    batch_size: PositiveInt = 1
    gradient_accumulation_steps: PositiveInt = 8
    warmup_ratio: Fraction = 0.1
    weight_decay: Annotated[float, Ge(0)] = 0.0
    lr_scheduler_type: str = "linear"
    max_length: PositiveInt = 2048
    gradient_checkpointing: bool = True
    # GPU-only choices (paged 8-bit AdamW, bf16, 4-bit loading) are skipped with a log line on CPU.
    optim: str = "paged_adamw_8bit"
    bf16: bool = True
    load_in_4bit: bool = True
    # Extra SFT examples (same format as the problems, answers as full responses) mixed into
    # every iteration's training set, e.g. the warm-start data.
    replay_data: str | None = None
    save_merged: bool = True
    logging_steps: PositiveInt = 10
    save_steps: PositiveInt = 200
    # Checkpoints kept while training (the newest); all of them are deleted once the model is
    # saved, unless keep_checkpoints.
    save_total_limit: PositiveInt | None = 2
    keep_checkpoints: bool = False
    # How the processes of a training job (executor.train: nodes x tasks_per_node) share the work:
    # plain DDP, or DeepSpeed ZeRO stage 2, stage 3, or stage 3 with parameters and optimizer
    # states offloaded to CPU (configs/deepspeed/<strategy>.json, the seeds' settings with "auto"
    # for what the keys above already say). DeepSpeed needs a GPU per process.
    strategy: Literal["ddp", "zero2", "zero3", "zero3_offload"] = "ddp"
    # A DeepSpeed JSON of your own for a zero* strategy, instead of the one under configs/deepspeed/.
    deepspeed_config: str | None = None
    # Also log to these trackers (TRL passes them on); TensorBoard files go to <train>/tensorboard.
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(default_factory=list)
    # Models with audio / vision encoders, full fine-tuning: keep the encoders as they are and train
    # the rest, the projector into the language model included (seed 003's fix_vit). LoRA puts its
    # adapters on the language model only and trains nothing else either way.
    freeze_encoders: bool = False

    def deepspeed_json(self) -> Path | None:
        """The DeepSpeed config the strategy trains with; None for plain DDP."""
        if self.strategy == "ddp":
            return None
        return Path(self.deepspeed_config) if self.deepspeed_config else DEEPSPEED_CONFIGS / f"{self.strategy}.json"


@dataclass
class GrpoConfig:
    """GRPO iterations (``method: grpo`` or ``grpo`` in ``schedule``): TRL's GRPOTrainer on the
    problems with the reward registry, starting from the last policy. Defaults are seed 001's
    (train_grpo.py: 4 generations, beta 0.1, temperature 0.7, lr 1e-6) where it gives one, TRL's
    otherwise. The model, LoRA / QLoRA, strategy and GPU settings come from ``train``."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    # The rewards and their weights (jobs.scoring.rewards); correctness by the run's verifier by default.
    rewards: Annotated[list[RewardConfig], Len(min_length=1)] = field(default_factory=lambda: [RewardConfig(name="correctness")])
    num_generations: Annotated[int, Ge(2)] = 4
    beta: Annotated[float, Ge(0)] = 0.1
    temperature: PositiveFloat = 0.7
    # One per GRPO iteration, in order; the last is used again for later ones.
    learning_rates: Annotated[list[PositiveFloat], Len(min_length=1)] = field(default_factory=lambda: [1e-6])
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon: PositiveFloat = 0.2
    max_completion_length: PositiveInt = 256
    # TRL's num_iterations (mu): optimization passes per generation batch.
    num_iterations: PositiveInt = 1
    # Optimizer steps per generation batch (default: gradient_accumulation_steps, as TRL).
    steps_per_generation: PositiveInt | None = None
    # Prompts per process per step; the generation batch (prompts x processes x steps_per_generation)
    # must be a multiple of num_generations.
    batch_size: PositiveInt = 8
    gradient_accumulation_steps: PositiveInt = 1
    # Optimizer steps per GRPO iteration.
    max_steps: PositiveInt = 100
    logging_steps: PositiveInt = 5
    save_steps: PositiveInt = 25
    # Rollouts: none (TRL's transformers generation, the CPU way), or vLLM on GPUs: server (trl
    # vllm-serve on the job's last node, or on GPUs of its own on a one-node job) or colocate.
    vllm_mode: Literal["server", "colocate"] | None = None
    # GPUs of each node that the vLLM server takes on a one-node job (vllm_mode: server).
    vllm_gpus: Annotated[int, Ge(0)] = 1
    # A step (generation, reward, weight sync, update) that takes longer than this fails the job
    # instead of hanging until the time limit; the retry resumes from the last checkpoint.
    stall_timeout_s: PositiveFloat = 1800.0
    # Train only on problems whose pass rate (correct samples of generate.num_samples, measured
    # just before the iteration) lies in [low, high]; groups that would have zero variance are left out.
    pass_rate_band: tuple[Fraction, Fraction] | None = None
    # Reward hacking: flag an iteration in which a reward's mean rose by more than the margin while
    # held-out accuracy fell by more than it; stop_on_hacking stops the run before the next iteration.
    hacking_margin: Annotated[float, Ge(0)] = 0.02
    stop_on_hacking: bool = False

    def learning_rate(self, grpo_iteration: int) -> float:
        """The learning rate of the ``grpo_iteration``-th GRPO iteration of the run (0-based)."""
        return self.learning_rates[min(grpo_iteration, len(self.learning_rates) - 1)]


@dataclass
class EvalConfig:
    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    # vllm: the eval job starts vLLM servers of the model it evaluates, with generate.vllm's
    # settings (never generate.endpoints: those serve another model).
    backend: Literal["transformers", "vllm"] = "transformers"
    max_tokens: PositiveInt = 2048
    # Problems per forward batch (transformers) or requests in flight per server (vllm).
    batch_size: PositiveInt = 64


@dataclass
class RewardServiceConfig:
    """A reward model served by a job of the run (seed 002's listener service), and how clients use it."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    # A local Hugging Face model folder (no hub is contacted).
    model: str
    # yes_probability: the probability of "yes" for each candidate (the seed's listener, which
    # picks the likeliest); classifier: a sequence-classification reward model's score.
    kind: Literal["yes_probability", "classifier"]
    # Server: inferences at once (the seed's INFERENCE_CONCURRENCY), how long a request waits for
    # one before it is answered 503 (INFERENCE_ACQUIRE_TIMEOUT), pairs per model call
    # (LISTENER_BATCH_SIZE).
    concurrency: PositiveInt = 1
    acquire_timeout_s: PositiveFloat = 300.0
    batch_size: PositiveInt = 5
    # Where it listens: default 127.0.0.1 on the embedded default, the node's address on SLURM.
    host: str | None = None
    startup_timeout_s: PositiveFloat = 600.0
    # Clients (the service_score reward): requests per call (LISTENER_CHUNK_SIZE), the pause
    # between calls (LISTENER_CHUNK_DELAY), per-call timeout, retries with back-off on 503, 5xx,
    # timeouts and dropped connections (LISTENER_MAX_RETRIES, LISTENER_BACKOFF_FACTOR), and how long
    # to wait for a service that is down (being resubmitted) before its scores count as failed.
    chunk_size: PositiveInt = 4
    chunk_delay_s: Annotated[float, Ge(0)] = 0.05
    timeout_s: PositiveFloat = 60.0
    max_retries: Annotated[int, Ge(0)] = 3
    backoff_factor: Annotated[float, Ge(0)] = 1.0
    wait_s: PositiveFloat = 900.0


@dataclass
class VllmServiceConfig:
    """vLLM servers of one model as a job of the run (the seeds' "start the vLLM server" step), with
    ``generate.vllm``'s settings; ``python -m pipeline.serve`` and sbatch/vllm_server.sbatch run it."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    # A local model folder; default: model.path.
    model: str | None = None


@dataclass
class ServicesConfig:
    """Long-lived servers of the run, each a job that serves while the stages needing it run."""

    __pydantic_config__ = REJECT_UNKNOWN_KEYS

    reward: RewardServiceConfig | None = None
    vllm: VllmServiceConfig | None = None


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
    # The run's compile caches of its vLLM servers (jobs.services.vllm_server.CompileCache); "": none kept.
    compile_cache_dir: str = ""
    # The problems' indices in problems_path, when not start..stop (the rest of a straggler, re-split).
    indices: list[int] | None = None
    # Seconds between progress reports to the ledger (0: none), for the driver's straggler watch.
    progress_every_s: float = 0.0


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


@dataclass
class ExportSpec:
    """Copy a run's final model to ``<export_dir>/<method>_<model name>_<timestamp>/``, as the seeds name them."""

    target: JobTarget
    model_path: str
    export_dir: str
    method: str
    model_name: str
    run_dir: str
    iteration: int


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

