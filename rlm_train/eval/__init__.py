"""`rlm-train eval`: methods (a base model reading the context directly, the base and the
tuned model as RLMs, a teacher as the ceiling) over held-out task sets of several
families and context lengths, through the generation loop; one report.

- `config`: EvalConfig, MethodConfig, BootstrapConfig.
- `run`: run_eval, one `rollouts.generate` run per method (resumable, exactly-once).
- `direct`: the context-in-prompt baseline as a policy wrapper.
- `report`: report.json / report.md / plots, a pure function of the records.
- `stats`: seeded percentile bootstrap intervals, plain and paired.
"""
