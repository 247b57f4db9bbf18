"""Evaluation of frozen backbones: ``python -m eval knn ...`` (see ``eval/__main__.py``).

``load`` (what ``--backbone`` names -> Backbone: exports, training checkpoints, released files),
``formats`` (released checkpoint layouts, safe reading), ``arch`` (``--arch`` and architecture
recognition), ``features`` (L2-normalised features in global index order), ``knn`` (weighted k-NN
vote), ``results`` (JSON-lines records and tables), ``errors`` (:class:`EvalInputError`).
"""
