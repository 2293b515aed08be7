"""lm-eval task YAMLs for the IFEval subsets, installed as ``lm_eval_steer.tasks`` so the plugin can
point the harness at them; ``ifeval_task.py`` is the glue the YAMLs name."""
