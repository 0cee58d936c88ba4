"""The stages a user runs, over option objects (:mod:`yolo_prune.options`) and the run module (:mod:`yolo_prune.run`):

- :mod:`.prune`: rank and remove channels of a checkpoint, measure, save a normal ultralytics checkpoint and a report;
- :mod:`.sensitivity`: what each channel group costs when pruned alone;
- :mod:`.sparsify`: unstructured (weight) pruning, in steps with fine-tuning;
- :mod:`.report`: the pipeline's before/after report; :mod:`.teacher`: the teacher of a run's training stages.
"""
