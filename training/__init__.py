"""The machinery a trainer is made of, shared by pretraining (``train.py``) and any other trainer
(supervised fine-tuning): none of it knows which model or data it drives.

- :mod:`training.distributed` - the process's place in a torchrun job (rank, world, device) and
  stop requests (SIGTERM, Ctrl-C);
- :mod:`training.checkpoint` - the checkpoint artefact (docs/architecture.md §5): its one writer
  and reader, resume with fallback, RNG state;
- :mod:`training.step` - one optimizer step (micro-steps, autocast, the fp16 gradient scaler, DDP
  ``no_sync``, clipping, the one all-reduce) and the optimizer/schedule builder;
- :mod:`training.validate` - the model's own loss and metrics on fixed held-out batches;
- :mod:`training.online_probe` - a kNN probe of the live encoder on a small labelled split;
- :mod:`training.log` - console progress, ``metrics.jsonl`` (training, ``valid/`` and ``probe/``
  rows), W&B and audio examples behind one :class:`~training.log.RunLogger`;
- :mod:`training.errors` - the failures a trainer reports to the user.

Importing the package imports nothing heavy; each module imports torch itself.
"""
