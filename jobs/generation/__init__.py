"""Generation: K samples per problem (the shard job), greedy held-out evaluation, and the backends they run on."""
