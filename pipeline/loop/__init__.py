"""The run loop: the driver, the detached chain, the services it keeps alive, straggler re-split, the reward-hacking check."""
