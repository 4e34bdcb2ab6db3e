"""Image-text retrieval (Flickr30k, COCO; Karpathy splits): ``data`` (the folder and its examples),
``models`` (the retrieval heads, the K-candidate scorer), ``task`` (training on the engine and
the evaluation command) and ``scoring`` (recall over every pair, the tiled score matrix)."""
