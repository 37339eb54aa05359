"""Every CP mechanism for sequence mixers that are not softmax attention, beside :mod:`lightning_cp.attention`.

Linear attention (gated delta nets), state-space scans (Mamba), short convolutions and recurrences
(RG-LRU) read the sequence in order, so a rank that runs them on its own shard is silently wrong. Here
they are either run exactly or refused:

- :mod:`~lightning_cp.mixers.detect`: which modules mix along the sequence, and what each needs;
- :mod:`~lightning_cp.mixers.mode`: the ``mixer_mode`` option and the per-layer choice;
- :mod:`~lightning_cp.mixers.heads`: the all-to-all of heads and channels (Note [mixer all-to-all]);
- :mod:`~lightning_cp.mixers.whole_sequence`: ``"gather"``, the whole module on the whole sequence;
- :mod:`~lightning_cp.mixers.state_passing`: ``"state_passing"``, each rank's own positions, the recurrences'
  states passed along the row (Note [state passing]);
- :mod:`~lightning_cp.mixers.exchange`: how the CP group's shards make up the original row;
- :mod:`~lightning_cp.mixers.switch` and :mod:`~lightning_cp.mixers.hooks`: on/off, and the ledger that
  stops a mixer whose parts did not all go through CP.
"""
