"""nnU-Net trainers of nnunet-topo.

This folder is what the environment variable ``nnUNet_extTrainer`` points at; nnU-Net (>= 2.8) imports
each file here as a *top-level* module when it looks a trainer up by name. Print the path with
``nnUNetv2_topo_trainer_path``.
"""
import os

TRAINER_DIR = os.path.dirname(os.path.abspath(__file__))
