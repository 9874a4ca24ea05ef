"""Servers: vLLM servers (started by shards or as a service of the run), the reward server, and the service job."""
