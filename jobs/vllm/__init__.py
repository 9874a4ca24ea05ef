"""vLLM: its command line, process supervision and readiness, compile caches, and vLLM as a service of the run;
generation shards, the evaluation, GRPO's rollout server and the service job all start servers through here."""
