"""Evaluation of frozen backbones: ``python -m eval knn ...`` (see ``eval/__main__.py``).

``load`` (exports -> Backbone), ``features`` (L2-normalised features in global index order),
``knn`` (weighted k-NN vote), ``results`` (JSON-lines records and tables).
"""
