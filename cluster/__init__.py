"""Cluster launchers: Ray on SLURM through submitit (``launch_slurm.py``), Ray cluster configs, local SLURM."""
