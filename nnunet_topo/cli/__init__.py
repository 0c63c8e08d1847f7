"""The console commands, one module per command, named after it (``nnUNetv2_topo_<name>`` -> ``cli/<name>.py``).

Each module parses the arguments, calls one library function and prints; :mod:`nnunet_topo.cli.common` holds what
they share (the user-error exit, the model arguments). Library modules never import this package. Console scripts
(setup.cfg): make_synthetic, check_rules, evaluate_folder, trainer_path, refine, plan_whole_volume, plan_mesh,
predict_meshes, summarize_cv, report, export, volume_mesh, repair_meshes, precompute; ``python -m`` commands:
``python -m nnunet_topo.cli.label_free`` and ``python -m nnunet_topo.cli.segmentation_meshes``.
"""
