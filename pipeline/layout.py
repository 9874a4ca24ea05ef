"""Where everything of a run lives: the one owner of the run directory's layout.

    runs/<run_name>/
      config.yaml                    resolved config of the run (its presence makes the run resumable)
      ledger/                        the state ledger (state.Ledger): a record per stage, shard, service (<key>.jsonl)
      data/train.jsonl heldout.jsonl dev.jsonl  the problems, validated and frozen for the run
      vllm_api_key                   the run's API key (0600): its vLLM servers and services take it
      compile_cache/<key>/           vLLM compile caches, one per model and command line, published once
      baseline/eval/                 held-out accuracy of the base model ("iteration 0")
      iter_001/generate/shard_00000.jsonl ... (shard_00003_split_00.jsonl ...: a re-split straggler's rest)
      iter_001/filter/filtered.json (+ _stats, _analytics, _by_category, _no_correct, _analytics.log)
      iter_001/train/model  (adapter, model_card.json, data_order/)
      iter_001/eval/predictions.jsonl
      services/<name>/endpoint.json  where a service of the run listens now (rewritten after a restart)
      submitit/<task key>/<submission>/ job logs

Jobs get their paths in their specs from here; nothing else builds paths inside a run directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

BASELINE = "baseline"


def iteration_name(iteration: int) -> str:
    return f"iter_{iteration:03d}"


class RunLayout:
    def __init__(self, run_dir: Path | str):
        self.run_dir = Path(run_dir).resolve()

    @property
    def config(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def train_problems(self) -> Path:
        return self.run_dir / "data" / "train.jsonl"

    @property
    def heldout_problems(self) -> Path:
        return self.run_dir / "data" / "heldout.jsonl"

    @property
    def dev_problems(self) -> Path:
        return self.run_dir / "data" / "dev.jsonl"

    @property
    def api_key(self) -> Path:
        # Named for the vLLM servers that used it first; every server of the run takes it.
        return self.run_dir / "vllm_api_key"

    @property
    def compile_caches(self) -> Path:
        return self.run_dir / "compile_cache"

    def stage_dir(self, iteration: int, stage: str) -> Path:
        """``iter_002/train``; iteration 0 is the base model's (``baseline/eval``)."""
        return self.run_dir / (iteration_name(iteration) if iteration else BASELINE) / stage

    def shard_outputs(self, iteration: int, stage: str, names: Iterable[str]) -> dict[str, str]:
        """``{name: path}``: ``shard_00003.jsonl``; the rest of a re-split straggler:
        ``shard_00003_split_01.jsonl``. Strings, made at once: every status and poll of a
        10,000-shard stage plans it again."""
        folder = self.stage_dir(iteration, stage)
        return {name: f"{folder}/{name}.jsonl" for name in names}

    def trained_model(self, iteration: int, stage: str = "train") -> Path:
        return self.stage_dir(iteration, stage) / "model"

    def service_endpoint(self, name: str) -> Path:
        return self.run_dir / "services" / name / "endpoint.json"

    def job_logs(self, key: str, submission: str) -> Path:
        return self.run_dir / "submitit" / key / submission
