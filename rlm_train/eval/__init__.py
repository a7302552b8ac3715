"""`rlm-train eval`: methods (a base model reading the context directly, the base and the
tuned model as RLMs, a one-shot row, a constant-answer floor, a teacher as the ceiling) over
held-out task sets of several families and context lengths, through the generation loop;
one report.

- `config`: EvalConfig, MethodConfig, BootstrapConfig.
- `run`: run_eval, one `rollouts.generate` run per method (resumable, exactly-once).
- `direct`: the context-in-prompt baseline as a policy wrapper.
- `one_shot`: the one-shot row: a solved teacher trajectory in the root system prompt.
- `report`: report.json / report.md / plots, a pure function of the records.
- `stats`: exact binomial (Clopper-Pearson) intervals for 0/1 scores, seeded percentile
  bootstrap intervals for graded ones, paired differences with a sign test.
"""
