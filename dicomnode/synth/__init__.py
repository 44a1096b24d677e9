"""Synthetic studies behind `dicomnode synth` and the stand-in models' training scripts.

`petct`: a PET/CT study (CT and PET series, lesion truth) in several vendors' PET encodings,
drawn from the torso phantom of `petct_phantom`. `registry`: the studies of the registry
models (glioma MR, lymph-node CT, abdominal organs CT), drawn from `registry_cases`.
Never imported by the node's run-time code (an import-linter contract checks it).
"""
