"""The embedded demo model's task and the commands that train and evaluate it (run from the repository root; not
shipped in the wheel).

* ``task``: the task itself (fill JSON records from sentences about people), seeded splits; ``record_schema.json``
  is its record's JSON schema.
* ``python -m demo.train``: trains the embedded default model from scratch (``skeleton`` builds its untrained
  skeleton with the reference).
* ``python -m demo.train_drafter``: distils its drafter.
* ``python -m demo.eval``: exact match on the held-out test set, with the decoder's cost.
* ``python -m demo.eval_drafter``: no drafter against prompt lookup and the drafter, paired.
"""
