"""Computed policies: policies whose answers are programs, not model samples.

    scripted/    the scripted teacher (`ScriptedTeacher`) and its per-family strategies,
                 registered by family name in `scripted.registry`
    oracle.py    `OraclePolicy`: answers sub-prompts from ground truth
    baselines.py `QueryOnlyPolicy`: answers from the query alone

Layering: this package sits above `rlm_train.tasks` (whose task tables and corpora it
reads) and `rlm_train.models` (whose `CallablePolicy` interface it implements); neither
of those imports anything from here.
"""
