"""After the run: reading lm-eval results files and what is made of them (``lm-eval-steer compare``,
``check``, ``quality``); the looping measure they report is :mod:`lm_eval_steer.core.degeneracy`,
shared with the builder's guard.

``results`` is the one reader of results and samples files; ``tables`` formats numbers. Nothing here
is imported by :mod:`lm_eval_steer.runtime`.
"""
