"""Benchmarks, apart from the product: nothing in bertjax outside this package imports it, and it uses only the
public functions of the trainer (`trainer.Trainer`, `runs.SingleRun`, `trial_group.TrialGroup`) and the step.

  python -m bertjax.bench ...                   bertjax against a Hugging Face PyTorch loop (driver.py, workers.py,
                                                peer_torch.py), or the host input pipeline alone (--input_only,
                                                host_input.py)
  python -m bertjax.bench.attention             the attention implementations side by side
  python -m bertjax.bench.trial_group           a trial group against its trials run one after another
  python -m bertjax.bench.count_step_ops        operations in the compiled step, one trial and a group
"""
