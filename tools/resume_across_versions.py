"""A run started by an earlier version of selftrain resumes with this one.

    python tools/resume_across_versions.py [OLD_COMMIT] [--method rest|grpo]

OLD_COMMIT (default for ReST 1be5f6d, the last landing before stages became data and the ledger
got per-record locks; for GRPO 4cce328, the last landing before the config's keys were renamed and
its sections moved beside their code) is unpacked with ``git archive`` into a temporary folder and starts a two-iteration
run (ReST, or GRPO with ``--method grpo``) of the tiny test model on the embedded default, with this
checkout's Python environment, written with the key names the old version knows (``learning_rates``,
``grpo.num_iterations``: this version reads them under their new names, and must not take the run's
stored config for a changed one), and leaving ``filter.verifier`` and the export to their defaults
(changed since: the run keeps the old ones, multiple_choice and the last iteration). When
iteration 1's training is done its driver and jobs are killed (SIGKILL, as a node dies); then this
checkout reruns the same command. Prints what each version did, and exits 1 if the rerun failed,
changed a stage the old version had finished, did not finish the run, or exported another
iteration than the defaults the run was started with choose.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pipeline.config import old_defaults
from state.ledger import LEGACY, RECORD, Ledger

ROOT = Path(__file__).resolve().parent.parent


def records(ledger: Path) -> dict[str, dict]:
    """Every record of the ledger, as this version reads it (a record file, or an earlier version's JSON file)."""
    keys = {str(p.relative_to(ledger).with_suffix("")) for suffix in (RECORD, LEGACY) for p in ledger.rglob(f"*{suffix}")}
    return Ledger(ledger.parent).read_many(sorted(keys))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old_commit", nargs="?")
    parser.add_argument("--method", choices=("rest", "grpo"), default="rest")
    args = parser.parse_args()
    old_commit = args.old_commit or {"rest": "1be5f6d", "grpo": "4cce328"}[args.method]
    work = Path(tempfile.mkdtemp(prefix="resume_across_versions_"))
    old = work / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", old_commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    subprocess.run([sys.executable, "-c", f"from pathlib import Path; from tools.demo import build; build(Path({str(work / 'assets')!r}), base='random')"],
                   cwd=ROOT, check=True, capture_output=True)
    assets = work / "assets"
    # Keys both versions know: the old one refuses keys it has not heard of. filter.verifier is left
    # to the old default (multiple_choice: it judges the additions' numbers wrong, which training on
    # the replay data takes).
    config = {
        "run_name": "small", "runs_dir": str(work / "runs"), "num_iterations": 2, "learning_rates": [1e-3, 5e-4],
        "model": {"path": str(assets / "random_init")},
        "data": {"train": str(assets / "train.jsonl"), "heldout": str(assets / "heldout.jsonl")},
        "generate": {"num_samples": 2, "max_tokens": 12, "batch_size": 8, "num_shards": 2},
        "filter": {"strategy": "all"},
        "train": {"method": "lora", "lora_r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "max_steps": 2,
                  "batch_size": 4, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
                  "replay_data": str(assets / "warmstart.jsonl")},
        "eval": {"max_tokens": 12, "batch_size": 50},
        "executor": {"cluster": "local", "poll_interval_s": 0.5, "generate": {"cpus_per_task": 1}},
    }
    if args.method == "grpo":
        config["method"] = "grpo"
        config["grpo"] = {"num_generations": 2, "batch_size": 2, "max_steps": 2, "max_completion_length": 12,
                          "logging_steps": 1, "save_steps": 1000, "learning_rates": [1e-4], "num_iterations": 2}
    config_path = work / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    ledger = work / "runs" / "small" / "ledger"

    print(f"{old_commit}: starting a {args.method} run ({work})")
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.run", str(config_path)], cwd=old, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": str(old)}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    # Read as this version reads the old one's records (a JSON file, or a file of versions).
    while Ledger(ledger.parent).read("iter_001/train").get("status") != "done":
        if driver.poll() is not None:
            print(f"{old_commit}: the driver ended before iteration 1's training was done (exit {driver.returncode})")
            return 1
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local jobs it started
    driver.wait()
    before = records(ledger)
    done_before = sorted(key for key, record in before.items() if record.get("status") == "done")
    print(f"{old_commit}: killed after iteration 1's training; done: {', '.join(done_before)}")

    # From the work folder, so that the export of the final model (models/ where the run is started) lands there.
    rerun = subprocess.run([sys.executable, "-m", "pipeline.run", str(config_path)], cwd=work, capture_output=True, text=True,
                           check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    after = records(ledger)
    changed = [key for key in done_before if {k: v for k, v in after[key].items() if not k.startswith("_")}
               != {k: v for k, v in before[key].items() if not k.startswith("_")}]
    ran = sorted(key for key, record in after.items() if key not in done_before and record.get("status") == "done")
    print(f"this checkout: exit {rerun.returncode}; ran {', '.join(ran)}; run status {after['run'].get('status')}")
    if rerun.returncode != 0 or after["run"].get("status") != "done" or changed:
        print(rerun.stdout[-3000:] + rerun.stderr[-3000:])
        print(f"FAILED: {'records of finished stages changed: ' + ', '.join(changed) if changed else 'the rerun did not finish'}")
        return 1
    started_with = old_defaults(yaml.safe_load((ledger.parent / "config.yaml").read_text())).get("export.iteration", "best")
    export = after.get("export", {}).get("metrics", {})
    print(f"this checkout: exported {export.get('choice')}")
    if started_with == "last" and export.get("exported_iteration") != config["num_iterations"]:
        print("FAILED: the run was started when the last iteration was exported, and exported another")
        return 1
    print("OK: the run resumed where the earlier version left it; nothing it had finished was redone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
