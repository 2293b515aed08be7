"""The recommended steering vectors, one file per model, installed as ``lm_eval_steer.vectors`` so
that ``vectors=<name>`` (e.g. ``vectors=smollm2-135m-instruct``) finds them without a path.

``lm-eval-steer vectors list`` lists them; ``vectors/README.md`` is their catalog.
"""
