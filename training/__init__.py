"""Training and evaluation: turns CNN/DM pairs into HEST adapter artifacts (and baselines) that
`hest_core` loads, and runs the evaluation protocol. May import `hest_core` (runtime pieces it
trains against: model layout, quantisation, energy model, controller classes, artifact I/O);
never `server` or `loadtest`. The registry of methods is `training/methods.py`; the one training
loop is `training/loop.py`. Optional packages (the `train` extra) are imported where used."""
