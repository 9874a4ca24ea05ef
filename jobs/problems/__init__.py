"""Problems: reading the data files (every format the seeds use), building prompts, media checks and readers."""
