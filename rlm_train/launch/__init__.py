"""`rlm-train launch`: pipelines and stage recipes as Slurm jobs (rendered from slurm/*.sbatch)."""
