"""Planning a run: stage and task types (stage.py), the stage builders (stages.py), the methods as recipes of stages (recipes/), and the planner that lists a run's stages."""
