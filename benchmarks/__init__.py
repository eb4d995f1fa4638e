"""Benchmarks and probes of mlx_dgemma, run from the repository root (not shipped in the wheel).

Each module is a command, ``python -m benchmarks.<name> --help``:

* ``model``: our speed against the transformers reference on one random checkpoint (load, prefill, decoder pass,
  generation, memory).
* ``fast``: fast decoding and the drafter against the reference sampler (quality, decoder work, wall time,
  ablation, pass cost at tenth scale, a 26B projection).
* ``constrain``: structured output on the demo model (exact match, the grammar projection's cost).
* ``vision``: image prefill against the reference.
* ``distributed``: one rank against two (weight memory, pass time, bytes exchanged, expert split).
* ``quant_report``: each quantization recipe's KL divergence and top-1 agreement.
* ``load``: N concurrent ``openai`` clients against a server, latency percentiles.
* ``stress_server``: hostile clients and many-client load against a fresh server.
* ``probe_hostile``: the hostile probes of issue 26 (servers, CLIs, converter, trainer).

The checkpoints written by the reference come from ``tests.reference.make_fixture`` (run as a module, in its own
process). The demo task's commands (training, evaluation) are in ``demo``.
"""
