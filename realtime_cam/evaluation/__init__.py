"""``realtime-cam evaluate``: classification and localization accuracy of the maps on annotated images.

Kept apart so that the math can be tested on hand-made maps and boxes:

* ``annotations``: ground truth (a CSV with one row per box, or PASCAL VOC / ImageNet XML) and the images
  it names;
* ``metrics``: pure functions on maps and boxes (the paper's box rule, MaxBoxAcc per wsolevaluation, the
  pointing game, the centre baseline, the ImageNet crop), returning frozen dataclasses;
* ``run``: the model over the images (:func:`run.run_evaluate`), the report and the overlays;
* ``command``: the parser and the command.
"""
