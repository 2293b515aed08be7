"""lm-eval task YAMLs for IFEval subsets (installed as the package ``lm_eval_steer.tasks``)."""
