"""Issue 18: a memory model from a short probe, ``oomguard plan`` and ``oomguard tune``.

- :mod:`oomguard.tune.record`: the probe's spec and ``probe.json`` record (stdlib only; the in-child
  probe, :mod:`oomguard.guard.probe`, writes it);
- :mod:`oomguard.tune.fit`: peak memory as a function of tokens and length, throughput (pure);
- :mod:`oomguard.tune.choice`: will the command fit, the fastest configuration that does, what the
  ladder does first (pure; asks :mod:`oomguard.policy`);
- :mod:`oomguard.tune.writer`: a tuned policy file (validated before it is written).

This package never imports torch; importing it imports nothing heavy.
"""
